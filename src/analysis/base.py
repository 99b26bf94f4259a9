"""What every post-training analysis callback shares: when it runs, where it writes, and the
run's metadata that goes into its table (src/results.py). The measuring itself is an engine's
(src/engines/); a callback builds plans, calls the engine, and records the table.

`LesionStudy` is the skeleton of every lesion study: a study supplies its plans (with each
plan's row fields) and its summary; the skeleton evaluates them, names the value column after
the metric, adds the baseline and bn mode, and records table, summary and figure (the study's
entry in src/studies.py). CONTRIBUTING.md walks through adding one.

Every analysis also runs during training when given `every_n_steps` (lesions across training):
on the current weights every N optimizer steps, with the network as tested, leaving training
untouched; its table gathers every step's rows (the `step` column) in one file."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from src import results
from src.distributed import Part, Shard, evaluate, parse_shard
from src.engines.lesion import check_metric, parse_memory
from src.errors import ConfigError
from src.models.network import FULL, Network, Plan
from src.schema import POSITIVE
from src.studies import registry, step_figure

log = logging.getLogger(__name__)


def run_meta(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """The run's metadata columns: what `src.run` recorded as the run's facts (model, data,
    training, seed, ...), the network's n_blocks and k, and the run id (the W&B run id)."""
    from src.rundir import wandb_id

    net = pl_module.net
    facts = dict(getattr(pl_module, "facts", None) or {})
    facts.setdefault("n_blocks", net.n_blocks)
    mode = getattr(pl_module, "mode", None)
    if mode is not None:
        facts.setdefault("k", mode.blocks_per_step(net.n_blocks))
    facts["run_id"] = wandb_id(trainer.default_root_dir)
    return facts


BASELINE_KEYS = ("baseline_error", "baseline_loss", "baseline_perplexity")


@contextmanager
def untouched(net: torch.nn.Module) -> Iterator[None]:
    """Within the block anything may be done to `net`; on exit its modules' train/eval flags,
    its device, its batch-norm buffers, the gradients of its parameters and every random
    generator (torch's CPU and CUDA ones, Python's, NumPy's) are back as they were."""
    import numpy as np

    flags = [(m, m.training) for m in net.modules()]
    device = next(net.parameters()).device
    buffers = [(b, b.detach().clone()) for b in net.buffers()]
    grads = [(p, None if p.grad is None else p.grad.clone()) for p in net.parameters()]
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.inference_mode(False), torch.no_grad():
                net.to(device)
                for b, saved in buffers:
                    b.copy_(saved)
                for p, g in grads:
                    p.grad = g
            for m, training in flags:
                m.training = training
            random.setstate(py)
            np.random.set_state(np_state)


@contextmanager
def as_tested(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """The network as testing sees it: a block-subset network with `test_mode=recalibrate` gets
    its batch-norm statistics re-estimated on the test-time batches `on_test_start` uses
    (src/module.py); they are put back on exit. Other networks are tested as they are."""
    mode = getattr(pl_module, "mode", None)
    n = getattr(mode, "bn_batches", None)
    if not n:
        yield
        return
    from src import bn, seeds

    seed = getattr(pl_module, "seed", None)
    seed = seeds.derive(seed if seed is not None else seeds.run_seed(), "bn")
    data = bn.training_batches(trainer.datamodule, n, seed, pl_module.device)
    with bn.recalibrated(pl_module.net, pl_module.eval_plan, data, n):
        yield


# the keywords every analysis takes, whatever its own constructor says (AnalysisCallback
# adds them to a subclass's signature, where src/schema.py finds them)
COMMON = (
    inspect.Parameter(
        "every_n_steps",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[int, POSITIVE] | None,
    ),
    inspect.Parameter("shard", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None),
)


def _check_every(every_n_steps, name: str) -> int | None:
    if every_n_steps is None:
        return None
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ConfigError(
            f"{name}.every_n_steps={every_n_steps!r}: pass a positive number of optimizer steps "
            "(or null: only after testing)"
        )
    return int(every_n_steps)


def _common(self, every_n_steps, shard) -> None:
    self.every_n_steps = _check_every(every_n_steps, self.name)
    self.shard = parse_shard(shard, self.name)
    if not self.shard.whole and not self.shardable:
        raise ConfigError(
            f"{self.name} cannot be cut into shards (its results are not a union of independent "
            f"rows): run it whole (leave {self.name}.shard null); "
            + ("under trainer=ddp it still splits across the ranks" if self.splits else "")
        )


def _taking_common_keys(init: Callable) -> Callable:
    """`init` with the keywords every analysis takes (`COMMON`, set after `init` ran), declared
    in its signature and annotations (src/schema.py checks config keys against them)."""

    @functools.wraps(init)
    def __init__(self, *args, every_n_steps: int | None = None, shard: str | None = None, **kw):
        init(self, *args, **kw)
        _common(self, every_n_steps, shard)

    signature = inspect.signature(init)
    ps = list(signature.parameters.values())
    at = next((i for i, p in enumerate(ps) if p.kind == p.VAR_KEYWORD), len(ps))
    __init__.__signature__ = signature.replace(parameters=[*ps[:at], *COMMON, *ps[at:]])
    __init__.__annotations__ = {
        **getattr(init, "__annotations__", {}),
        **{p.name: p.annotation for p in COMMON},
    }
    __init__.takes_common_keys = True
    return __init__


class AnalysisCallback(Callback):
    """Base of the post-training measurements: runs once testing ends (after fit, or on a loaded
    checkpoint with `train=false`) and writes into `<run dir>/analysis/`.

    every_n_steps: also run during fit, on the current weights, every N optimizer steps (and at
    step 0), as the final analysis does; None: only after testing. Every analysis takes it,
    whatever its own constructor says (`__init_subclass__` adds the keyword). The table's `step`
    column says which weights a row measured: the optimizer step (the final analysis: the
    trained network's, a checkpoint's own `global_step` with `train=false`), and each recording
    rewrites the table with every step's rows so far (a step measured again replaces its rows),
    so an interrupted run keeps what it had. A mid-fit analysis sees the network as tested (eval
    mode; block-subset `test_mode=recalibrate`: statistics re-estimated, then put back) and
    leaves training as it was: flags, device, batch-norm buffers and every random generator are
    restored, so the weights end bit-identical to a run without it.

    Under DDP a study that `splits` runs on every rank, each computing its `part()` of the
    work (src/distributed.py: plans, path chunks, test batches, balanced by cost) as plain
    PyTorch on `pl_module.net`; the ranks gather the results and rank 0 records them, equal bit
    for bit to a single-process run. Other studies run on global rank 0 only (the others wait).
    `shard=i/n` (a `shardable` study): this job computes the i-th of n parts and writes only
    its rows (`shard`, `item` columns); the sweep's report merges the n jobs' tables.
    Lightning calls `on_test_end` under inference mode; the analysis runs outside it, so that a
    study that moves the network (`net.to(device)`) leaves ordinary parameters behind, not
    inference tensors that a later analysis could not differentiate through.
    """

    name = "analysis"
    every_n_steps: int | None = None
    shard: Shard = Shard()
    splits = False  # True: every rank runs `analyse` on its `part()` of the work (see above)
    shardable = False  # True: `shard=i/n` computes one of n parts, merged by the report
    _fit_step: int | None = None  # the optimizer step of the last mid-fit analysis
    _in_fit = False  # a mid-fit analysis is running

    def __init__(self, every_n_steps: int | None = None, shard: str | None = None):
        _common(self, every_n_steps, shard)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "takes_common_keys", False):
            if "every_n_steps" not in inspect.signature(init).parameters:
                cls.__init__ = _taking_common_keys(init)

    def analysis_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "analysis"

    def runs_here(self, trainer: L.Trainer) -> bool:
        """Whether this rank runs `analyse`: every rank for a study that splits, else rank 0."""
        return self.splits or trainer.is_global_zero

    def part(self) -> Part:
        """This process's share of the study's work: its shard, and its rank's part of it
        (src/distributed.py); the whole study in one process."""
        return Part.here(self.shard) if self.splits else Part(self.shard)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.runs_here(trainer):
            with torch.inference_mode(False), self.quiet(not trainer.is_global_zero):
                self.analyse(trainer, pl_module)
        trainer.strategy.barrier("analysis")

    # --- during training ------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps and trainer.global_step == 0:
            self.analyse_during_fit(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._fit_step:
            self.analyse_during_fit(trainer, pl_module)  # once per step (gradient accumulation)

    def analyse_during_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`analyse` on the current weights at step `trainer.global_step` (on the ranks that
        `runs_here`), with the network as tested; training's state is put back afterwards (see
        the class docstring)."""
        self._fit_step = trainer.global_step
        if self.runs_here(trainer):
            self._in_fit, start = True, time.monotonic()
            try:
                with untouched(pl_module.net), as_tested(trainer, pl_module), self.quiet():
                    self.analyse(trainer, pl_module)
            finally:
                self._in_fit = False
            log.info("%s at step %d: %.1f s", self.name, self._fit_step, time.monotonic() - start)
        trainer.strategy.barrier("analysis")

    @contextmanager
    def quiet(self, when: bool = True) -> Iterator[None]:
        """No progress bar of its own while Lightning's training bar is live (or on a rank
        other than 0)."""
        had = "progress" in vars(self) and when
        old = vars(self).get("progress")
        if had:
            self.progress = False
        try:
            yield
        finally:
            if had:
                self.progress = old

    def step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """The optimizer step of the weights measured: mid-fit the trainer's; after testing the
        run's fact `step` (src/run.py: the trained network's, or the checkpoint's), else the
        trainer's global step; None where nothing says."""
        if self._in_fit:
            return int(self._fit_step)
        facts = getattr(pl_module, "facts", None) or {}
        if "step" in facts:
            return None if facts["step"] is None else int(facts["step"])
        step = getattr(trainer, "global_step", None)
        return None if step is None else int(step)

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def record(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        rows,
        summary: dict | None = None,
        figure=None,
        study: str | None = None,
        metric: str | None = None,
    ) -> pd.DataFrame:
        """The rows as this run's tidy table, written with summary and figure (src/results.py).
        `metric`: what the table's value column measures (the `metric` metadata column; None:
        error). The table on disk gathers every step's rows (`step`); a figure function draws
        the latest step's, unless it draws several steps itself (src/studies.py `step_figure`).
        Returns this call's rows. Only rank 0 writes. A shard (`shard=i/n`) writes its rows
        with the `shard` column (and the `item` column its rows carry) and a summary that says
        which shard it is; no figure: the sweep's report merges the shards and draws it."""
        study = study or self.name
        meta = run_meta(trainer, pl_module) | ({"metric": metric} if metric else {})
        meta["step"] = self.step(trainer, pl_module)
        table = results.tidy(study, rows, meta)
        if not getattr(trainer, "is_global_zero", True):
            return table
        if not self.shard.whole:
            table["shard"] = str(self.shard)
            kept = {k: v for k, v in (summary or {}).items() if k in BASELINE_KEYS}
            summary, figure = {"shard": str(self.shard), "rows": len(table), **kept}, None
        out = self.analysis_dir(trainer)
        steps = results.with_earlier_steps(out / study, table)
        label = self.run_label(pl_module)
        fig = step_figure(figure)(steps.assign(label=label)) if callable(figure) else figure
        # the run's unlesioned value (baseline_error; a language model's baseline_loss/perplexity)
        baselines = {k: v for k, v in (summary or {}).items() if k in BASELINE_KEYS}
        if baselines:
            results.update_json(out / "summary.json", baselines)
        results.record(out, study, steps, summary, fig, trainer.loggers)
        return table

    def run_label(self, pl_module: L.LightningModule) -> str:
        net = pl_module.net
        label = getattr(self, "label", None)
        label = label or f"{type(net.blocks[0]).__name__} ({net.n_blocks} blocks)"
        return label + (", BN re-estimated" if getattr(self, "bn", "eval") == "recalibrate" else "")


class LesionStudy(AnalysisCallback):
    """Base of the lesion callbacks: evaluates plans on the trained network's test split.

    A study fills in `lesions` (its plans, each with its row fields) and `summarise` (its
    headline numbers); `analyse` does the rest. Its table: the row fields, the value column named
    after the metric (`error`, or `loss` and `perplexity`), `baseline` (and
    `baseline_perplexity`), `bn`.

    reuse:      True: the exact reusing engine; False: a fresh forward per lesion (reference).
    device:     where the sweep runs (None: where the network is after testing).
    batch_size: test examples per engine batch (None: the data module's eval batch size).
    memory:     the engine's cache budget: bytes, "512MB", "4GB", "auto" (half the free device
                memory) or None (no limit); batches are split to fit, the values stay the same.
    progress:   show a progress bar over lesions.
    label:      how this run is named in plots that overlay several runs.
    bn:         "eval": the trained running statistics (the paper's lesions); "recalibrate":
                every lesion (and the unlesioned network) tested with batch-norm statistics
                re-estimated under it on `bn_batches` training batches (seeded, no augmentation),
                separating stale statistics from lost paths. Weights are never touched.
    bn_batches: training batches for the re-estimation.
    metric:     what a lesion is measured by (src/engines/lesion.py): "error" (classification
                error) or "loss" (mean cross-entropy per target, with its exp, `perplexity`);
                None: the module's own (`pl_module.metric`: loss for a language model, else
                error). The table's value column is named after it (`error` or `loss`).
    """

    BN_MODES = ("eval", "recalibrate")

    name = "lesion"
    splits = shardable = True  # its plans: independent, each evaluated alone

    def __init__(
        self,
        reuse: bool = True,
        device: str | None = None,
        batch_size: Annotated[int, POSITIVE] | None = None,
        progress: bool = True,
        label: str | None = None,
        bn: str = "eval",
        bn_batches: Annotated[int, POSITIVE] = 20,
        metric: str | None = None,
        memory: int | str | None = None,
    ):
        if batch_size is not None and int(batch_size) < 1:
            raise ConfigError(f"{self.name}.batch_size must be positive, got {batch_size}")
        if bn not in self.BN_MODES or int(bn_batches) < 1:
            raise ConfigError(
                f"{self.name}.bn={bn!r}, bn_batches={bn_batches}: choose bn=eval (trained "
                "statistics) or bn=recalibrate, with bn_batches >= 1"
            )
        self.reuse, self.device, self.progress, self.label = bool(reuse), device, progress, label
        self.batch_size = None if batch_size is None else int(batch_size)
        self.bn, self.bn_batches = bn, int(bn_batches)
        self.metric = None if metric is None else check_metric(metric)
        self.memory = parse_memory(memory)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the study's arguments against the network (and the device) before anything is
        trained: Lightning runs `setup` before fit, and before test on a loaded checkpoint."""
        self.check_device()
        self.check(pl_module.net)
        self.measure(pl_module)

    def measure(self, pl_module: L.LightningModule) -> str:
        """What this study measures: its own `metric`, else the module's (error by default)."""
        return check_metric(self.metric or getattr(pl_module, "metric", "error"))

    def values(self, rows: pd.DataFrame, metric: str, baseline: float) -> pd.DataFrame:
        """The study's rows (value column named `metric`) with the unlesioned `baseline`, for
        loss also `perplexity` (exp of the loss), and the bn mode."""
        return LesionStudy.valued(rows, metric, baseline, self.bn)

    @staticmethod
    def valued(rows: pd.DataFrame, metric: str, baseline: float, bn: str) -> pd.DataFrame:
        """`values` with the bn mode given (a report's merge of shards has no study object)."""
        if metric == "loss":
            rows["perplexity"] = rows["loss"].map(math.exp)
        rows["baseline"] = baseline
        if metric == "loss":
            rows["baseline_perplexity"] = math.exp(baseline)
        rows["bn"] = bn
        return rows

    @staticmethod
    def headline(fn: Callable, rows: pd.DataFrame, metric: str, *args) -> dict:
        """A src/stats.py headline (written for an `error` column) of the `metric` column, its
        keys renamed after the metric (baseline_error -> baseline_loss, ...)."""
        if metric == "error":
            return fn(rows, *args)
        out = fn(rows.rename(columns={metric: "error"}), *args)
        words = {"error": metric, "errors": metric + ("es" if metric.endswith("s") else "s")}
        return {"_".join(words.get(w, w) for w in k.split("_")): v for k, v in out.items()}

    @staticmethod
    def rises(rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        """Median and largest rise of the metric over baseline, and the block with the largest:
        the summary of a study with one row per block."""
        return {
            "median_increase": float(rows[metric].median() - baseline),
            "max_increase": float(rows[metric].max() - baseline),
            "worst_block": int(rows.block[rows[metric].idxmax()]),
        }

    def check_blocks(self, net: Network) -> None:
        """`self.blocks` (None: all) must be block indices of `net`."""
        bad = [b for b in self.blocks or [] if not 0 <= b < net.n_blocks]
        if bad:
            raise ConfigError(
                f"{self.name}.blocks has index {bad[0]}, but this network has blocks "
                f"0..{net.n_blocks - 1}: pass indices in that range (or null for all)"
            )

    @staticmethod
    def baselines(metric: str, baseline: float) -> dict:
        """The summary's unlesioned value(s): baseline_error, or baseline_loss and perplexity."""
        out = {f"baseline_{metric}": baseline}
        if metric == "loss":
            out["baseline_perplexity"] = math.exp(baseline)
        return out

    def lesions(self, net: Network, base: Plan) -> list[tuple[dict, Plan]]:
        """The study's lesions of `net` on the trained network's eval plan `base`: (the row's
        own fields, the plan) per lesion, in table order."""
        raise NotImplementedError

    def summarise(self, rows: pd.DataFrame, metric: str, baseline: float) -> dict:
        """The study's headline numbers of its rows (value column `metric`) for summary.json;
        the baselines, label and bn mode are added by `analyse`."""
        return {}

    def cost(self, net: Network, base: Plan, plan: Plan) -> int:
        """The blocks a plan's evaluation runs (with the head): from its restart position with
        the reusing engine, all of them for a fresh forward (reuse=false, bn=recalibrate)."""
        n = len(plan.sequence(net.n_blocks)) + 1
        if not self.reuse or self.bn == "recalibrate":
            return n
        start = net.restart(base, plan)
        return 1 if start is None else n - start

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        base = FULL if pl_module.eval_plan is None else pl_module.eval_plan
        lesions = self.lesions(net, base)  # checked in `setup`, before training
        metric = self.measure(pl_module)
        plans = [plan for _, plan in lesions]
        part = self.part()
        costs = [self.cost(net, base, plan) for plan in plans]

        def compute(items: list[int]) -> dict:  # this rank's plans, and the baseline
            baseline, values = self.evaluate(trainer, pl_module, [plans[i] for i in items])
            return {"baseline": baseline, **dict(zip(items, values, strict=True))}

        got = evaluate(part, costs, compute)
        item = not part.shard.whole  # a shard's rows say which of the study's rows they are
        rows = pd.DataFrame(
            [
                {**lesions[i][0], **({"item": i} if item else {}), metric: got[i]}
                for i in part.shard_items(costs)
            ]
        )
        baseline = got["baseline"]
        rows = self.values(rows, metric, baseline)
        summary = {
            **(self.summarise(rows, metric, baseline) if part.shard.whole else {}),
            **self.baselines(metric, baseline),
            "label": self.run_label(pl_module),
            "bn": self.bn,
        }
        study = registry().get(self.name)
        figure = study.figure(metric) if study is not None else None
        self.record(trainer, pl_module, rows, summary, figure, metric=metric)

    def check(self, net: Network) -> None:
        """Raise ConfigError when the study cannot apply to `net`."""

    def check_device(self) -> None:
        if self.device is None:
            return
        try:
            torch.empty(0, device=self.device)
        except Exception as err:  # unknown name, no such device, torch built without it
            reason = " ".join(str(err).split()).split(". ")[0][:100]  # its first sentence
            raise ConfigError(
                f"{self.name}.device={self.device!r} is not available here ({reason}): use "
                "device=null (where the network is) or cpu"
            ) from None

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, plans: Sequence[Plan]
    ) -> tuple[float, list[float]]:
        """(baseline, value per plan) of the study's metric (`measure`) on the test split; plans
        are built on eval_plan."""
        from src.data import batches
        from src.engines.lesion import lesion_errors, recalibrated_errors

        device = self.device or pl_module.device
        metric = self.measure(pl_module)
        test = batches(trainer.datamodule, "test", device=device)
        if self.bn == "recalibrate":
            from src.bn import training_batches

            seed = getattr(self, "seed", 0)
            train = list(training_batches(trainer.datamodule, self.bn_batches, seed, device))
            return recalibrated_errors(
                pl_module.net,
                plans,
                test,
                train,
                base=pl_module.eval_plan,
                device=device,
                progress=self.progress,
                description=f"{self.name} (BN re-estimated)",
                metric=metric,
            )
        return lesion_errors(
            pl_module.net,
            plans,
            test,
            base=pl_module.eval_plan,
            reuse=self.reuse,
            device=device,
            batch_size=self.batch_size,
            progress=self.progress,
            description=self.name,
            metric=metric,
            memory=self.memory,
        )
