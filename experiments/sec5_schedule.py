"""Sec. 5 and Fig. 5a against training length: the table and figure of the runs that
experiments/sec5_schedule.sh keeps in experiments/results/sec5_schedule/<preset>_<steps>/
(metrics and analysis tables, no checkpoints; the same layout as its outputs/ folder).

    python experiments/sec5_schedule.py [--root experiments/results/sec5_schedule]
        [--out experiments/figures]

Per preset and length: for each test-time rule of the 23-of-54 block-subset networks, the gap
to full training in pp (paired over seeds: mean, t-based 95% CI, paired t-test p, Welch p), and
Fig. 5a's largest rise of the mean error between neighbouring k on the fully trained networks,
with their trained statistics (bn=eval) and re-estimated ones (bn=recalibrate). Writes
`sec5_schedule.csv` (one row per preset, length and arm) and `sec5_schedule_<preset>.png` (the
gaps and the largest step against length, log axis), and prints a markdown table with the
fitted trend of each gap in log10(steps) and its value at the paper's 64,000 iterations: an
extrapolation, labelled as one. A length counts the seeds whose every run has finished (at
least 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src import stats  # noqa: E402

RULES = ("full", "rescale", "recalibrate", "ensemble")
PAPER_STEPS = 64_000


def metrics(run: Path) -> dict | None:
    f = run / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def largest_step(run: Path) -> float | None:
    f = run / "analysis" / "delete_many.parquet"
    return stats.largest_step(pd.read_parquet(f), "k") if f.is_file() else None


def length_rows(root: Path) -> list[dict]:
    """The rows of one preset and length (empty while a seed of either arm is unfinished)."""
    preset, steps = root.name.rsplit("_", 1)
    seeds = sorted(int(p.name.split("seed")[1]) for p in root.glob("train/k54_seed*"))
    full = {s: metrics(root / f"train/k54_seed{s}") for s in seeds}
    tested = {
        rule: {
            s: metrics(
                root / (f"train/k23_seed{s}" if rule == "full" else f"retest/k23_seed{s}_{rule}")
            )
            for s in seeds
        }
        for rule in RULES
    }
    done = [s for s in seeds if full[s] and all(tested[r][s] for r in RULES)]
    if len(done) < 2:
        return []
    base = np.array([full[s]["test_error"] for s in done])
    chosen = {
        f.read_text().split(",")[0].removeprefix("precision ").strip()
        for s in done
        for f in root.glob(f"*/k*_seed{s}/precision.txt")
    }
    out = [
        {
            "preset": preset,
            "steps": int(steps),
            "arm": "full training",
            "seeds": len(done),
            "precision": ",".join(sorted(chosen)) or "unrecorded",
            "error": base.mean(),
            "error_std": base.std(ddof=1),
        }
    ]
    for rule in RULES:
        err = np.array([tested[rule][s]["test_error"] for s in done])
        gap, half = stats.mean_ci((err - base).tolist())
        out.append(
            {
                "preset": preset,
                "steps": int(steps),
                "arm": f"23/54 {rule}",
                "seeds": len(done),
                "error": err.mean(),
                "error_std": err.std(ddof=1),
                "gap_pp": 100 * gap,
                "gap_ci_pp": 100 * half,
                "paired_p": float(sps.ttest_rel(err, base).pvalue),
                "welch_p": float(sps.ttest_ind(err, base, equal_var=False).pvalue),
            }
        )
    for bn, runs in (
        ("eval", [root / f"train/k54_seed{s}" for s in done]),
        ("recalibrate", [root / f"retest/k54_seed{s}_delete_many_recalibrate" for s in done]),
    ):
        steps_ = [x for x in map(largest_step, runs) if x is not None]
        if len(steps_) >= 2:
            m, h = stats.mean_ci(steps_)
            out.append(
                {
                    "preset": preset,
                    "steps": int(steps),
                    "arm": f"Fig. 5a largest step, bn={bn}",
                    "seeds": len(steps_),
                    "gap_pp": 100 * m,
                    "gap_ci_pp": 100 * h,
                }
            )
    return out


def trend(t: pd.DataFrame) -> tuple[float, float, float] | None:
    """(slope per decade of steps, intercept, value at PAPER_STEPS) of gap_pp ~ log10(steps)."""
    if t.steps.nunique() < 2:
        return None
    slope, intercept = np.polyfit(np.log10(t.steps), t.gap_pp, 1)
    return float(slope), float(intercept), float(intercept + slope * math.log10(PAPER_STEPS))


def figure(t: pd.DataFrame, preset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, rule in enumerate(RULES):  # rules side by side at each length
        r = t[t.arm == f"23/54 {rule}"]
        x = r.steps * 1.04 ** (i - 1.5)
        a.errorbar(x, r.gap_pp, yerr=r.gap_ci_pp.fillna(0), marker="o", capsize=3, label=rule)
    a.axhline(0, color="grey", lw=0.8)
    gaps = t[t.arm.str.startswith("23/54")]
    a.set_ylim(
        min(-1.0, (gaps.gap_pp - gaps.gap_ci_pp.fillna(0)).min() * 1.5),
        (gaps.gap_pp + gaps.gap_ci_pp.fillna(0)).max() * 1.5,
    )
    a.set(
        xscale="log",
        yscale="symlog",
        xlabel="training steps",
        ylabel="gap to full training (pp)",
        title="Sec. 5: 23 of 54 blocks per step, by test-time rule",
    )
    a.legend()
    for bn in ("eval", "recalibrate"):
        r = t[t.arm == f"Fig. 5a largest step, bn={bn}"]
        b.errorbar(
            r.steps, r.gap_pp, yerr=r.gap_ci_pp.fillna(0), marker="o", capsize=3, label=f"bn={bn}"
        )
    b.set(
        xscale="log",
        xlabel="training steps",
        ylabel="largest rise between neighbouring k (pp)",
        title="Fig. 5a: deleting k blocks of the fully trained network",
    )
    b.legend()
    for ax in (a, b):
        ax.set_xlim(t.steps.min() / 2, t.steps.max() * 2)
    fig.suptitle(f"ResNet-110, {preset} preset; mean and 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).parent / "results" / "sec5_schedule")
    p.add_argument("--out", type=Path, default=Path("experiments/figures"))
    args = p.parse_args()
    rows = [r for d in sorted(args.root.glob("*_*")) if d.is_dir() for r in length_rows(d)]
    if not rows:
        sys.exit(f"error: no finished length under {args.root}: run experiments/sec5_schedule.sh")
    t = pd.DataFrame(rows).sort_values(["preset", "steps"], kind="stable")
    args.out.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out / "sec5_schedule.csv", index=False, float_format="%.6g")
    for preset, g in t.groupby("preset"):
        figure(g, preset, args.out / f"sec5_schedule_{preset}.png")
        print(f"\n{preset} preset\n")
        print(
            "| arm | "
            + " | ".join(f"{s:,} steps" for s in sorted(g.steps.unique()))
            + " | trend per decade | at 64k (extrapolated) |"
        )
        print("|---" * (g.steps.nunique() + 3) + "|")
        for arm, r in g.groupby("arm", sort=False):
            cells = []
            for _, x in r.iterrows():
                if arm == "full training":
                    cells.append(f"{100 * x.error:.2f}% ({x.seeds} seeds)")
                else:
                    ci = "" if math.isnan(x.gap_ci_pp) else f" ± {x.gap_ci_pp:.2f}"
                    p_ = (
                        f", p={x.paired_p:.2g}"
                        if "paired_p" in x and not pd.isna(x.paired_p)
                        else ""
                    )
                    cells.append(f"{x.gap_pp:+.2f}{ci} pp{p_}")
            fit = None if arm == "full training" else trend(r)
            more = ["", ""] if fit is None else [f"{fit[0]:+.2f} pp", f"{fit[2]:+.1f} pp"]
            print(f"| {arm} | " + " | ".join(cells + more) + " |")


if __name__ == "__main__":
    main()
