"""One block's residual branch at half strength, one block at a time (beyond the paper; the
worked example of CONTRIBUTING.md).

For each block i, `Plan(branch_scale=...)` multiplies that branch by
`factor` (0.5) and leaves every other block as trained. Deleting a block is factor 0; the
unraveled view predicts about half of deletion's damage when a block's paths add up linearly.
The lesion engine restarts at block i (a per-block field of `Plan.FIELDS`), as it does for a
deletion. Writes the table `analysis/half_strength.{parquet,csv}` (the run's metadata columns,
then block,stage,downsampling,error,baseline,bn; a transformer's sub-layers add layer,kind; a
language model's value column is `loss`, with perplexity), the `half_strength` entry of
`summary.json` and `half_strength.png`.
"""

from __future__ import annotations

import dataclasses
import functools

import pandas as pd

from src import figures, lm_figures, stats
from src.analysis.base import LesionStudy
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.studies import Study


def scaled_plan(base: Plan, n_blocks: int, block: int, factor: float) -> Plan:
    """`base` with block `block`'s residual branch multiplied by `factor` (on top of any branch
    scale of its own)."""
    scale = [base.block_scale("branch_scale", i) for i in range(n_blocks)]
    scale[block] *= factor
    return dataclasses.replace(base, branch_scale=tuple(scale))


class HalfStrength(LesionStudy):
    """blocks: the blocks to weaken one at a time (None: every block); factor: the multiplier of
    the weakened branch."""

    name = "half_strength"

    def __init__(self, blocks: list[int] | None = None, factor: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        self.factor = float(factor)

    def check(self, net: Network) -> None:
        if not all(b.has_shortcut for b in net.blocks):  # a plan that scales runs every branch
            raise ConfigError(
                f"half_strength scales residual branches, but this {type(net.blocks[0]).__name__} "
                "network has plain layers without a shortcut: use a residual network"
            )
        self.check_blocks(net)

    def lesions(self, net: Network, base: Plan) -> list[tuple[dict, Plan]]:
        info = net.block_info()
        blocks = self.blocks if self.blocks is not None else range(net.n_blocks)
        return [(info[i], scaled_plan(base, net.n_blocks, i, self.factor)) for i in blocks]

    def summarise(self, rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        return {
            "factor": self.factor,
            **self.rises(rows, metric, baseline),
        }


TITLE = "One residual branch at half strength"


STUDY = Study(
    name="half_strength",
    config="lesion/half_strength",
    columns=("block", "stage", "downsampling"),
    figures={
        "error": functools.partial(figures.per_block, verb="halved", title=TITLE),
        "loss": functools.partial(lm_figures.per_block, metric="loss", verb="halved", title=TITLE),
    },
    headline=stats.median_rise_headline,
    title="Beyond the paper: one residual branch at half strength",
    claim="(Not in the paper.) Weakening one branch removes no path, it only scales the paths "
    "through it: less damage than deleting the block.",
)
