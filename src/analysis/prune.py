"""Which k blocks to delete, by strategy, with optional healing (beyond the paper; ShortGPT,
Gromov et al., SLEB, LLM-Drop).

For k = 0..max_k, each strategy of src/engines/prune.py picks a set of units (blocks, or whole
layers with `unit=layer`) to delete: random sets (Fig. 5a's mean and spread), the k lowest by each
cheap score, the best contiguous run by angular distance, and SLEB's greedy search. The scores and
the greedy search read `calibration_batches` training batches (seeded, without augmentation),
never the test data; every chosen set is then measured on the test split with the exact lesion
engine. With `heal_steps > 0`, the pruned network of each strategy at each k of `heal_ks` is
fine-tuned for that many steps with the deleted blocks absent, and measured again (`healed`).

Writes `analysis/prune.{parquet,csv}` (the run's metadata columns, then
strategy,unit,k,trial,deleted,deleted_names, the metric (`error`, or `loss` with perplexity),
`healed` where healed, `baseline`, `bn`; `deleted`: space-separated 0-based block ids;
`deleted_names`: `<layer>.<kind>` of each for a transformer, else the block ids), the `prune`
entry of `summary.json` (greedy's order and search cost, the best strategy per k, the export's
path) and `prune.png`. Each healed network is kept as `analysis/prune/<strategy>_k<k>.ckpt` (the
network with fewer blocks, src/export.py `save_pruned`), which `train=false ckpt_path=` tests and
analyses like any run; `export_k` exports one strategy's set: a Hugging Face LM with whole layers
removed as a `save_pretrained` directory (src/export.py), any other network as a checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Annotated, Literal

import pandas as pd

from src import figures, stats
from src.analysis.base import LesionStudy
from src.distributed import evaluate
from src.engines import prune as search
from src.engines.importance import SCORES, block_scores
from src.engines.lesion import lesion_errors, lesion_plan
from src.errors import ConfigError
from src.models.network import FULL, Network, Plan
from src.schema import NON_NEGATIVE, POSITIVE
from src.studies import Study

UNITS = ("block", "layer")
log = logging.getLogger(__name__)


def names(net: Network, blocks) -> str:
    """`<layer>.<kind>` of each block of a transformer (e.g. "3.attn 5.mlp"), else the ids."""
    info = net.block_info()
    return " ".join(
        f"{info[b]['layer']}.{info[b]['kind']}" if "layer" in info[b] else str(b) for b in blocks
    )


class Prune(LesionStudy):
    """max_k: the largest number of units deleted; strategies: of src/engines/prune.py
    SEARCHES; trials, seed: random sets per k and their seed; unit: block or layer;
    calibration_batches: training batches the scores and the greedy search read; heal_steps,
    heal_ks, heal_lr: fine-tune each strategy's pruned network at these k for that many steps
    (0: no healing) at this learning rate (null: the run's own), with the run's optimizer;
    save_healed: keep each healed network as a checkpoint; export_k, export_strategy: export
    that strategy's set at that k (healed where healed; None: no export); search_metric: what
    the greedy search minimises on the calibration batches (loss, as SLEB's perplexity: the
    error of a trained network on training batches is mostly 0, a tie for most deletions)."""

    name = "prune"
    # under DDP each greedy round's candidates and the chosen sets' test evaluations split
    # across the ranks; healing and export run on rank 0. Not in shards: each greedy round
    # depends on the one before (jobs would have to meet every round).
    splits, shardable = True, False

    def __init__(
        self,
        max_k: Annotated[int, POSITIVE] = 8,
        strategies: list[Literal[search.SEARCHES]] = tuple(search.SEARCHES),
        trials: Annotated[int, POSITIVE] = 10,
        seed: Annotated[int, NON_NEGATIVE] = 0,
        unit: Literal[UNITS] = "block",
        calibration_batches: Annotated[int, POSITIVE] = 4,
        heal_steps: Annotated[int, NON_NEGATIVE] = 0,
        heal_ks: list[Annotated[int, POSITIVE]] = (),
        heal_lr: Annotated[float, POSITIVE] | None = None,
        save_healed: bool = True,
        export_k: Annotated[int, NON_NEGATIVE] | None = None,
        export_strategy: Literal[search.SEARCHES] = "greedy",
        search_metric: Literal["loss", "error"] = "loss",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.strategies = list(strategies)
        bad = [s for s in self.strategies if s not in search.SEARCHES]
        if bad or not self.strategies:
            raise ConfigError(
                f"prune.strategies has {bad[0] if bad else 'nothing'}: choose from "
                f"{', '.join(search.SEARCHES)}"
            )
        if unit not in UNITS:
            raise ConfigError(
                f"prune.unit={unit!r}: choose block or layer (every sub-layer of one)"
            )
        if int(max_k) < 1 or int(trials) < 1 or int(calibration_batches) < 1:
            raise ConfigError(
                f"prune: max_k={max_k}, trials={trials}, calibration_batches="
                f"{calibration_batches}: each must be >= 1"
            )
        if int(heal_steps) < 0 or heal_lr is not None and float(heal_lr) <= 0:
            raise ConfigError(
                f"prune: heal_steps={heal_steps}, heal_lr={heal_lr}: use heal_steps >= 0 "
                "(0: no healing) and a positive heal_lr (or null: the run's learning rate)"
            )
        self.max_k, self.trials, self.seed, self.unit = int(max_k), int(trials), int(seed), unit
        self.calibration_batches = int(calibration_batches)
        self.heal_steps, self.heal_ks = int(heal_steps), [int(k) for k in heal_ks]
        self.heal_lr = None if heal_lr is None else float(heal_lr)
        self.save_healed = bool(save_healed)
        self.export_k = None if export_k is None else int(export_k)
        self.export_strategy = export_strategy
        self.search_metric = search_metric
        if self.export_k is not None and export_strategy not in self.strategies:
            raise ConfigError(
                f"prune.export_strategy={export_strategy!r} is not among prune.strategies "
                f"({', '.join(self.strategies)}): export one of those"
            )
        if self.bn != "eval":
            raise ConfigError("prune measures the network as it is: use bn=eval")

    def check(self, net: Network) -> None:
        if not all(b.has_shortcut for b in net.blocks):
            raise ConfigError(
                f"prune deletes residual branches, but this {type(net.blocks[0]).__name__} "
                "network has plain layers without a shortcut: use a residual network"
            )
        n = len(search.units_of(net, self.unit))
        if self.max_k >= n:
            raise ConfigError(
                f"prune.max_k={self.max_k}, but this network has {n} {self.unit}s: use "
                f"max_k <= {n - 1}"
            )
        bad = [k for k in self.heal_ks if not 1 <= k <= self.max_k]
        if bad:
            raise ConfigError(f"prune.heal_ks has {bad[0]}: use ks in 1..max_k ({self.max_k})")
        if self.export_k is not None and not 0 <= self.export_k <= self.max_k:
            raise ConfigError(f"prune.export_k={self.export_k}: use 0..max_k ({self.max_k})")

    def choose(self, net: Network, base: Plan, calibration, metric: str, device) -> tuple:
        """(the chosen sets as (strategy, k, trial, blocks) rows, the greedy search or None)."""
        units = search.units_of(net, self.unit)
        ks = range(self.max_k + 1)
        chosen = []
        if "random" in self.strategies:
            for k, t, us in search.random_sets(len(units), ks, self.trials, self.seed):
                chosen.append(("random", k, t, search.blocks_of(units, us)))
        wanted = [s for s in self.strategies if s in (*SCORES, "angular_run")]
        if wanted:
            scored = block_scores(
                net, calibration, base, device=device, metric=metric,
                max_run=len(net.steps(base)), deletions=False,
            )  # fmt: skip
            for s in wanted:
                for k in ks:
                    us = search.best_run(scored, units, k) if s == "angular_run" else (
                        search.by_score(scored, units, s, k)
                    )  # fmt: skip
                    if us is not None or k == 0:
                        chosen.append((s, k, 0, search.blocks_of(units, us or [])))
        found = None
        if "greedy" in self.strategies:
            found = search.greedy(
                net, units, calibration, base, self.max_k, metric, self.reuse, device,
                self.progress, spread=functools.partial(self.spread, net),
            )  # fmt: skip
            for k in ks:
                chosen.append(("greedy", k, 0, search.blocks_of(units, found.order[:k])))
        return chosen, found

    def spread(self, net: Network, plans: list[Plan], base: Plan, measure) -> list[float]:
        """`measure(plans)` across this job's ranks, each its share by cost (on top of `base`)."""
        costs = [self.cost(net, base, plan) for plan in plans]
        got = evaluate(
            self.part(), costs, lambda items: dict(zip(items, measure([plans[i] for i in items])))
        )
        return [got[i] for i in range(len(plans))]

    def analyse(self, trainer, pl_module) -> None:
        from src.bn import training_batches

        net = pl_module.net
        base = FULL if pl_module.eval_plan is None else pl_module.eval_plan
        metric = self.measure(pl_module)
        device = self.device or pl_module.device
        calibration = list(
            training_batches(trainer.datamodule, self.calibration_batches, self.seed, device)
        )
        chosen, found = self.choose(net, base, calibration, self.search_metric, device)
        plans = [lesion_plan(base, blocks) for *_, blocks in chosen]
        baseline = []

        def measure(some: list[Plan]) -> list[float]:
            value, values = self.evaluate(trainer, pl_module, some)
            baseline.append(value)
            return values

        values = self.spread(net, plans, base, measure)
        [baseline] = baseline  # every rank measures it (and its own plans)
        if not getattr(trainer, "is_global_zero", True):  # rank 0 heals, exports and records
            return
        rows = pd.DataFrame(
            [
                {
                    "strategy": s,
                    "unit": self.unit,
                    "k": k,
                    "trial": t,
                    "deleted": " ".join(map(str, blocks)),
                    "deleted_names": names(net, blocks),
                    metric: v,
                }
                for (s, k, t, blocks), v in zip(chosen, values)
            ]
        )
        if self.heal_steps:
            rows["healed"] = self.healed(trainer, pl_module, chosen, metric)
        rows = self.values(rows, metric, baseline)
        summary = {
            **self.baselines(metric, baseline),
            "label": self.run_label(pl_module),
            "unit": self.unit,
            "best_per_k": best_per_k(rows, metric),
        }
        if self.export_k is not None:
            summary["export"] = self.export(trainer, pl_module, chosen)
        if found is not None:
            summary["greedy"] = {
                "order": [list(search.units_of(net, self.unit)[u]) for u in found.order],
                "calibration_values": found.values,
                "plans": found.plans,
                "seconds": found.seconds,
                "block_runs": found.block_runs,
                "naive_block_runs": found.naive_block_runs,
            }
        self.record(trainer, pl_module, rows, summary, STUDY.figure(metric), metric=metric)

    def healed(self, trainer, pl_module, chosen, metric: str) -> list[float]:
        """The test metric of each chosen set at a k of `heal_ks` after `heal_steps` of
        fine-tuning with its blocks absent (random: its first trial; NaN elsewhere), each healed
        network kept as `analysis/prune/<strategy>_k<k>.ckpt` (fewer blocks: `train=false
        ckpt_path=` analyses it like any other run)."""
        from src.data import batches
        from src.export import run_description, save_pruned
        from src.healing import heal

        recipe = pl_module.recipe
        lr = self.heal_lr or recipe.lr * recipe.gamma ** len(recipe.milestones)  # its last lr
        base = FULL if pl_module.eval_plan is None else pl_module.eval_plan
        device = self.device or pl_module.device
        out_dir = self.analysis_dir(trainer) / self.name
        todo = sum(1 for _, k, t, _ in chosen if k in self.heal_ks and t == 0)
        out = []
        for strategy, k, t, blocks in chosen:
            if k not in self.heal_ks or t != 0:
                out.append(math.nan)
                continue
            plan = lesion_plan(base, blocks)
            net = heal(
                pl_module.net,
                plan,
                trainer.datamodule,
                self.heal_steps,
                lr,
                optimizer=recipe.optimizer,
                seed=self.seed,
                weight_decay=recipe.weight_decay,
                momentum=recipe.momentum,
            )
            test = batches(trainer.datamodule, "test", device=device)
            value, _ = lesion_errors(net, [], test, base=plan, device=device, metric=metric)
            out.append(value)
            done = sum(1 for v in out if not math.isnan(v))
            log.info(
                "prune: healed %d/%d (%s, k=%d, %d steps): test %s %.4f",
                *(done, todo, strategy, k, self.heal_steps, metric, value),
            )
            if self.save_healed:
                out_dir.mkdir(parents=True, exist_ok=True)
                save_pruned(net, plan.deleted, out_dir / f"{strategy}_k{k}.ckpt",
                            run_description(trainer))  # fmt: skip
            if (strategy, k) == (self.export_strategy, self.export_k):
                self._export = net
        return out

    def export(self, trainer, pl_module, chosen) -> str | None:
        """The network of `export_strategy` at `export_k` (healed where it was healed), without
        its deleted blocks: a Hugging Face model's `save_pretrained` directory (whole layers
        only), else a checkpoint this project loads. Its path, for the summary."""
        from src.export import export_hf_network, run_description, save_pruned

        [blocks] = [
            b for s, k, t, b in chosen if (s, k, t) == (self.export_strategy, self.export_k, 0)
        ]
        net = getattr(self, "_export", None) or pl_module.net
        target = (
            self.analysis_dir(trainer)
            / self.name
            / f"export_{self.export_strategy}_k{self.export_k}"
        )
        from src.models.adapt import library_of

        source = getattr(net, "source", None)  # the model adapt() took apart
        if source is not None and library_of(source) == "transformers":  # save_pretrained
            return str(export_hf_network(net, blocks, target))
        base = FULL if pl_module.eval_plan is None else pl_module.eval_plan
        deleted = lesion_plan(base, blocks).deleted
        return str(save_pruned(net, deleted, target.with_suffix(".ckpt"), run_description(trainer)))


def best_per_k(rows: pd.DataFrame, metric: str) -> dict:
    """The strategy with the lowest metric at each k > 0 (random: its mean over trials)."""
    means = rows[rows.k > 0].groupby(["k", "strategy"])[metric].mean().reset_index()
    best = means.loc[means.groupby("k")[metric].idxmin()]
    return {
        int(r.k): {"strategy": r.strategy, metric: float(r[metric])} for _, r in best.iterrows()
    }


def headline(t: pd.DataFrame) -> str:
    metric = stats.table_metric(t)
    k = int(t.k.max())
    at = t[t.k == k].groupby("strategy")[metric].mean().sort_values()
    scale, unit = (100, "%") if metric == "error" else (1, "")
    parts = [f"{s} {v * scale:.2f}{unit}" for s, v in at.items()]
    return f"{metric} after deleting k={k}: " + ", ".join(parts)


STUDY = Study(
    name="prune",
    config="lesion/prune",
    columns=("strategy", "unit", "k", "trial", "deleted", "deleted_names"),
    figures={
        "error": functools.partial(figures.prune, metric="error"),
        "loss": functools.partial(figures.prune, metric="loss"),
    },
    headline=headline,
    title="Beyond the paper: which k blocks to delete (random, scores, greedy)",
    claim="(Not in the paper; SLEB, ShortGPT, Gromov et al.) Choosing which blocks to delete "
    "(greedily, or by a cheap score) keeps the metric far closer to the unpruned network's than "
    "random deletions of as many blocks.",
)
