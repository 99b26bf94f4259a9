"""Combine the jobs of a sweep into figures with confidence bands and a markdown summary.

    python -m src.report <multirun dir> [--out DIR]

Reads every job's `metrics.json`, `.hydra/overrides.yaml` and whichever analysis CSVs it wrote
(delete_single, delete_many, reorder, gradient_paths; absent ones are skipped). Jobs that differ
only in `seed` are replicates; every other swept override (model=..., training=...) is a curve of
its own. Each point is the mean over seeds (trials within a job are averaged first) with a
t-based 95% confidence interval. Writes `<out>/<analysis>.png` and `<out>/report.md` (the paper's
claim, our measured value, the spread); `<out>` defaults to `<multirun dir>/report`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from src.analysis.io import atomic_write, read_csv, save_figure

REPLICATE_KEYS = {"seed"}


@dataclass(frozen=True)
class Analysis:
    """One analysis CSV: the curve it draws (x, y columns) and the paper's claim about it."""

    name: str
    x: str
    y: str
    title: str
    claim: str


ANALYSES = (
    Analysis(
        "delete_single",
        "block",
        "error",
        "Fig. 3: deleting single blocks",
        "Deleting any single block other than a downsampling one leaves the test error close to "
        "the unlesioned network's (VGG, by contrast, drops to chance).",
    ),
    Analysis(
        "delete_many",
        "k",
        "error",
        "Fig. 5a: deleting k blocks",
        "Error grows smoothly with the number of deleted blocks: no single block is critical.",
    ),
    Analysis(
        "reorder",
        "swaps",
        "error",
        "Fig. 5b: reordering blocks",
        "Error grows smoothly as more blocks are swapped (Kendall tau falls).",
    ),
    Analysis(
        "gradient_paths",
        "length",
        "grad_norm_mean",
        "Fig. 6b: gradient magnitude per path length",
        "The gradient reaching the input through one path falls exponentially with the path's "
        "length; the effective paths of ResNet-110 are 5-17 blocks long.",
    ),
)


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]
    metrics: dict


def load_jobs(sweep: Path) -> list[Job]:
    jobs = []
    for path in sorted(p for p in Path(sweep).iterdir() if (p / "metrics.json").is_file()):
        ov_file = path / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ov_file.read_text()) if ov_file.is_file() else []
        pairs = dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o)
        jobs.append(Job(path, pairs, json.loads((path / "metrics.json").read_text())))
    return jobs


def group_name(job: Job, swept: list[str]) -> str:
    return ", ".join(f"{k}={job.overrides.get(k, '-')}" for k in swept) or "all jobs"


def swept_keys(jobs: list[Job]) -> list[str]:
    """Overrides that differ between jobs, other than the replicate (seed) keys."""
    keys = sorted({k for j in jobs for k in j.overrides} - REPLICATE_KEYS)
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-based confidence interval (nan for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, float(half)


def job_curve(csv_path: Path, a: Analysis) -> dict[float, float]:
    """x -> y for one job, averaged over the trials that share an x."""
    by_x: dict[float, list[float]] = defaultdict(list)
    for row in read_csv(csv_path):
        by_x[float(row[a.x])].append(float(row[a.y]))
    return {x: statistics.fmean(ys) for x, ys in by_x.items()}


def curves(jobs: list[Job], swept: list[str], a: Analysis) -> dict[str, dict]:
    """group -> {"x": [...], "mean": [...], "ci": [...], "n": [...], "per_seed": [curves]}."""
    per_group: dict[str, list[dict[float, float]]] = defaultdict(list)
    for job in jobs:
        csv_path = job.path / "analysis" / f"{a.name}.csv"
        if csv_path.is_file():
            per_group[group_name(job, swept)].append(job_curve(csv_path, a))
    out = {}
    for group, seeds in per_group.items():
        xs = sorted({x for c in seeds for x in c})
        rows = [mean_ci([c[x] for c in seeds if x in c]) for x in xs]
        out[group] = {
            "x": xs,
            "mean": [m for m, _ in rows],
            "ci": [h for _, h in rows],
            "n": [sum(x in c for c in seeds) for x in xs],
            "per_seed": seeds,
        }
    return out


def plot(a: Analysis, data: dict[str, dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for group, d in data.items():
        x, m, h = np.array(d["x"]), np.array(d["mean"]), np.nan_to_num(np.array(d["ci"]))
        (line,) = ax.plot(x, m, marker="o", ms=3, label=f"{group} (n={max(d['n'])})")
        lo, hi = m - h, m + h
        if a.y == "error":  # an error rate's band stays within [0, 1]
            lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    if a.name == "gradient_paths":
        ax.set_yscale("log")
    ax.set(xlabel=a.x, ylabel=a.y, title=a.title)
    ax.legend(fontsize=7)
    return save_figure(fig, out / f"{a.name}.png")


def fmt(mean: float, half: float, pct: bool = True) -> str:
    scale, unit = (100, "%") if pct else (1, "")
    if math.isnan(half):
        return f"{mean * scale:.2f}{unit}"
    return f"{mean * scale:.2f}{unit} ± {half * scale:.2f}{' pp' if pct else ''}"


def measured(a: Analysis, jobs: list[Job], swept: list[str], group: str, d: dict) -> str:
    """The headline number of one analysis for one group, as mean ± 95% CI over seeds."""
    if a.name == "delete_single":
        # error increase over the job's own baseline, averaged over non-downsampling blocks
        rises = []
        for job in (j for j in jobs if group_name(j, swept) == group):
            rows = read_csv(job.path / "analysis" / "delete_single.csv")
            plain = [float(r["error"]) for r in rows if r["downsampling"] in ("False", "0")]
            if plain and "test_error" in job.metrics:
                rises.append(statistics.fmean(plain) - job.metrics["test_error"])
        if not rises:
            return "no non-downsampling blocks"
        return f"mean error rise over baseline (non-downsampling blocks): {fmt(*mean_ci(rises))}"
    if a.name in ("delete_many", "reorder"):
        jumps = [max(np.diff([c[x] for x in sorted(c)]), default=0.0) for c in d["per_seed"]]
        last = f"error at {a.x}={d['x'][-1]:g}: {fmt(d['mean'][-1], d['ci'][-1])}"
        return f"{last}; largest step between neighbouring {a.x}: {fmt(*mean_ci(jumps))}"
    if a.name == "gradient_paths":
        slopes = []
        for c in d["per_seed"]:
            xs = sorted(x for x in c if c[x] > 0)
            if len(xs) >= 2:
                slopes.append(np.polyfit(xs, np.log([c[x] for x in xs]), 1)[0])
        if not slopes:
            return "too few path lengths to fit"
        m, h = mean_ci(slopes)
        return f"gradient norm changes by a factor {math.exp(m):.3f} per block of path length " + (
            f"(log-slope {m:.3f} ± {h:.3f})" if not math.isnan(h) else f"(log-slope {m:.3f})"
        )
    return ""


def report(sweep: Path, out: Path | None = None) -> Path:
    sweep = Path(sweep)
    jobs = load_jobs(sweep)
    if not jobs:
        raise SystemExit(f"error: no job with metrics.json under {sweep} (is it a multirun dir?)")
    out = Path(out) if out else sweep / "report"
    swept = swept_keys(jobs)
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"{len(jobs)} finished jobs in `{sweep}`; swept: {', '.join(swept) or 'seed only'}. "
        "Values are mean ± half-width of the t-based 95% confidence interval over seeds, in "
        "percentage points for error rates (no interval with one seed).",
        "",
        "## Test error",
        "",
        "| group | seeds | test error | min | max |",
        "|---|---|---|---|---|",
    ]
    by_group: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        if "test_error" in job.metrics:
            by_group[group_name(job, swept)].append(job.metrics["test_error"])
    for group, errs in sorted(by_group.items()):
        lines.append(
            f"| {group} | {len(errs)} | {fmt(*mean_ci(errs))} | {min(errs) * 100:.2f}% "
            f"| {max(errs) * 100:.2f}% |"
        )
    for a in ANALYSES:
        data = curves(jobs, swept, a)
        if not data:
            continue
        png = plot(a, data, out)
        lines += ["", f"## {a.title}", "", f"**Paper:** {a.claim}", "", f"![{a.name}]({png.name})"]
        lines += ["", "| group | seeds | measured |", "|---|---|---|"]
        for group, d in sorted(data.items()):
            value = measured(a, jobs, swept, group, d)
            lines.append(f"| {group} | {len(d['per_seed'])} | {value} |")
    return atomic_write(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="a multirun dir (outputs/<exp>/multirun_...)")
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/report")
    args = parser.parse_args(argv)
    print(report(args.sweep, args.out))


if __name__ == "__main__":
    main()
