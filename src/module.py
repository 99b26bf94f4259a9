"""The LightningModule: a `Network`, a training mode that hands it a plan per step, and the paper's
CIFAR recipe (He et al. 2016): SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k
and 48k iterations, 64k iterations, lr 0.01 for the first 400 iterations (ResNet-110 warm-up).

The draws of training step t (the mode's plan, stochastic depth) come from (seed, t)
(`src/seeds.py`): the same on every DDP rank, and again the same when a resumed run redoes step t.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from src import seeds
from src.errors import ConfigError
from src.models.network import Network, Plan
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


class Classifier(L.LightningModule):
    def __init__(
        self,
        net: Network,
        mode: TrainingMode | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        milestones: Sequence[int] = (32000, 48000),
        gamma: float = 0.1,
        warmup_steps: int = 400,
        warmup_lr: float = 0.01,
        num_classes: int = 10,
    ):
        super().__init__()
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ConfigError("optim.lr must be positive; weight_decay and warmup_steps >= 0")
        self.net = net
        self.mode = mode or Standard()
        self.mode.check(net)
        self.seed: int | None = None  # the run's seed, set in `setup`
        self.schedule = StepSchedule(lr, milestones, gamma, warmup_steps, warmup_lr)
        self.optim = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{s}_acc": MulticlassAccuracy(num_classes, average="micro")
                for s in ("train", "val", "test")
            }
        )

    @property
    def eval_plan(self) -> Plan | None:
        """The plan of the trained network at test time (what lesions start from)."""
        return self.mode.eval_plan(self.net.n_blocks)

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        return self.net(x, plan if plan is not None else self.eval_plan)

    def setup(self, stage: str) -> None:
        self.seed = seeds.run_seed(self.trainer)  # every rank calls setup: a seed=null is shared

    def configure_callbacks(self):
        return [RequeueBetweenSteps()] if self.trainer.state.fn == "fit" else []

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        seed = seeds.run_seed() if self.seed is None else self.seed
        with seeds.seeded(seeds.derive(seed, "blocks", self.global_step), x.device):
            logits = self.net(x, self.mode.train_plan(self.net.n_blocks))
        loss = F.cross_entropy(logits, y)
        self.metrics["train_acc"].update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch, split: str):
        x, y = batch
        logits = self(x)
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

    def validation_step(self, batch, batch_idx: int):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), **self.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
