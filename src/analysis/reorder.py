"""Reordering blocks at test time (paper Sec. 4.3, Fig. 5b): error grows smoothly as Kendall's tau
between the trained and the executed block order falls.

For each k in `swaps`, `trials` times: k distinct random pairs of shape-compatible blocks (same
stage, downsampling blocks excluded, as in the paper; transformer sub-layers of the same kind)
swap their positions one after another.
Writes `analysis/reorder.csv` (swaps,trial,kendall_tau,error), the `reorder` entry of
`summary.json` (mean tau and error per k) and `reorder.png` (error vs tau). The table
`analysis/reorder.{parquet,csv}` has the run's metadata columns, then
swaps,trial,kendall_tau,error,baseline.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import lightning as L
import pandas as pd
from scipy.stats import kendalltau

from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network
from src.stats import per_k


def compatible_pairs(net: Network, same_kind: bool = True) -> list[tuple[int, int]]:
    """Pairs of blocks that can trade places: same stage, neither one downsampling, and (with
    `same_kind`) the same kind of transformer sub-layer: attention with attention, MLP with MLP.
    A transformer's blocks share one width and one stage, so its swaps span all layers."""
    info = [b for b in net.block_info() if not b["downsampling"]]
    return [
        (a["block"], b["block"])
        for a, b in itertools.combinations(info, 2)
        if a["stage"] == b["stage"] and (not same_kind or a.get("kind") == b.get("kind"))
    ]


def swapped_order(order: Sequence[int], pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """`order` after swapping the positions of each pair of blocks, one swap after another."""
    order = list(order)
    for a, b in pairs:
        i, j = order.index(a), order.index(b)
        order[i], order[j] = order[j], order[i]
    return tuple(order)


def tau(order: Sequence[int], reference: Sequence[int]) -> float:
    if list(order) == list(reference):
        return 1.0
    return float(kendalltau(reference, order).statistic)


class Reorder(LesionStudy):
    """swaps: numbers of random pair swaps; trials: random reorderings per number;
    same_kind: transformer sub-layers swap only with their own kind (attention, MLP)."""

    name = "reorder"

    def __init__(
        self,
        swaps: Sequence[int] = (0, 1, 2, 4, 8, 16, 32, 64),
        trials: int = 10,
        seed: int = 0,
        same_kind: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.same_kind = bool(same_kind)
        self.swaps = [int(k) for k in swaps]
        self.trials, self.seed = int(trials), int(seed)
        if not self.swaps or min(self.swaps) < 0 or self.trials < 1:
            raise ConfigError(
                "reorder needs a non-empty list of swaps >= 0 and trials >= 1, got "
                f"swaps={self.swaps} trials={self.trials}"
            )

    def check(self, net: Network) -> None:
        n_pairs = len(compatible_pairs(net, self.same_kind))
        if max(self.swaps) > n_pairs:
            raise ConfigError(
                f"reorder.swaps has {max(self.swaps)} swaps, but this network has only {n_pairs} "
                f"compatible pairs (same stage, no downsampling, same kind): use at most {n_pairs}"
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        pairs = compatible_pairs(net, self.same_kind)
        base = pl_module.eval_plan
        reference = base.sequence(net.n_blocks) if base is not None else range(net.n_blocks)
        rng = random.Random(self.seed)
        samples = []
        for k in self.swaps:
            for t in range(self.trials):
                order = swapped_order(reference, rng.sample(pairs, k))
                samples.append((k, t, order, tau(order, reference)))
        plans = [lesion_plan(base, order=order) for _, _, order, _ in samples]
        metric = self.measure(pl_module)
        baseline, values = self.evaluate(trainer, pl_module, plans)
        rows = pd.DataFrame(
            [
                {"swaps": k, "trial": t, "kendall_tau": tk, metric: v}
                for (k, t, _, tk), v in zip(samples, values)
            ]
        )
        rows = self.values(rows, metric, baseline)
        summary = {
            **self.baselines(metric, baseline),
            "per_swaps": self.headline(per_k, rows, metric, "swaps"),
            "trials": self.trials,
            "label": self.run_label(pl_module),
            "bn": self.bn,
        }
        figure = self.figure("reorder", metric)
        self.record(trainer, pl_module, rows, summary, figure, metric=metric)
