"""Cheap block-importance scores beside the real lesions (beyond the paper).

Per block, from one block-by-block pass per test batch (src/engines/importance.py): ShortGPT's
Block Influence 1 - cos(h_in, h_out), the relative contribution |f(h)| / |h| of the residual
branch, and the angular distance arccos(cos(h_in, h_out)) / pi; for every run of m consecutive
blocks, Gromov et al.'s angular distance between the stream before and after the run. The same
pass measures each block's single deletion (as `delete_single` does, with the lesion engine's
prefix reuse), per test example, and each score's Spearman rank correlation with that damage gets
a bootstrap confidence interval over test examples.

Writes `analysis/importance.{parquet,csv}` (the run's metadata columns, then
block,stage,downsampling, the three scores, the metric under the block's deletion (`error`, or
`loss` with perplexity), its `rise` over `baseline`, and `bn`; a transformer's sub-layers add
layer,kind), `analysis/angular_distance.{parquet,csv}` (first_block,last_block,m,
angular_distance), `analysis/importance_correlation.{parquet,csv}` (score,rho,low,high,blocks,
examples), the `importance` entry of `summary.json`, `importance.png` (each score against the
damage) and `angular_distance.png` (Gromov's heatmap).
"""

from __future__ import annotations

import functools
import math
from typing import Annotated

import pandas as pd

from src import figures, stats
from src.analysis.base import LesionStudy
from src.distributed import gather
from src.engines.importance import (
    SCORES,
    Scores,
    batch_scores,
    column_means,
    combine,
    spearman_ci,
)
from src.errors import ConfigError
from src.models.network import FULL, Network
from src.schema import NON_NEGATIVE, POSITIVE, Range
from src.studies import Study

RUNS_TABLE = "angular_distance"
CORRELATION_TABLE = "importance_correlation"


def score_rows(net: Network, scored: Scores, metric: str) -> pd.DataFrame:
    """One row per scored block: its info, the mean of each score, the metric under its deletion
    (when measured) and the rise over the unlesioned value."""
    info = net.block_info()
    means = {k: column_means(v) for k, v in scored.scores.items()}
    rows = []
    for j, i in enumerate(scored.blocks):
        row = {**info[i], **{k: float(means[k][j]) for k in SCORES}}
        if scored.deleted is not None:
            row[metric] = float(scored.deleted[:, j].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def correlations(scored: Scores, resamples: int, level: float, seed: int) -> pd.DataFrame:
    """Each score's Spearman rho with the damage of deleting the block, with its bootstrap CI."""
    damage = scored.deleted - scored.base[:, None]
    return pd.DataFrame(
        [
            {"score": k, **spearman_ci(scored.scores[k], damage, resamples, level, seed)}
            for k in SCORES
        ]
    )


class Importance(LesionStudy):
    """max_run: the longest run of consecutive blocks for the angular-distance heatmap (None:
    half the blocks); deletions: also measure each block's single deletion (needed for the
    correlations); resamples, level, seed: the bootstrap over test examples."""

    name = "importance"
    shardable = False  # its correlations need every example's scores in one place

    def __init__(
        self,
        max_run: Annotated[int, POSITIVE] | None = None,
        deletions: bool = True,
        resamples: Annotated[int, POSITIVE] = 1000,
        level: Annotated[float, Range(0, 1, open_low=True, open_high=True)] = 0.95,
        seed: Annotated[int, NON_NEGATIVE] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.bn != "eval":
            raise ConfigError(
                "importance scores the trained network as it is: use bn=eval (bn=recalibrate "
                "would re-estimate statistics per deletion; run delete_single for that)"
            )
        if max_run is not None and int(max_run) < 1 or int(resamples) < 1 or not 0 < level < 1:
            raise ConfigError(
                f"importance: max_run={max_run}, resamples={resamples}, level={level}: use "
                "max_run >= 1 (or null), resamples >= 1 and 0 < level < 1"
            )
        self.max_run = None if max_run is None else int(max_run)
        self.deletions, self.resamples = bool(deletions), int(resamples)
        self.level, self.seed = float(level), int(seed)

    def analyse(self, trainer, pl_module) -> None:
        from src.data import batches

        net = pl_module.net
        base = FULL if pl_module.eval_plan is None else pl_module.eval_plan
        metric = self.measure(pl_module)
        device = self.device or pl_module.device
        part = self.part()  # under DDP: the test batches round-robin over the ranks
        pieces = batch_scores(
            net,
            batches(trainer.datamodule, "test", device=device),
            base,
            device=device,
            metric=metric,
            max_run=self.max_run,
            deletions=self.deletions,
            reuse=self.reuse,
            owned=lambda b: b % part.ranks == part.rank,
        )
        scored = combine(net, base, gather(pieces, part.ranks), self.max_run)
        baseline = float(scored.base.mean())
        rows = score_rows(net, scored, metric)
        summary = {**self.baselines(metric, baseline), "label": self.run_label(pl_module)}
        if self.deletions:
            rows["rise"] = rows[metric] - baseline
            rows = self.values(rows, metric, baseline)
            corr = correlations(scored, self.resamples, self.level, self.seed)
            summary["spearman"] = {
                r.score: {"rho": r.rho, "low": r.low, "high": r.high} for r in corr.itertuples()
            }
            self.record(trainer, pl_module, corr, study=CORRELATION_TABLE, metric=metric)
        else:
            rows["baseline"], rows["bn"] = baseline, self.bn
        runs = pd.DataFrame(
            [
                {"first_block": a, "last_block": b, "m": m, "angular_distance": d}
                for (a, b, m), d in scored.runs.items()
            ]
        )
        self.record(
            trainer,
            pl_module,
            runs,
            figure=figures.angular_distance if len(runs) else None,
            study=RUNS_TABLE,
            metric=metric,
        )
        self.record(trainer, pl_module, rows, summary, STUDY.figure(metric), metric=metric)


def per_run_rho(t: pd.DataFrame, score: str, metric: str) -> float:
    """Spearman's rho across blocks of one run's table (the report's view, without the
    per-example bootstrap of the run's own `importance_correlation` table)."""
    s = t[[score, metric]].dropna()
    if len(s) < 3 or s[score].nunique() < 2 or s[metric].nunique() < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(s[score], s[metric]).statistic)


def headline(t: pd.DataFrame) -> str:
    metric = stats.table_metric(t)
    if metric not in t:
        return "scores only (no deletions measured)"
    parts = []
    for score in SCORES:
        rhos = [per_run_rho(r, score, metric) for _, r in t.groupby("run_dir")]
        rhos = [r for r in rhos if not math.isnan(r)]
        if rhos:
            parts.append(f"{score} {stats.fmt(*stats.mean_ci(rhos), pct=False)}")
    return "Spearman rho with the damage of deleting the block: " + "; ".join(parts)


STUDY = Study(
    name="importance",
    config="lesion/importance",
    columns=("block", "stage", "downsampling", *SCORES),
    figures={
        "error": functools.partial(figures.importance, metric="error"),
        "loss": functools.partial(figures.importance, metric="loss"),
    },
    headline=headline,
    title="Beyond the paper: cheap importance scores against real deletions",
    claim="(Not in the paper; ShortGPT, Gromov et al.) A block whose output barely differs from "
    "its input (low Block Influence, small angular distance) can be deleted with little damage: "
    "the scores rank blocks as their deletions do.",
)
