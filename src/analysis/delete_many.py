"""Deleting many blocks at test time (paper Sec. 4.2, Fig. 5a): error grows smoothly with k.

For each k in `ks`, `trials` random sets of k distinct blocks (drawn from the study's `seed`) are
deleted together. Writes the table `analysis/delete_many.{parquet,csv}` (the run's metadata
columns, then k,trial,deleted,error,baseline; `deleted` = space-separated block indices; a
language model's value column is `loss`, with perplexity), the `delete_many` entry of
`summary.json` (mean/std/min/max error per k) and `delete_many.png` (error vs k with the spread
over trials).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated

import pandas as pd

from src import claims, figures, lm_figures, stats
from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.schema import NON_NEGATIVE, POSITIVE
from src.studies import Study


def sample_deletions(n_blocks: int, ks: Sequence[int], trials: int, seed: int) -> list[tuple]:
    """(k, trial, sorted block indices) for every k and trial, reproducible from `seed`."""
    rng = random.Random(seed)
    return [
        (k, t, tuple(sorted(rng.sample(range(n_blocks), k)))) for k in ks for t in range(trials)
    ]


class DeleteMany(LesionStudy):
    """ks: numbers of blocks deleted together (paper: 0..20); trials: random sets per k."""

    name = "delete_many"

    def __init__(
        self,
        ks: Sequence[Annotated[int, NON_NEGATIVE]] = tuple(range(21)),
        trials: Annotated[int, POSITIVE] = 10,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.ks = [int(k) for k in ks]
        self.trials, self.seed = int(trials), int(seed)
        if not self.ks or min(self.ks) < 0 or self.trials < 1:
            raise ConfigError(
                "delete_many needs a non-empty list of ks >= 0 and trials >= 1, got "
                f"ks={self.ks} trials={self.trials}"
            )

    def check(self, net: Network) -> None:
        if max(self.ks) > net.n_blocks:
            raise ConfigError(
                f"delete_many.ks has k={max(self.ks)}, but this network has only {net.n_blocks} "
                f"blocks: use ks of at most {net.n_blocks}"
            )

    def lesions(self, net: Network, base: Plan) -> list[tuple[dict, Plan]]:
        samples = sample_deletions(net.n_blocks, self.ks, self.trials, self.seed)
        return [
            ({"k": k, "trial": t, "deleted": " ".join(map(str, d))}, lesion_plan(base, d))
            for k, t, d in samples
        ]

    def summarise(self, rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        return {"per_k": self.headline(stats.per_k, rows, metric), "trials": self.trials}


def smooth_headline(t: pd.DataFrame, x: str) -> str:
    """Error at the largest `x` and the largest step between neighbouring x (delete_many's k,
    reorder's swaps)."""
    per_run = t.groupby("run_dir")
    last = t[x].max()
    at_last = per_run.apply(lambda r: r.loc[r[x] == last, "error"].mean())
    steps = per_run.apply(lambda r: stats.largest_step(r, x))
    return (
        f"error at {x}={last:g}: {stats.fmt(*stats.mean_ci(at_last.tolist()))}; largest step "
        f"between neighbouring {x}: {stats.fmt(*stats.mean_ci(steps.tolist()))}"
    )


def many_smooth(runs, tables):
    t = claims.lesions(tables, plain=False)
    if t.empty or t.k.nunique() < 3:
        return None
    step = t.groupby("run_dir").apply(lambda r: stats.largest_step(r, "k")).mean()
    by_k = t.groupby("k").error.mean()
    text = f"error {100 * by_k.iloc[0]:.1f}% at k={by_k.index[0]} -> {100 * by_k.iloc[-1]:.1f}%"
    text += f" at k={by_k.index[-1]}; largest step {claims.pp(step)}"
    return text, bool(step < 0.15 and by_k.iloc[-1] > by_k.iloc[0])


STUDY = Study(
    name="delete_many",
    config="lesion/delete_many",
    columns=("k", "trial", "deleted"),
    figures={"error": figures.delete_many, "loss": lm_figures.delete_many},
    headline=lambda t: smooth_headline(t, "k"),
    title="Fig. 5a: deleting k blocks",
    claim="Error grows smoothly with the number of deleted blocks: no single block is critical.",
    claims=(
        claims.Claim(
            "Fig. 5a",
            "error grows smoothly with the number of deleted blocks (k = 1..20)",
            "largest rise between neighbouring k < 15 pp, and error grows",
            many_smooth,
        ),
    ),
    section="4.2",
)
