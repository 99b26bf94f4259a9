"""The paper's claims beside what the results folder measured, one column per data set.

`table(runs, tables)` turns the runs (`src.results.runs`) and analysis tables (`src.results.load`)
of a folder into rows `claim | paper | <data set> ... | verdict`. The paper column is the paper's
own statement (typed from the text); every other cell is computed from the result files, and a
claim without results for a data set says so. The verdict is per data set: `holds` or `fails`
by the rule stated in the claim's `test`, `untested` where the results cannot decide it (one seed
in an arm), `-` where nothing was measured. Where a data set's runs trained for several lengths
(their `step`: e.g. experiments/sec5_schedule.sh's 400, 1,600 and 6,400 steps), each claim is
measured per length and states its value and verdict at the longest length that decides it
(else the longest that measured it), the other lengths' verdicts beside it. A study's claims
come with its registry entry (src/studies.py) and read its own rows; `CLAIMS` holds those about
the runs (Sec. 5).

The claims are the paper's, about convolutional networks: runs of transformers (their block
tables name a branch `kind`, attention or MLP) are left out; experiments/transformers.md sets
them beside the paper. Lesion claims read the paper's lesions (`bn=eval`, the trained statistics)
of standard training; Fig. 8 compares stochastic-depth with standard training; Sec. 5 uses the
sweep report's arms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

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


def lesions(tables: pd.DataFrame, plain: bool | None = None) -> pd.DataFrame:
    """A lesion study's rows that the paper's claims read: the trained statistics (bn=eval),
    standard training, and with `plain` only VGG (True) or only residual networks (False)."""
    t = tables
    if "bn" in t:
        t = t[t.bn.fillna("eval") == "eval"]
    if "training" in t:
        training = t.training.fillna("standard")
        if {"blocks_per_step", "n_blocks"} <= set(t):  # k of n blocks with k = n: every block
            every = (t.blocks_per_step == t.n_blocks).astype("boolean").fillna(False)
            training = training.mask((training == "block_subset") & every.astype(bool), "standard")
        t = t[training == "standard"]
    if plain is not None and "model" in t:
        is_vgg = t.model.fillna("").str.startswith("vgg")
        t = t[is_vgg if plain else ~is_vgg]
    return t


def n_runs(n: int) -> str:
    return f"{n} run{'s' * (n != 1)}"


def pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


# "No significant difference" counts as the paper's claim only from this many seeds per arm: with
# 2, a t-test misses even a 15 pp gap (Fashion-MNIST's at 700 steps), so its p decides nothing.
MIN_SEEDS_NO_DIFFERENCE = 3


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
    few = int(arms.groupby("arm").seed.nunique().min())
    if holds and few < MIN_SEEDS_NO_DIFFERENCE:  # no test's power: not evidence of no difference
        return (
            "; ".join(parts) + f" (not decided: {few} seeds per arm; no significant difference "
            f"needs at least {MIN_SEEDS_NO_DIFFERENCE})",
            None,
        )
    return "; ".join(parts), holds


# Claims about no single study's table; each study's own are in its registry entry
# (src/studies.py), measured on its rows.
CLAIMS = (
    Claim(
        "Sec. 5",
        "training 23 of 54 blocks per batch: 5.96% vs 6.10% error, no significant difference",
        "some test-time rule gives no significant difference (Welch, alpha 0.05)",
        effective_paths,
    ),
)


def claims() -> list[tuple[str | None, Claim]]:
    """(study, claim) for every study's claims in the registry's order, then (None, claim) for
    the claims about runs (`CLAIMS`)."""
    from src.studies import registry

    return [(s.name, c) for s in registry().values() for c in s.claims] + [
        (None, c) for c in CLAIMS
    ]


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
    for study, c in claims():
        row = {"figure": c.figure, "paper": c.paper, "test": c.test}
        verdicts = []
        for d in data or ["measured"]:  # runs that do not name their data set: one column
            r = runs[runs.data == d] if data else runs
            t = tables[tables.data == d] if data else tables
            if study is not None:  # a study's claim reads its own rows
                t = t[t.study == study]
            measured = [
                (length, got)
                for length, r_, t_ in (
                    by_length(r, t)
                    if study is not None  # the runs' claims (Sec. 5): the report's comparisons
                    else [(n, rn, t) for n, rn in stats.sec5_lengths(r)]
                )
                if not (t_.empty if study is not None else r_.empty and t_.empty)
                and (got := c.measure(r_, t_)) is not None
            ]
            if not measured:
                row[d] = "not measured"
                verdicts.append("-")
                continue
            # the longest training that decides the claim (else the longest measured)
            decided = [i for i, (_, (_, v)) in enumerate(measured) if v is not None]
            pick = decided[-1] if decided else len(measured) - 1
            length, (text, verdict) = measured[pick]
            others = "; ".join(
                f"{n:,} steps: {VERDICTS[v]}" for i, (n, (_, v)) in enumerate(measured) if i != pick
            )
            row[d] = text if length is None else f"at {length:,} steps: {text}"
            verdicts.append(f"{d}: {VERDICTS[verdict]}")
            if length is not None:
                verdicts[-1] += f" at {length:,} steps" + (f" ({others})" if others else "")
        row["verdict"] = "; ".join(verdicts)
        rows.append(row)
    return pd.DataFrame(rows)


def by_length(runs: pd.DataFrame, tables: pd.DataFrame) -> list[tuple]:
    """(training length, runs, tables) per length of training the weights had (`step`: a
    run's checkpoint step, a table's latest measured step), shortest first, where runs of
    several lengths are found (rows without a step join every length); else [(None, runs,
    tables)]."""
    found = sorted(
        {int(s) for f in (runs, tables) if "step" in f for s in f["step"].dropna().unique()}
    )
    if len(found) < 2:
        return [(None, runs, tables)]

    def at(f: pd.DataFrame, n: int) -> pd.DataFrame:
        if "step" not in f:
            return f
        keep = (f["step"] == n).astype("boolean").fillna(True) | f["step"].isna()
        return f[keep.to_numpy(dtype=bool)]

    return [(n, at(runs, n), at(tables, n)) for n in found]


def markdown(claims: pd.DataFrame) -> list[str]:
    cols = [c for c in claims.columns if c not in ("test",)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in claims.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return lines
