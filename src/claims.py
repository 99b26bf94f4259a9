"""The paper's claims beside what the results folder measured, one column per data set.

`table(runs, tables)` turns the runs (`src.results.runs`) and analysis tables (`src.results.load`)
of a folder into rows `claim | paper | <data set> ... | verdict`. The paper column is the paper's
own statement (typed from the text); every other cell is computed from the result files, and a
claim without results for a data set says so. The verdict is per data set: `holds` or `fails`
by the rule stated in the claim's `test`, `untested` where the results cannot decide it (one seed
in an arm), `-` where nothing was measured.

The claims are the paper's, about convolutional networks: runs of transformers (their block
tables name a branch `kind`, attention or MLP) are left out; experiments/transformers.md sets
them beside the paper. Lesion claims read the paper's lesions (`bn=eval`, the trained statistics)
of standard training; Fig. 8 compares stochastic-depth with standard training; Sec. 5 uses the
sweep report's arms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from scipy.stats import kendalltau

from src import stats

# (text, verdict) from a folder's runs and tables; verdict None: measured, but the claim's test
# cannot decide (e.g. one seed in an arm); None: nothing measured.
Measure = Callable[[pd.DataFrame, pd.DataFrame], "tuple[str, bool | None] | None"]
VERDICTS = {True: "holds", False: "fails", None: "untested"}


@dataclass(frozen=True)
class Claim:
    figure: str
    paper: str
    test: str  # the rule that decides the verdict, in words
    measure: Measure


def _lesions(tables: pd.DataFrame, study: str, plain: bool | None = None) -> pd.DataFrame:
    t = tables[(tables.study == study)]
    if "bn" in t:
        t = t[t.bn.fillna("eval") == "eval"]
    if "training" in t:
        t = t[t.training.fillna("standard") == "standard"]
    if plain is not None and "model" in t:
        is_vgg = t.model.fillna("").str.startswith("vgg")
        t = t[is_vgg if plain else ~is_vgg]
    return t


def _runs(n: int) -> str:
    return f"{n} run{'s' * (n != 1)}"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def resnet_single(runs, tables):
    t = _lesions(tables, "delete_single", plain=False)
    if t.empty:
        return None
    rise = t.groupby("run_dir").apply(
        lambda r: stats.delete_single_headline(r, r.baseline.iloc[0])[
            "median_increase_nondownsampling"
        ]
    )
    down = t[t.downsampling.astype(bool)]
    worst_down = down.error - down.baseline
    text = f"median rise {_pp(rise.mean())} ({_runs(len(rise))})"
    if len(worst_down):
        text += f"; downsampling blocks up to {_pp(worst_down.max())}"
    return text, bool(rise.mean() < 0.02)


def vgg_single(runs, tables):
    t = _lesions(tables, "delete_single", plain=True)
    if t.empty:
        return None
    low = t.error.min()
    return f"every deletion: error >= {100 * low:.1f}% (chance 90%)", bool(low > 0.5)


def many_smooth(runs, tables):
    t = _lesions(tables, "delete_many", plain=False)
    if t.empty or t.k.nunique() < 3:
        return None
    step = t.groupby("run_dir").apply(lambda r: stats.largest_step(r, "k")).mean()
    by_k = t.groupby("k").error.mean()
    text = f"error {100 * by_k.iloc[0]:.1f}% at k={by_k.index[0]} -> {100 * by_k.iloc[-1]:.1f}%"
    text += f" at k={by_k.index[-1]}; largest step {_pp(step)}"
    return text, bool(step < 0.15 and by_k.iloc[-1] > by_k.iloc[0])


def reorder_smooth(runs, tables):
    t = _lesions(tables, "reorder", plain=False)
    if t.empty or t.swaps.nunique() < 3:
        return None
    tau = kendalltau(t.kendall_tau, t.error).statistic
    step = t.groupby("run_dir").apply(lambda r: stats.largest_step(r, "swaps")).mean()
    text = f"Kendall tau(order tau, error) = {tau:.2f}; largest step {_pp(step)}"
    return text, bool(tau < 0 and step < 0.15)


def gradient_decay(runs, tables):
    t = tables[tables.study == "gradient_paths"]
    if t.empty:
        return None
    fits = t.groupby("run_dir").apply(
        lambda r: stats.fit_decay(r.length, r.grad_norm_mean)["factor_per_block"]
    )
    fits = fits.dropna()
    if fits.empty:
        return None
    return f"x{fits.mean():.3f} per block entered ({_runs(len(fits))})", bool(fits.mean() < 1)


def effective_window(runs, tables):
    t = tables[tables.study == "gradient_paths"]
    if t.empty:
        return None
    windows = []
    for _, r in t.groupby("run_dir"):
        n = int(r.n_blocks.iloc[0])
        # paths per length: recorded by the study (parallel layers have fewer); else C(n, k)
        counts = (
            dict(zip(r.length, r.paths))
            if "paths" in r
            else [math.comb(n, k) for k in range(n + 1)]
        )
        totals = stats.total_gradient(counts, r.length, r.grad_norm_mean)
        lo, hi = _window(totals.share.tolist(), 0.9)
        windows.append((int(r.length.iloc[lo]), int(r.length.iloc[hi]), n))
    lo, hi, n = windows[0]
    text = f"90% of the gradient from lengths {lo}-{hi} of {n}"
    return text, bool(hi <= n / 2)


def _window(weights, share):
    from src.analysis.path_stats import shortest_window

    return shortest_window(weights, share)


def stochastic_depth(runs, tables):
    if "downsampling" not in tables:
        return None
    t = tables[(tables.study == "delete_single") & tables.downsampling.fillna(False).astype(bool)]
    if "bn" in t:
        t = t[t.bn.fillna("eval") == "eval"]
    if t.empty or "training" not in t:
        return None
    # one network under both trainings: the models trained with stochastic depth
    t = t[t.model.isin(set(t.model[t.training == "stochastic_depth"]))]
    if not {"standard", "stochastic_depth"} <= set(t.training.dropna()):
        return None
    rise = (t.error - t.baseline).groupby(t.training).mean()
    text = (
        f"downsampling deletions: {_pp(rise['stochastic_depth'])} (stochastic depth) vs "
        f"{_pp(rise['standard'])} (standard)"
    )
    return text, bool(rise["stochastic_depth"] < rise["standard"])


def effective_paths(runs, tables):
    arms = stats.sec5_arms(runs)
    if arms.empty:
        return None
    try:
        res = stats.compare_arms(arms)
    except ValueError as e:  # measured, but too few runs for a test
        seeds = arms.groupby("arm").seed.nunique()
        runs_per_arm = ", ".join(f"{a}: {n} seed{'s' * (n != 1)}" for a, n in seeds.items())
        return f"no test ({runs_per_arm}): {e}", None
    parts, holds = [], False
    for arm, c in res["comparisons"].items():
        p = c["welch_t"]["p_value"]
        ptext = "nan" if p is None else f"{p:.2g}"
        parts.append(
            f"{arm}: {100 * res['arms'][arm]['mean_error']:.1f}% vs "
            f"{100 * res['arms']['full']['mean_error']:.1f}% (p={ptext})"
        )
        holds = holds or not c["significant"]
    return "; ".join(parts), holds


CLAIMS = (
    Claim(
        "Fig. 3/4",
        "deleting one (non-downsampling) block of a ResNet has a minimal impact",
        "median rise over non-downsampling blocks < 2 pp",
        resnet_single,
    ),
    Claim(
        "Fig. 3",
        "deleting any layer of VGG drops it to chance",
        "every deletion's error > 50%",
        vgg_single,
    ),
    Claim(
        "Fig. 5a",
        "error grows smoothly with the number of deleted blocks (k = 1..20)",
        "largest rise between neighbouring k < 15 pp, and error grows",
        many_smooth,
    ),
    Claim(
        "Fig. 5b",
        "error grows smoothly as blocks are reordered (Kendall tau falls)",
        "error falls with tau (Kendall tau < 0), largest step < 15 pp",
        reorder_smooth,
    ),
    Claim(
        "Fig. 6b",
        "the gradient through a path decays roughly exponentially with its length",
        "fitted factor per block < 1",
        gradient_decay,
    ),
    Claim(
        "Fig. 6c",
        "almost all gradient comes from paths 5-17 modules long (of 54)",
        "the window holding 90% of the gradient ends below n/2",
        effective_window,
    ),
    Claim(
        "Fig. 8",
        "stochastic depth mainly reduces the dependence on downsampling blocks",
        "deleting downsampling blocks hurts less after stochastic depth",
        stochastic_depth,
    ),
    Claim(
        "Sec. 5",
        "training 23 of 54 blocks per batch: 5.96% vs 6.10% error, no significant difference",
        "some test-time rule gives no significant difference (Welch, alpha 0.05)",
        effective_paths,
    ),
)


def table(runs: pd.DataFrame, tables: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: figure, paper, test, then per data set the measured value, then the
    verdict per data set."""
    if "kind" in tables and "run_dir" in tables:  # transformers: not the paper's networks
        transformer = set(tables.run_dir[tables.kind.notna()])
        tables = tables[~tables.run_dir.isin(transformer)]
        if "run_dir" in runs:
            runs = runs[~runs.run_dir.isin(transformer)]
    data = sorted(
        {d for frame in (runs, tables) if "data" in frame for d in frame.data.dropna().unique()}
    )
    rows = []
    for c in CLAIMS:
        row = {"figure": c.figure, "paper": c.paper, "test": c.test}
        verdicts = []
        for d in data or ["measured"]:  # runs that do not name their data set: one column
            r = runs[runs.data == d] if data else runs
            t = tables[tables.data == d] if data else tables
            got = c.measure(r, t) if not (r.empty and t.empty) else None
            if got is None:
                row[d] = "not measured"
                verdicts.append("-")
            else:
                row[d] = got[0]
                verdicts.append(f"{d}: {VERDICTS[got[1]]}")
        row["verdict"] = "; ".join(verdicts)
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(claims: pd.DataFrame) -> list[str]:
    cols = [c for c in claims.columns if c not in ("test",)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in claims.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return lines
