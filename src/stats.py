"""Statistics over the tidy tables: one place for every group-by, fit and test.

Used by the analyses for a run's headline numbers (`summary.json`) and by the sweep aggregator
(`src/report.py`) across runs, so a number means the same thing wherever it is printed.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-based confidence interval (nan for one value)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * stats.sem(v))


def median_rise_headline(t: pd.DataFrame) -> str:
    """A per-block study's report number: the median error rise over baseline, per run, as
    mean ± 95% CI over the runs of one group."""
    rises = t.groupby("run_dir").apply(lambda r: float(r.error.median() - r.baseline.iloc[0]))
    return f"median error rise over baseline: {fmt(*mean_ci(rises.tolist()))}"


def table_metric(t: pd.DataFrame) -> str:
    """The metric a study's rows measure: `error` where it has values, else `loss`."""
    return "error" if "error" in t and t["error"].notna().any() else "loss"


_MEASURED_IN = contextvars.ContextVar("measured_in", default="error")


@contextmanager
def measured_in(metric: str) -> Iterator[None]:
    """Within the block, `fmt`'s error rates are values of `metric`: a loss in nats (a headline
    written for an `error` column, given a language model's `loss` column as `error`)."""
    token = _MEASURED_IN.set(metric)
    try:
        yield
    finally:
        _MEASURED_IN.reset(token)


def fmt(mean: float, half: float, pct: bool = True) -> str:
    """`mean ± half` (a `mean_ci`), as percentages with the half-width in points by default
    (in nats where the values are losses: `measured_in`)."""
    if pct and _MEASURED_IN.get() == "loss":
        return f"{mean:.3f} nats" + ("" if math.isnan(half) else f" ± {half:.3f}")
    scale, unit = (100, "%") if pct else (1, "")
    if math.isnan(half):
        return f"{mean * scale:.2f}{unit}"
    return f"{mean * scale:.2f}{unit} ± {half * scale:.2f}{' pp' if pct else ''}"


def curve(table: pd.DataFrame, x: str, y: str, by: Sequence[str] = ()) -> pd.DataFrame:
    """Mean curve of `y` over `x` per group `by`: repeated rows of one run (trials) are averaged
    first, then runs (seeds) are combined into mean, 95% CI half-width and their number `n`."""
    keys = [*by, x]
    per_run = table.groupby([*keys, "run_dir"], dropna=False)[y].mean().reset_index()
    out = per_run.groupby(keys, dropna=False)[y].agg(
        mean="mean", ci=lambda v: mean_ci(v.tolist())[1], n="count"
    )
    return out.reset_index().sort_values(keys, kind="stable", ignore_index=True)


def fit_decay(lengths: Sequence[float], values: Sequence[float]) -> dict:
    """Least-squares line log(value) = a + b * length (scipy.stats.linregress), with standard
    errors: b is the decay rate per block entered, exp(b) the factor per block. Non-positive
    values are left out; fewer than two points give None."""
    pts = [(float(k), math.log(v)) for k, v in zip(lengths, values) if v > 0]
    none = dict.fromkeys(("decay_rate", "decay_rate_se", "intercept", "intercept_se"))
    if len({k for k, _ in pts}) < 2:
        return none | {"factor_per_block": None}
    fit = stats.linregress(*zip(*pts))
    se = float(fit.stderr) if len(pts) > 2 else None  # a line through 2 points has no error
    return {
        "decay_rate": float(fit.slope),
        "decay_rate_se": se,
        "intercept": float(fit.intercept),
        "intercept_se": float(fit.intercept_stderr) if se is not None else None,
        "factor_per_block": math.exp(fit.slope),
    }


# --- per-study headline numbers of one run ------------------------------------------------------


def delete_single_headline(table: pd.DataFrame, baseline: float) -> dict:
    """Numbers a reader compares with Figs 3/4: the increase over the unlesioned error when
    deleting a block that does not downsample (all blocks if every block does)."""
    plain = table.loc[~table.downsampling, "error"]
    plain = plain if len(plain) else table.error
    worst = table.loc[table.error.idxmax()]
    return {
        "baseline_error": baseline,
        "median_error": float(table.error.median()),
        "median_increase_nondownsampling": float(plain.median() - baseline),
        "mean_increase_nondownsampling": float(plain.mean() - baseline),
        "max_increase_nondownsampling": float(plain.max() - baseline),
        "min_error": float(table.error.min()),
        "max_error": float(worst.error),
        "worst_block": int(worst.block),
        "downsampling_errors": table.loc[table.downsampling, "error"].tolist(),
    }


def per_k(table: pd.DataFrame, x: str = "k") -> dict:
    """Error over the trials of each x (delete_many's k, reorder's swaps): mean, std, min, max,
    and for reorder the mean Kendall tau."""
    aggs = {"mean": ("error", "mean"), "std": ("error", lambda e: float(np.std(e)))}
    aggs |= {"min": ("error", "min"), "max": ("error", "max")}
    if "kendall_tau" in table:
        aggs["mean_kendall_tau"] = ("kendall_tau", "mean")
    out = table.groupby(x).agg(**aggs)
    return {str(k): {c: float(v) for c, v in row.items()} for k, row in out.iterrows()}


def largest_step(table: pd.DataFrame, x: str) -> float:
    """Largest rise of the mean error between neighbouring x (0 with one x): small when error
    grows smoothly, as Figs 5a/5b claim."""
    mean = table.groupby(x).error.mean().sort_index()
    return float(np.diff(mean.to_numpy()).max(initial=0.0))


# --- gradient per path length (Figs 6b, 6c) -----------------------------------------------------


def length_stats(lengths: Sequence[int], norms: Sequence[float]) -> pd.DataFrame:
    """Rows `length,samples,grad_norm_mean,grad_norm_std` (std with ddof=1; 0 for one sample)."""
    t = pd.DataFrame({"length": list(lengths), "norm": [float(g) for g in norms]})
    out = t.groupby("length").norm.agg(samples="count", grad_norm_mean="mean", grad_norm_std="std")
    return out.fillna({"grad_norm_std": 0.0}).reset_index()


def total_gradient(
    counts: Sequence[int], lengths: Sequence[int], mean_norms: Sequence[float]
) -> pd.DataFrame:
    """Fig 6c: (number of paths of length k) x mean norm per measured length k, as log10 and as
    a share of their sum; `counts[k]` is that number (C(n, k) for n blocks in sequence:
    `src.engines.paths.path_counts`). Counts reach 2^54, so the products are formed in log
    space (math.log of exact ints)."""
    logs = [
        math.log(counts[int(k)]) + math.log(g) if g > 0 and counts[int(k)] else -math.inf
        for k, g in zip(lengths, mean_norms)
    ]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    total = math.fsum(weights)
    return pd.DataFrame(
        {
            "length": list(lengths),
            "log10_total": [v / math.log(10) for v in logs],
            "share": [w / total for w in weights],
        }
    )


# --- Sec. 5: block-subset training against full training ----------------------------------------

FULL = "full"


def arm(training: str | None, k, n_blocks, test_mode: str | None = None) -> str:
    """'full' for standard training (or k = n, every block every step), else 'k=<k>/<n>', with
    the test-time rule when it is not the paper's (all blocks as trained): 'k=23/54 rescale'."""
    if training == "standard" or (not _missing(k) and not _missing(n_blocks) and k == n_blocks):
        return FULL
    rule = "" if _missing(test_mode) or test_mode == "full" else f" {test_mode}"
    return f"k={int(k)}/{int(n_blocks)}{rule}"


def sec5_arms(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of a Sec. 5 comparison with their `arm`: every block-subset run (trained, or a
    checkpoint tested again under another rule), and the full-training runs of the Sec. 5
    experiment: the sibling jobs of a trained block-subset run, and runs of
    `experiment=effective_paths` (seeds added to the full arm later, in a sweep of their own).
    Other full-training runs of a results folder, e.g. of a lesion study, do not join the arm.
    Empty without block-subset runs."""
    needed = {"training", "k", "n_blocks", "test_error", "seed", "run_dir"}
    if not needed <= set(runs) or not runs.training.eq("block_subset").any():
        return runs.iloc[0:0].assign(arm=pd.Series(dtype=str))
    runs = runs[runs.training.isin(["block_subset", "standard"])].copy()
    modes = runs.test_mode if "test_mode" in runs else pd.Series([None] * len(runs), runs.index)
    runs["arm"] = [
        arm(t, k, n, m) for t, k, n, m in zip(runs.training, runs.k, runs.n_blocks, modes)
    ]
    parent = runs.run_dir.map(lambda d: str(Path(d).parent))
    steps = runs.get("global_step", pd.Series([1] * len(runs), runs.index))
    sweeps = set(parent[(runs.arm != FULL) & (steps != 0)])
    named = runs.get("overrides", pd.Series([None] * len(runs), runs.index)).map(
        lambda o: isinstance(o, dict) and o.get("experiment") == "effective_paths"
    )
    return runs[(runs.arm != FULL) | parent.isin(sweeps) | named.astype(bool)]


def sec5_lengths(runs: pd.DataFrame) -> list[tuple[int | None, pd.DataFrame]]:
    """(length, runs) per training length (`step`: a run's checkpoint step) at which full
    training and a block-subset arm both ran, where some arm ran for several lengths: 400 steps
    are no replicates of 6,400, and a block-subset run of a length full training lacks has
    nothing to be compared with (left out: `sec5_unmatched`). Else [(None, runs)]: one
    comparison, e.g. of arms each trained for a step budget of its own."""
    timed = _sec5_timed(runs)
    if timed is None:
        return [(None, runs)]
    at = runs.step.astype(float)
    return [(n, runs[at == n]) for n in _sec5_steps(timed)]


def sec5_unmatched(runs: pd.DataFrame) -> list[int]:
    """The training lengths of block-subset runs that `sec5_lengths` leaves out: full training
    has no runs of that length (e.g. a long schedule's 23-block arm kept before its full arm)."""
    timed = _sec5_timed(runs)
    if timed is None:
        return []
    return sorted(set(timed.step[timed.arm != FULL].astype(int)) - set(_sec5_steps(timed)))


def _sec5_timed(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The Sec. 5 arms with a training length, where some arm ran for several lengths (one
    comparison per length); None where the runs make one comparison."""
    arms = sec5_arms(runs)
    if arms.empty or "step" not in arms:
        return None
    timed = arms.dropna(subset=["step"])
    return None if (timed.groupby("arm").step.nunique() <= 1).all() else timed


def _sec5_steps(timed: pd.DataFrame) -> list[int]:
    full = set(timed.step[timed.arm == FULL].astype(int))
    return sorted(full & set(timed.step[timed.arm != FULL].astype(int)))


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def compare_arms(runs: pd.DataFrame, alpha: float = 0.05, value: str = "test_error") -> dict:
    """Test error of every block-subset arm (one per test-time rule) against the full arm:
    Welch's t-test (primary: two independent samples), and where both arms share seeds (same
    initial weights and data order) the paired t-test and Wilcoxon's signed-rank test.
    `runs` needs columns arm, seed and `value`."""
    from src.errors import ConfigError

    arms = sorted(runs.arm.unique())
    subsets = [a for a in arms if a != FULL]
    if FULL not in arms or not subsets:
        raise ConfigError(
            f"found arms {arms}: need finished runs of full training and of block_subset training"
        )
    trained = runs.precision.dropna() if "precision" in runs else pd.Series([], dtype=object)
    if trained.nunique() > 1:  # a gap between arms trained alike, or no gap
        found = "; ".join(
            f"{p}: {', '.join(sorted(runs.arm[trained.index[trained == p]].unique()))}"
            for p in sorted(trained.unique())
        )
        raise ConfigError(
            f"the runs trained in different precisions ({found}): retrain one arm with the "
            "other's trainer.precision"
        )
    err = {a: runs.loc[runs.arm == a, value].astype(float).tolist() for a in [FULL, *subsets]}
    if min(len(v) for v in err.values()) < 2:
        raise ConfigError("need at least 2 seeds per arm for a significance test: add seeds")
    out = {
        "arms": {
            a: {
                "runs": len(v),
                "mean_error": float(np.mean(v)),
                "std_error": float(np.std(v, ddof=1)),
                "errors": v,
            }
            for a, v in err.items()
        },
        "value": value,
        "alpha": alpha,
        "comparisons": {},
    }
    by_seed = runs.pivot_table(index="seed", columns="arm", values=value, aggfunc="first")
    for sub in subsets:
        c = {"difference_subset_minus_full": float(np.mean(err[sub]) - np.mean(err[FULL]))}
        welch = stats.ttest_ind(err[sub], err[FULL], equal_var=False)
        c["welch_t"] = {"statistic": _num(welch.statistic), "p_value": _num(welch.pvalue)}
        paired = by_seed[[sub, FULL]].dropna()
        if len(paired) >= 2:
            a, b = paired[sub].astype(float), paired[FULL].astype(float)
            t = stats.ttest_rel(a, b)
            c["paired_t"] = {
                "seeds": len(paired),
                "statistic": _num(t.statistic),
                "p_value": _num(t.pvalue),
            }
            if (a != b).any():
                w = stats.wilcoxon(a, b)
                c["wilcoxon"] = {"statistic": _num(w.statistic), "p_value": _num(w.pvalue)}
        p = c["welch_t"]["p_value"]
        c["significant"] = p is not None and p < alpha
        out["comparisons"][sub] = c
    return out


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
