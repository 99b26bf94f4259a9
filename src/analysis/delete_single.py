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

import pandas as pd

from src import claims, figures, lm_figures, stats
from src.analysis.base import LesionStudy
from src.engines.lesion import lesion_plan
from src.models.network import Network, Plan
from src.studies import Study


class DeleteSingle(LesionStudy):
    """blocks: the block indices to delete one at a time (None: every block)."""

    name = "delete_single"

    def __init__(self, blocks: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.blocks = None if blocks is None else [int(b) for b in blocks]

    def check(self, net: Network) -> None:
        self.check_blocks(net)

    def lesions(self, net: Network, base: Plan) -> list[tuple[dict, Plan]]:
        info = net.block_info()
        blocks = self.blocks if self.blocks is not None else range(net.n_blocks)
        return [(info[i], lesion_plan(base, [i])) for i in blocks]

    def summarise(self, rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        out = self.headline(stats.delete_single_headline, rows, metric, baseline)
        if "kind" in rows:  # transformer sub-layers: the mean per kind (attention, MLP)
            out[f"mean_{metric}_by_kind"] = rows.groupby("kind")[metric].mean().to_dict()
        return out


def headline(t: pd.DataFrame) -> str:
    rises = t.groupby("run_dir").apply(
        lambda r: stats.delete_single_headline(r, r.baseline.iloc[0])[
            "mean_increase_nondownsampling"
        ]
    )
    return (
        "mean error rise over baseline (non-downsampling blocks): "
        f"{stats.fmt(*stats.mean_ci(rises.tolist()))}"
    )


def resnet_single(runs, tables):
    t = claims.lesions(tables, plain=False)
    if t.empty:
        return None
    rise = t.groupby("run_dir").apply(
        lambda r: stats.delete_single_headline(r, r.baseline.iloc[0])[
            "median_increase_nondownsampling"
        ]
    )
    down = t[t.downsampling.astype(bool)]
    worst_down = down.error - down.baseline
    text = f"median rise {claims.pp(rise.mean())} ({claims.n_runs(len(rise))})"
    if len(worst_down):
        text += f"; downsampling blocks up to {claims.pp(worst_down.max())}"
    return text, bool(rise.mean() < 0.02)


def vgg_single(runs, tables):
    t = claims.lesions(tables, plain=True)
    if t.empty:
        return None
    low = t.error.min()
    return f"every deletion: error >= {100 * low:.1f}% (chance 90%)", bool(low > 0.5)


def stochastic_depth(runs, tables):
    if "downsampling" not in tables:
        return None
    t = tables[tables.downsampling.fillna(False).astype(bool)]
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
        f"downsampling deletions: {claims.pp(rise['stochastic_depth'])} (stochastic depth) vs "
        f"{claims.pp(rise['standard'])} (standard)"
    )
    return text, bool(rise["stochastic_depth"] < rise["standard"])


STUDY = Study(
    name="delete_single",
    config="lesion/delete_single",
    columns=("block", "stage", "downsampling"),
    figures={"error": figures.delete_single, "loss": lm_figures.delete_single},
    headline=headline,
    title="Fig. 3: deleting single blocks",
    claim="Deleting any single block other than a downsampling one leaves the test error close to "
    "the unlesioned network's (VGG, by contrast, drops to chance).",
    claims=(
        claims.Claim(
            "Fig. 3/4",
            "deleting one (non-downsampling) block of a ResNet has a minimal impact",
            "median rise over non-downsampling blocks < 2 pp",
            resnet_single,
        ),
        claims.Claim(
            "Fig. 3",
            "deleting any layer of VGG drops it to chance",
            "every deletion's error > 50%",
            vgg_single,
        ),
        claims.Claim(
            "Fig. 8",
            "stochastic depth mainly reduces the dependence on downsampling blocks",
            "deleting downsampling blocks hurts less after stochastic depth",
            stochastic_depth,
        ),
    ),
    section="4.1",
)
