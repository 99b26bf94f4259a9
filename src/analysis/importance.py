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

import dataclasses
import functools
import math
from typing import Annotated

import pandas as pd

from src import figures, results, stats
from src.analysis.base import LesionStudy
from src.distributed import gather
from src.engines.importance import (
    SCORES,
    Scores,
    batch_scores,
    column_means,
    combine,
    combine_pieces,
    run_key,
    spearman_ci,
)
from src.errors import ConfigError
from src.models.network import BLOCK_INFO, FULL
from src.schema import NON_NEGATIVE, POSITIVE, Range
from src.studies import Study

RUNS_TABLE = "angular_distance"
CORRELATION_TABLE = "importance_correlation"


def score_rows(info, scored: Scores, metric: str) -> pd.DataFrame:
    """One row per scored block: its info (info[block]: a Network.block_info row), the mean of each
    score, the metric under its deletion (when measured) and the rise over the unlesioned value."""
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """What turns one run's scores into its tables (the study's keys; a shard's rows carry them
    for the report's merge)."""

    metric: str
    deletions: bool
    resamples: int
    level: float
    bootstrap_seed: int
    bn: str = "eval"


def tables_of(info, scored: Scores, how: Settings) -> tuple[dict, dict]:
    """({table: rows}, summary) of one run's scores: `importance`, `angular_distance` and, with
    deletions, `importance_correlation`; the same for a whole run and for merged shards."""
    metric, baseline = how.metric, float(scored.base.mean())
    rows = score_rows(info, scored, metric)
    summary = LesionStudy.baselines(metric, baseline)
    out = {}
    if how.deletions:
        rows["rise"] = rows[metric] - baseline
        rows = LesionStudy.valued(rows, metric, baseline, how.bn)
        corr = correlations(scored, how.resamples, how.level, how.bootstrap_seed)
        summary["spearman"] = {
            r.score: {"rho": r.rho, "low": r.low, "high": r.high} for r in corr.itertuples()
        }
        out[CORRELATION_TABLE] = corr
    else:
        rows["baseline"], rows["bn"] = baseline, how.bn
    out[RUNS_TABLE] = pd.DataFrame(
        [
            {"first_block": a, "last_block": b, "m": m, "angular_distance": d}
            for (a, b, m), d in scored.runs.items()
        ]
    )
    out[STUDY.name] = rows
    return out, summary


# --- shards: a shard's per-example rows, and the report's merge of them -----------------------

EXAMPLE = ("batch", "example")  # a shard's row: one test example (of one batch) and block
UNLESIONED = "unlesioned"  # the example's metric under the base plan
RUN_SUM = "angular_distance_sum"  # a batch's sum over its examples of a run's distance


def shard_tables(info, pieces: dict[int, dict], key, how: Settings) -> dict:
    """A shard's pieces (its test batches) as rows the report can merge: one per (batch,
    example, block) with the scores, the example's metric under the block's deletion and
    unlesioned, and the settings; one per (batch, run) with the sum of its distances."""
    settings = {k: v for k, v in dataclasses.asdict(how).items() if k != "metric"}  # META's
    rows, runs = [], []
    for b, p in sorted(pieces.items()):
        for e in range(p["n"]):
            base = {"batch": b, "example": e, UNLESIONED: float(p["base"][e])}
            for j, i in enumerate(p["blocks"]):
                row = {**base, **info[i], **{k: float(p["scores"][k][e, j]) for k in SCORES}}
                if p["deleted"] is not None:
                    row[how.metric] = float(p["deleted"][e, j])
                rows.append(row | settings)
        for k, total in p["runs"].items():
            first, last, m = key(k)
            runs.append(
                {"batch": b, "first_block": first, "last_block": last, "m": m, RUN_SUM: total}
            )
    return {STUDY.name: pd.DataFrame(rows), RUNS_TABLE: pd.DataFrame(runs)}


def merge(tables: dict) -> dict:
    """The shards' per-example rows (`shard=i/n`) as the unsharded tables: the pieces of every
    batch rebuilt, combined in batch order and turned into tables as one process does."""
    import torch

    t = tables.get(STUDY.name)
    if t is None or "example" not in t:
        return tables
    t = t.sort_values(list(EXAMPLE), kind="stable")  # a batch's rows stay in block order
    twice = t.duplicated([*EXAMPLE, "block"])
    if twice.any():
        b = int(t.batch[twice].iloc[0])
        raise ConfigError(f"the shards of importance overlap (test batch {b} in two of them)")
    first = t.iloc[0]
    how = Settings(
        str(first.get("metric", "error")),
        bool(first.deletions),
        int(first.resamples),
        float(first.level),
        int(first.bootstrap_seed),
        str(first.bn),
    )
    runs = tables.get(RUNS_TABLE, pd.DataFrame(columns=["batch"]))
    pieces = {}
    for b, tb in t.groupby("batch", sort=True):
        blocks = [int(i) for i in dict.fromkeys(tb.block)]
        n = len(tb) // len(blocks)

        def col(c, tb=tb, n=n):
            return torch.from_numpy(tb[c].to_numpy(dtype="float64").reshape(n, -1))

        rb = runs[runs.batch == b]
        pieces[int(b)] = {
            "blocks": blocks,
            "n": n,
            "scores": {k: col(k) for k in SCORES},
            "base": col(UNLESIONED)[:, 0],
            "deleted": col(how.metric) if how.deletions else None,
            "runs": {
                (int(r.first_block), int(r.last_block), int(r.m)): float(getattr(r, RUN_SUM))
                for r in rb.itertuples()
            },
        }
    kept = [c for c in BLOCK_INFO if c in t]
    info = {int(r["block"]): r for r in t.drop_duplicates("block")[kept].to_dict("records")}
    out, _ = tables_of(info, combine_pieces(pieces), how)
    front = [c for c in t.columns if c in results.META or c in ("run_dir", "shard")]
    merged = dict(tables)
    for name, rows in out.items():
        meta = t[front].iloc[[0] * len(rows)].reset_index(drop=True).assign(study=name)
        merged[name] = pd.concat([meta, rows.reset_index(drop=True)], axis=1)
    return merged


class Importance(LesionStudy):
    """max_run: the longest run of consecutive blocks for the angular-distance heatmap (None:
    half the blocks); deletions: also measure each block's single deletion (needed for the
    correlations); resamples, level, seed: the bootstrap over test examples. Under DDP and in
    shards (`shard=i/n`) the test batches go round robin to the shards, then to the ranks; a
    shard writes per-example rows, merged by the sweep's report."""

    name = "importance"
    shardable = True  # its batches: each one's scores its own

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
        part = self.part()
        pieces = batch_scores(
            net,
            batches(trainer.datamodule, "test", device=device),
            base,
            device=device,
            metric=metric,
            max_run=self.max_run,
            deletions=self.deletions,
            reuse=self.reuse,
            owned=part.owns,
        )
        pieces = gather(pieces, part.ranks)
        if not pieces and not part.shard.whole:
            raise ConfigError(
                f"importance.shard={part.shard}: this shard has no test batch (batches go round "
                f"robin to the {part.shard.count} shards): use fewer shards or a smaller "
                "data.eval_batch_size"
            )
        how = Settings(metric, self.deletions, self.resamples, self.level, self.seed, self.bn)
        info = net.block_info()  # indexed by block
        if part.shard.whole:
            out, summary = tables_of(info, combine(net, base, pieces), how)
        else:
            out, summary = shard_tables(info, pieces, run_key(net, base), how), {}
        summary["label"] = self.run_label(pl_module)
        for name in (CORRELATION_TABLE, RUNS_TABLE):
            if name in out:
                runs = name == RUNS_TABLE and len(out[name])
                figure = figures.angular_distance if runs else None
                self.record(trainer, pl_module, out[name], figure=figure, study=name, metric=metric)
        self.record(
            trainer, pl_module, out[self.name], summary, STUDY.figure(metric), metric=metric
        )


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
    merge=merge,
)
