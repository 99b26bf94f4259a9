"""Duplicating blocks at test time: a block run twice in place (beyond the paper; the authors'
own ImageNet lesion runs deleted, permuted and duplicated blocks, and "Transformer Layers as
Painters" repeats middle layers of language models).

For each block i that keeps its input's shape (not a downsampling block), the plan's order runs i
twice in a row: `Plan(order=(..., i, i, ...))`, the same network with nothing copied. The
unraveled view predicts mild damage: a repeated block only adds paths through a second copy of one
residual function, as deleting it only removes paths. Writes the table
`analysis/duplicate.{parquet,csv}` (the run's metadata columns, then
block,stage,downsampling,error,baseline,bn; a transformer's sub-layers add layer,kind; a
language model's value column is `loss`, with perplexity), the `duplicate` entry of
`summary.json` and `duplicate.png`.
"""

from __future__ import annotations

from typing import Annotated

import pandas as pd

from src import figures, lm_figures, stats
from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.schema import NON_NEGATIVE
from src.studies import Study


def duplicated_order(sequence, block: int) -> tuple[int, ...]:
    """`sequence` with `block` run a second time right after itself."""
    out = []
    for i in sequence:
        out += [i, i] if i == block else [i]
    return tuple(out)


class Duplicate(LesionStudy):
    """blocks: the blocks to duplicate one at a time (None: every block that keeps its shape)."""

    name = "duplicate"

    def __init__(self, blocks: list[Annotated[int, NON_NEGATIVE]] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.blocks = None if blocks is None else [int(b) for b in blocks]

    def eligible(self, net: Network) -> list[int]:
        return [b["block"] for b in net.block_info() if not b["downsampling"]]

    def check(self, net: Network) -> None:
        ok = set(self.eligible(net))
        bad = [b for b in self.blocks or [] if b not in ok]
        if bad:
            raise ConfigError(
                f"duplicate.blocks has {bad[0]}, which changes its input's shape (a downsampling "
                f"block) or is not a block of this network: pick from {sorted(ok)}"
            )

    def lesions(self, net: Network, base: Plan) -> list[tuple[dict, Plan]]:
        sequence = base.sequence(net.n_blocks)
        info = net.block_info()
        blocks = self.blocks if self.blocks is not None else self.eligible(net)
        return [(info[i], lesion_plan(base, order=duplicated_order(sequence, i))) for i in blocks]

    def summarise(self, rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        return self.rises(rows, metric, baseline)


STUDY = Study(
    name="duplicate",
    config="lesion/duplicate",
    columns=("block", "stage", "downsampling"),
    figures={"error": figures.duplicate, "loss": lm_figures.duplicate},
    headline=stats.median_rise_headline,
    title="Beyond the paper: duplicating single blocks",
    claim="(Not in the paper.) The unraveled view predicts mild damage: a block run twice adds "
    "paths through a second copy of one residual function.",
)
