"""Duplicating blocks at test time: a block run twice in place (beyond the paper; the authors'
own ImageNet lesion runs deleted, permuted and duplicated blocks, and "Transformer Layers as
Painters" repeats middle layers of language models).

For each block i that keeps its input's shape (not a downsampling block), the plan's order runs i
twice in a row: `Plan(order=(..., i, i, ...))`, the same network with nothing copied. The
unraveled view predicts mild damage: a repeated block only adds paths through a second copy of one
residual function, as deleting it only removes paths. Writes the table
`analysis/duplicate.{parquet,csv}` (the run's metadata columns, then
block,stage,downsampling,error,baseline,bn), the `duplicate` entry of `summary.json` and
`duplicate.png`.
"""

from __future__ import annotations

import lightning as L
import pandas as pd

from src import figures
from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network


def duplicated_order(sequence, block: int) -> tuple[int, ...]:
    """`sequence` with `block` run a second time right after itself."""
    out = []
    for i in sequence:
        out += [i, i] if i == block else [i]
    return tuple(out)


class Duplicate(LesionStudy):
    """blocks: the blocks to duplicate one at a time (None: every block that keeps its shape)."""

    name = "duplicate"

    def __init__(self, blocks: list[int] | None = None, **kwargs):
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

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        base = pl_module.eval_plan
        sequence = base.sequence(net.n_blocks) if base is not None else range(net.n_blocks)
        blocks = self.blocks if self.blocks is not None else self.eligible(net)
        plans = [lesion_plan(base, order=duplicated_order(sequence, i)) for i in blocks]
        baseline, errors = self.evaluate(trainer, pl_module, plans)
        info = net.block_info()
        rows = pd.DataFrame([{**info[i], "error": e} for i, e in zip(blocks, errors)])
        rows = self.values(rows, "error", baseline)  # baseline and bn, as every lesion study
        summary = {
            **self.baselines("error", baseline),
            "median_increase": float(rows.error.median() - baseline),
            "max_increase": float(rows.error.max() - baseline),
            "worst_block": int(rows.block[rows.error.idxmax()]),
            "label": self.run_label(pl_module),
            "bn": self.bn,
        }
        self.record(trainer, pl_module, rows, summary, figures.duplicate)
