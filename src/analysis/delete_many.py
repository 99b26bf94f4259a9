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

import lightning as L
import pandas as pd

from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network
from src.stats import per_k


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
        self, ks: Sequence[int] = tuple(range(21)), trials: int = 10, seed: int = 0, **kwargs
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

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        samples = sample_deletions(net.n_blocks, self.ks, self.trials, self.seed)
        plans = [lesion_plan(pl_module.eval_plan, d) for _, _, d in samples]
        metric = self.measure(pl_module)
        baseline, values = self.evaluate(trainer, pl_module, plans)
        rows = pd.DataFrame(
            [
                {"k": k, "trial": t, "deleted": " ".join(map(str, d)), metric: v}
                for (k, t, d), v in zip(samples, values)
            ]
        )
        rows = self.values(rows, metric, baseline)
        summary = {
            **self.baselines(metric, baseline),
            "per_k": self.headline(per_k, rows, metric),
            "trials": self.trials,
            "label": self.run_label(pl_module),
            "bn": self.bn,
        }
        figure = self.figure("delete_many", metric)
        self.record(trainer, pl_module, rows, summary, figure, metric=metric)
