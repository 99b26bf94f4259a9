"""Reordering blocks at test time (paper Sec. 4.3, Fig. 5b): error grows smoothly as Kendall's tau
between the trained and the executed block order falls.

For each k in `swaps`, `trials` times: k distinct random pairs of shape-compatible blocks (same
stage, downsampling blocks excluded, as in the paper; transformer sub-layers of the same kind)
swap their positions one after another. Writes the table `analysis/reorder.{parquet,csv}` (the
run's metadata columns, then swaps,trial,kendall_tau,error,baseline,bn; a language model's value
column is `loss`, with perplexity), the `reorder` entry of `summary.json` (mean tau and error per
number of swaps) and `reorder.png` (error vs tau).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Annotated

import pandas as pd
from scipy.stats import kendalltau

from src import claims, figures, lm_figures, stats
from src.analysis.base import LesionStudy
from src.analysis.delete_many import smooth_headline
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.schema import NON_NEGATIVE, POSITIVE
from src.studies import Study


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
        swaps: Sequence[Annotated[int, NON_NEGATIVE]] = (0, 1, 2, 4, 8, 16, 32, 64),
        trials: Annotated[int, POSITIVE] = 10,
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

    def lesions(self, net: Network, base: Plan) -> list[tuple[dict, Plan]]:
        pairs = compatible_pairs(net, self.same_kind)
        reference = base.sequence(net.n_blocks)
        rng = random.Random(self.seed)
        out = []
        for k in self.swaps:
            for t in range(self.trials):
                order = swapped_order(reference, rng.sample(pairs, k))
                row = {"swaps": k, "trial": t, "kendall_tau": tau(order, reference)}
                out.append((row, lesion_plan(base, order=order)))
        return out

    def summarise(self, rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        return {
            "per_swaps": self.headline(stats.per_k, rows, metric, "swaps"),
            "trials": self.trials,
        }


def reorder_smooth(runs, tables):
    t = claims.lesions(tables, plain=False)
    if t.empty or t.swaps.nunique() < 3:
        return None
    order_tau = kendalltau(t.kendall_tau, t.error).statistic
    step = t.groupby("run_dir").apply(lambda r: stats.largest_step(r, "swaps")).mean()
    text = f"Kendall tau(order tau, error) = {order_tau:.2f}; largest step {claims.pp(step)}"
    return text, bool(order_tau < 0 and step < 0.15)


STUDY = Study(
    name="reorder",
    config="lesion/reorder",
    columns=("swaps", "trial", "kendall_tau"),
    figures={"error": figures.reorder, "loss": lm_figures.reorder},
    headline=lambda t: smooth_headline(t, "swaps"),
    title="Fig. 5b: reordering blocks",
    claim="Error grows smoothly as more blocks are swapped (Kendall tau falls).",
    claims=(
        claims.Claim(
            "Fig. 5b",
            "error grows smoothly as blocks are reordered (Kendall tau falls)",
            "error falls with tau (Kendall tau < 0), largest step < 15 pp",
            reorder_smooth,
        ),
    ),
    section="4.3",
)
