"""Effective-path training (paper Sec. 5): does a network that only ever trains k of its n blocks
per mini-batch (paths of length <= k, centred on k/2) match full training on the same budget?

`experiment=effective_paths` is a multirun over the two training modes x seeds; when it ends,
`ReportCallback` (a Hydra callback) writes the comparison into the sweep directory. The same
report can be rebuilt from any sweep directory:

    python -m src.analysis.effective_paths <multirun dir> [alpha]

Outputs `effective_paths.{json,md,png}`: test error per arm and seed, means and standard
deviations, Welch's t-test (primary: two independent samples, no equal-variance assumption), and,
where both arms share seeds (same initial weights and data order), a paired t-test and the
Wilcoxon signed-rank test from `scipy.stats`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from statistics import mean, stdev

from omegaconf import OmegaConf

from src.analysis.io import atomic_write, save_figure, write_json
from src.errors import ConfigError

FULL = "full"


def arm_of(cfg) -> tuple[str, int | None, int]:
    """(arm label, k, n_blocks) of one run's config: 'full' or 'k=<k>/<n>'.

    Block-subset training with k = n runs every block on every step, i.e. full training."""
    from hydra.utils import instantiate

    net = instantiate(cfg.model, _convert_="all", in_channels=1, num_classes=2)
    n = net.n_blocks
    target = str(cfg.training._target_)
    if target.endswith("BlockSubset"):
        k = int(cfg.training.k)
        return (FULL if k == n else f"k={k}/{n}"), k, n
    if target.endswith("Standard"):
        return FULL, None, n
    raise ConfigError(
        f"run trained with {target}: effective-path reports compare BlockSubset/Standard"
    )


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """One row per finished job (a subdirectory with metrics.json and .hydra/config.yaml)."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise ConfigError(f"{sweep} is not a directory: pass the multirun dir of effective_paths")
    runs = []
    for metrics in sorted(sweep.glob("*/metrics.json")):
        cfg_file = metrics.parent / ".hydra" / "config.yaml"
        if not cfg_file.exists():
            continue
        cfg = OmegaConf.load(cfg_file)
        arm, k, n = arm_of(cfg)
        m = json.loads(metrics.read_text())
        runs.append(
            {
                "job": metrics.parent.name,
                "arm": arm,
                "k": k,
                "n_blocks": n,
                "seed": cfg.seed,
                "test_error": float(m["test_error"]),
                "global_step": int(m.get("global_step", -1)),
            }
        )
    return runs


def compare(runs: list[dict], alpha: float = 0.05) -> dict:
    """Statistics of the subset arm against the full arm."""
    from scipy import stats

    arms = sorted({r["arm"] for r in runs})
    subset = [a for a in arms if a != FULL]
    if FULL not in arms or len(subset) != 1:
        raise ConfigError(
            f"found arms {arms}: need finished runs of exactly one block_subset k and full training"
        )
    sub = subset[0]
    err = {a: [r["test_error"] for r in runs if r["arm"] == a] for a in (sub, FULL)}
    if min(len(v) for v in err.values()) < 2:
        raise ConfigError("need at least 2 seeds per arm for a significance test: add seeds")
    steps = {r["global_step"] for r in runs}
    out = {
        "arms": {
            a: {"runs": len(v), "mean_error": mean(v), "std_error": stdev(v), "errors": v}
            for a, v in err.items()
        },
        "subset_arm": sub,
        "difference_subset_minus_full": mean(err[sub]) - mean(err[FULL]),
        "same_step_budget": len(steps) == 1,
        "steps": sorted(steps),
        "alpha": alpha,
    }
    welch = stats.ttest_ind(err[sub], err[FULL], equal_var=False)
    out["welch_t"] = {"statistic": _num(welch.statistic), "p_value": _num(welch.pvalue)}
    by_seed = {a: {r["seed"]: r["test_error"] for r in runs if r["arm"] == a} for a in err}
    seeds = sorted(set(by_seed[sub]) & set(by_seed[FULL]), key=str)
    if len(seeds) >= 2:
        a, b = [by_seed[sub][s] for s in seeds], [by_seed[FULL][s] for s in seeds]
        paired = stats.ttest_rel(a, b)
        out["paired_t"] = {
            "seeds": len(seeds),
            "statistic": _num(paired.statistic),
            "p_value": _num(paired.pvalue),
        }
        if any(x != y for x, y in zip(a, b)):
            w = stats.wilcoxon(a, b)
            out["wilcoxon"] = {"statistic": _num(w.statistic), "p_value": _num(w.pvalue)}
    p = out["welch_t"]["p_value"]
    out["significant"] = p is not None and p < alpha
    return out


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def markdown(runs: list[dict], res: dict) -> str:
    sub = res["subset_arm"]
    lines = [
        "# Effective-path training (paper Sec. 5)",
        "",
        f"Block-subset training ({sub} blocks per mini-batch) vs full training, "
        f"steps per run: {res['steps']}.",
        "",
        "| arm | runs | mean test error | std |",
        "|---|---|---|---|",
    ]
    for a, s in res["arms"].items():
        lines.append(f"| {a} | {s['runs']} | {s['mean_error']:.4f} | {s['std_error']:.4f} |")
    lines += ["", "| test | statistic | p-value |", "|---|---|---|"]
    for name in ("welch_t", "paired_t", "wilcoxon"):
        if name in res:
            t = res[name]
            stat = "nan" if t["statistic"] is None else f"{t['statistic']:.3f}"
            pv = "nan" if t["p_value"] is None else f"{t['p_value']:.4f}"
            lines.append(f"| {name} | {stat} | {pv} |")
    verdict = "a" if res["significant"] else "no"
    lines += [
        "",
        f"Difference (subset - full): {res['difference_subset_minus_full']:+.4f}; "
        f"{verdict} statistically significant difference at alpha={res['alpha']} (Welch).",
        "",
        "| job | arm | seed | test error |",
        "|---|---|---|---|",
        *(f"| {r['job']} | {r['arm']} | {r['seed']} | {r['test_error']:.4f} |" for r in runs),
    ]
    return "\n".join(lines) + "\n"


def report(sweep_dir: str | Path, alpha: float = 0.05) -> dict:
    """Write effective_paths.{json,md,png} into `sweep_dir`; return the statistics."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie in (0, 1)")
    sweep = Path(sweep_dir)
    runs = load_runs(sweep)
    res = compare(runs, alpha)
    write_json(sweep / "effective_paths.json", {**res, "runs": runs})
    atomic_write(sweep / "effective_paths.md", markdown(runs, res))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.2))
    for i, s in enumerate(res["arms"].values()):
        ax.plot([i] * len(s["errors"]), s["errors"], "o", alpha=0.6)
        ax.errorbar(i + 0.15, s["mean_error"], yerr=s["std_error"], fmt="k_", capsize=4)
    ax.set_xticks(range(len(res["arms"])), list(res["arms"]))
    p = res["welch_t"]["p_value"]
    ax.set(ylabel="test error", title=f"Sec. 5 effective paths (Welch p={p:.3g})")
    save_figure(fig, sweep / "effective_paths.png")
    return res


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class ReportCallback(_HydraCallback):
    """Hydra callback: build the report when the effective_paths multirun ends."""

    def __init__(self, alpha: float = 0.05):
        self.alpha = alpha

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            res = report(sweep, self.alpha)
        except ConfigError as err:
            print(f"error: effective-paths report: {err}", file=sys.stderr)
            return
        print(
            f"effective paths: subset-full = {res['difference_subset_minus_full']:+.4f}, "
            f"Welch p = {res['welch_t']['p_value']}; report in {sweep / 'effective_paths.md'}"
        )


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(
            "usage: python -m src.analysis.effective_paths <multirun dir> [alpha]", file=sys.stderr
        )
        return 2
    try:
        res = report(argv[0], float(argv[1]) if len(argv) == 2 else 0.05)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((Path(argv[0]) / "effective_paths.md").read_text())
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
