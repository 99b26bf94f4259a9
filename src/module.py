"""The LightningModule: a `Network`, a training mode that hands it a plan per step, and the paper's
CIFAR recipe (He et al. 2016): SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k
and 48k iterations, 64k iterations, lr 0.01 for the first 400 iterations (ResNet-110 warm-up).

The draws of training step t (the mode's plan, stochastic depth) come from (seed, t)
(`src/seeds.py`): the same on every DDP rank, and again the same when a resumed run redoes step t.

Test time follows the mode's rule (`src/training.py`): one plan (`eval_plan`), batch-norm
statistics re-estimated before testing (`bn_batches`, `src/bn.py`), or an ensemble of plans whose
softmax is averaged; then `test/error_m<m>` is the error of the first m members' average.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from src import bn, precision, seeds
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.schema import NON_NEGATIVE, POSITIVE, Range
from src.training import RequeueBetweenSteps, Standard, TrainingMode


class StepSchedule:
    """lr factor per optimizer step: warm-up, then x gamma at each milestone (picklable)."""

    def __init__(
        self,
        lr: float,
        milestones: Sequence[int],
        gamma: float,
        warmup_steps: int,
        warmup_lr: float,
    ):
        self.lr, self.milestones, self.gamma = lr, sorted(int(m) for m in milestones), gamma
        self.warmup_steps, self.warmup_lr = warmup_steps, warmup_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr / self.lr
        return self.gamma ** sum(step >= m for m in self.milestones)


Optimizer = Literal["sgd", "adamw"]
OPTIMIZERS = typing.get_args(Optimizer)


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={name}: choose one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class Recipe:
    """The optimizer and its lr schedule (`optim.*`), for every LightningModule here: the paper's
    SGD (weight decay on every parameter), or AdamW for transformers (decay on matrices only, not
    on norms, biases and the like); warm-up, then lr x gamma at each milestone. The defaults are
    the paper's CIFAR recipe (module docstring)."""

    optimizer: Optimizer = "sgd"
    lr: Annotated[float, POSITIVE] = 0.1
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4
    momentum: Annotated[float, NON_NEGATIVE] = 0.9
    nesterov: bool = False
    betas: Sequence[Annotated[float, Range(0, 1, open_high=True)]] = (0.9, 0.999)
    milestones: Sequence[Annotated[int, NON_NEGATIVE]] = (32000, 48000)
    gamma: Annotated[float, POSITIVE] = 0.1
    warmup_steps: Annotated[int, NON_NEGATIVE] = 400
    warmup_lr: Annotated[float, NON_NEGATIVE] = 0.01

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.lr must be positive; weight_decay and warmup_steps >= 0")
        check_optimizer(self.optimizer)

    def make_optimizer(self, module: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
        """`fused`: one kernel per step (CUDA)."""
        extra = {"fused": True} if fused else {}
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                module.parameters(),
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                nesterov=self.nesterov,
                **extra,
            )
        decay = [p for p in module.parameters() if p.ndim >= 2]
        rest = [p for p in module.parameters() if p.ndim < 2]
        groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
        betas = tuple(self.betas)
        return torch.optim.AdamW(
            groups, lr=self.lr, weight_decay=self.weight_decay, betas=betas, **extra
        )

    def configure(self, module: L.LightningModule) -> dict:
        """What `configure_optimizers` returns: the optimizer, the schedule stepped per batch."""
        opt = self.make_optimizer(module, fused=module.device.type == "cuda")
        schedule = StepSchedule(
            self.lr, self.milestones, self.gamma, self.warmup_steps, self.warmup_lr
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _log(probs: torch.Tensor) -> torch.Tensor:
    """Logits of an averaged prediction (finite where a probability underflowed to 0)."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class Classifier(L.LightningModule):
    inputs = "images"  # checked against the network and the data (src/errors.py: check_pairing)

    def __init__(
        self,
        net: Network,
        mode: TrainingMode | None = None,
        num_classes: int = 10,
        **optim,
    ):
        """`optim`: the `Recipe`'s settings (`optim.*`; defaults: the paper's recipe)."""
        super().__init__()
        self.recipe = Recipe(**optim)
        self.net = net
        self.mode = mode or Standard()
        self.mode.check(net)
        self.seed: int | None = None  # the run's seed, set in `setup`
        names = ["train_acc", "val_acc", "test_acc"]
        names += [f"test_acc_m{m}" for m in self.mode.ensemble_sizes()]  # one per m: DDP-synced
        self.metrics = torch.nn.ModuleDict(
            {  # argument checks off: they run torch.unique (a host sync) on every update
                name: MulticlassAccuracy(num_classes, average="micro", validate_args=False)
                for name in names
            }
        )
        self._members: tuple[int, list[Plan]] | None = None  # (seed, ensemble plans)

    @property
    def eval_plan(self) -> Plan | None:
        """The plan of the trained network at test time (what lesions start from). A ConfigError
        for test_mode=ensemble, which no single plan expresses (see `BlockSubset.eval_plan`)."""
        return self.mode.eval_plan(self.net.n_blocks)

    def ensemble_plans(self) -> list[Plan] | None:
        """The test-time ensemble's members (None: the mode tests one network)."""
        seed = self.seed
        if seed is None:  # outside a Trainer: one draw, kept
            seed = self._members[0] if self._members else seeds.run_seed()
        if self._members is None or self._members[0] != seed:
            self._members = (seed, self.mode.ensemble_plans(self.net.n_blocks, seed))
        return self._members[1]

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        """Logits of the network under `plan`, else as tested: for an ensemble, the log of the
        members' average softmax (logits of the averaged prediction)."""
        if plan is not None:
            return self.net(x, plan)
        members = self.ensemble_plans()
        if members is None:
            return self.net(x, self.eval_plan)
        return _log(self._ensemble(x, members)[-1][1])

    def _ensemble(self, x: torch.Tensor, members: list[Plan]) -> list[tuple[int, torch.Tensor]]:
        """(m, average softmax of the first m members) for every reported m (the last: all)."""
        sizes, total, out = set(self.mode.ensemble_sizes()) | {len(members)}, 0.0, []
        for m, plan in enumerate(members, 1):
            total = total + F.softmax(self.net(x, plan), dim=1, dtype=torch.float32)
            if m in sizes:
                out.append((m, total / m))
        return out

    def setup(self, stage: str) -> None:
        self.seed = seeds.run_seed(self.trainer)  # every rank calls setup: a seed=null is shared
        analyses = [c for c in self.trainer.callbacks if hasattr(c, "analyse")]
        if analyses and self.mode.ensemble_sizes():  # refused before training, not after it
            self.mode.eval_plan(self.net.n_blocks)  # its ConfigError names the fix

    def on_test_start(self) -> None:
        """Re-estimate batch-norm statistics for the tested network (test_mode=recalibrate):
        the same seeded training batches on every rank, so every rank gets the same statistics.
        They stay in place after testing (for the analyses that follow); the checkpoint that
        `src.run` saved before testing keeps those of training."""
        if self.mode.bn_batches:
            seed = seeds.derive(self.seed if self.seed is not None else seeds.run_seed(), "bn")
            data = bn.training_batches(
                self.trainer.datamodule, self.mode.bn_batches, seed, self.device
            )
            bn.recalibrate(self.net, self.eval_plan, data, self.mode.bn_batches)

    def configure_callbacks(self):
        return [RequeueBetweenSteps()] if self.trainer.state.fn == "fit" else []

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        cuda = x.device.type == "cuda"
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        seed = seeds.run_seed() if self.seed is None else self.seed
        with seeds.seeded(seeds.derive(seed, "blocks", self.global_step), x.device):
            logits = self.net(x, self.mode.train_plan(self.net.n_blocks))
        loss = F.cross_entropy(logits, y)
        self.metrics["train_acc"].update(logits, y)
        # On a GPU the loss stays off the progress bar: its refresh reads the value every batch
        # (a host sync); loggers read it every log_every_n_steps.
        self.log("train/loss", loss, prog_bar=not cuda)
        trainer = self._trainer
        if trainer is not None and self.global_step % max(trainer.log_every_n_steps, 1) == 0:
            # a Python float becomes a device tensor when logged: only on the steps that log
            self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_fit_start(self) -> None:
        """On a GPU: cuDNN picks its fastest kernels for the (fixed) shapes, and the network
        computes in channels_last (the layout tensor cores read)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.net.to(memory_format=torch.channels_last)

    def _eval_step(self, batch, split: str):
        x, y = batch
        members = self.ensemble_plans() if split == "test" else None
        if members is None:
            plan = self.eval_plan if split == "test" else self.mode.val_plan(self.net.n_blocks)
            logits = self.net(x, plan)
        else:
            averages = self._ensemble(x, members)
            for m, probs in averages:
                self.metrics[f"test_acc_m{m}"].update(probs, y)
            logits = _log(averages[-1][1])  # the whole ensemble's prediction
        self.metrics[f"{split}_acc"].update(logits, y)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), sync_dist=True)

    def _epoch_end(self, split: str) -> None:
        metric = self.metrics[f"{split}_acc"]
        if not metric.update_called:  # an epoch resumed at its end: no batches in this process
            return
        acc = metric.compute()  # synced across DDP ranks by torchmetrics
        metric.reset()
        self.log(f"{split}/acc", acc)
        self.log(f"{split}/error", 1.0 - acc, prog_bar=split != "test")

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")
        for m in self.mode.ensemble_sizes():
            metric = self.metrics[f"test_acc_m{m}"]
            if metric.update_called:
                self.log(f"test/error_m{m}", 1.0 - metric.compute())  # synced across ranks
                metric.reset()

    def validation_step(self, batch, batch_idx: int):
        with precision.evaluating(self.device):
            self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int):
        with precision.evaluating(self.device):
            self._eval_step(batch, "test")

    def configure_optimizers(self):
        return self.recipe.configure(self)
