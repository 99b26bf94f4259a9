"""Deleting individual blocks at test time (paper Sec. 4.1, Figs 3, 4 and 8).

For each block i the residual branch is removed and the shortcut kept (identity, or the
downsampling projection with the pre-activation feeding it); for VGG the layer becomes the
identity (keeping its pool). Writes the table `analysis/delete_single.{parquet,csv}` (the run's
metadata columns, then block,stage,downsampling,error,baseline; a transformer's sub-layer blocks
add layer,kind; a language model's value column is `loss`, with perplexity and
baseline_perplexity beside it), the `delete_single` entry of
`summary.json` and `delete_single.png`. A sweep's overlay of every run (ResNet and VGG, or
standard and stochastic-depth training) is drawn once, when the sweep ends, by the aggregator
(`python -m src.report <sweep dir>`, src/report.py).
"""

from __future__ import annotations

import lightning as L
import pandas as pd

from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.errors import ConfigError
from src.models.network import Network
from src.stats import delete_single_headline


class DeleteSingle(LesionStudy):
    """blocks: the block indices to delete one at a time (None: every block)."""

    name = "delete_single"

    def __init__(self, blocks: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.blocks = None if blocks is None else [int(b) for b in blocks]

    def check(self, net: Network) -> None:
        bad = [b for b in self.blocks or [] if not 0 <= b < net.n_blocks]
        if bad:
            raise ConfigError(
                f"delete_single.blocks has index {bad[0]}, but this network has blocks "
                f"0..{net.n_blocks - 1}: pass indices in that range (or null for all)"
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        info = net.block_info()
        blocks = self.blocks if self.blocks is not None else list(range(net.n_blocks))
        plans = [lesion_plan(pl_module.eval_plan, [i]) for i in blocks]
        metric = self.measure(pl_module)
        baseline, values = self.evaluate(trainer, pl_module, plans)
        rows = pd.DataFrame([{**info[i], metric: v} for i, v in zip(blocks, values)])
        rows = self.values(rows, metric, baseline)
        summary = {
            **self.headline(delete_single_headline, rows, metric, baseline),
            **self.baselines(metric, baseline),
            "label": self.run_label(pl_module),
            "bn": self.bn,
        }
        if "kind" in rows:  # transformer sub-layers: the mean per kind (attention, MLP)
            summary[f"mean_{metric}_by_kind"] = rows.groupby("kind")[metric].mean().to_dict()
        figure = self.figure("delete_single", metric)
        self.record(trainer, pl_module, rows, summary, figure, metric=metric)
