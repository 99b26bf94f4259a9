"""The LightningModule of a causal language model (experiment=lm_lesions): a `Network` whose head
returns (B, T, V) next-token logits (src/models/hf_adapters.py), trained on (x, y) token windows
(src/data/text.py) with AdamW (conf/optim/adamw.yaml) on the schedule shape of the presets:
warm-up, then lr x gamma at each milestone (src.module.StepSchedule). Chosen by the config key
`module: src.lm.LanguageModel`.

It measures the mean next-token cross-entropy (`{split}/loss`, nats), its exp (`perplexity`) and
the next-token top-1 error (`error`, so that checkpoints and logs read as for a classifier). The
lesion studies measure `metric = "loss"` on it. The training mode's plans apply as for images
(standard, stochastic depth, block subsets); test-time ensembles and batch-norm re-estimation do
not (a transformer has no batch norm).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from src import precision, seeds
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.module import Recipe
from src.training import RequeueBetweenSteps, Standard, TrainingMode


def vocab_size(net: Network) -> int | None:
    """Output size of the network's last linear layer (the LM head), if it has one."""
    linears = [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None


# a language model's defaults where `optim.*` leaves a setting out
RECIPE = dict(
    optimizer="adamw",
    lr=3e-3,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    milestones=(),
    warmup_steps=20,
    warmup_lr=3e-4,
)


class LanguageModel(L.LightningModule):
    inputs = "tokens"  # checked against the network and the data (src/errors.py: check_pairing)
    metric = "loss"  # what the lesion studies measure on this module

    def __init__(
        self,
        net: Network,
        mode: TrainingMode | None = None,
        num_classes: int | None = None,
        **optim,
    ):
        """`optim`: the `Recipe`'s settings (`optim.*`); unset ones from `RECIPE` (AdamW)."""
        super().__init__()
        self.recipe = Recipe(**(RECIPE | optim))
        vocab = vocab_size(net)
        if num_classes is not None and vocab is not None and vocab < num_classes:
            raise ConfigError(
                f"the model's vocabulary ({vocab}) is smaller than the data's ({num_classes} "
                "tokens): set model.config.vocab_size, or data.tokenizer=<the model's directory>"
            )
        self.net = net
        self.mode = mode or Standard()
        self.mode.check(net)
        if self.mode.ensemble_sizes() or self.mode.bn_batches:
            raise ConfigError(
                "a language model is tested as one network: use training.test_mode=full "
                "(ensembles and batch-norm re-estimation apply to image classifiers)"
            )
        self.seed: int | None = None
        self.metrics = torch.nn.ModuleDict(
            {f"{s}_{m}": MeanMetric() for s in ("val", "test") for m in ("loss", "error")}
        )

    @property
    def eval_plan(self) -> Plan | None:
        return self.mode.eval_plan(self.net.n_blocks)

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        return self.net(x, self.eval_plan if plan is None else plan)

    def setup(self, stage: str) -> None:
        self.seed = seeds.run_seed(self.trainer)

    def configure_callbacks(self):
        return [RequeueBetweenSteps()] if self.trainer.state.fn == "fit" else []

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        seed = seeds.run_seed() if self.seed is None else self.seed
        with seeds.seeded(seeds.derive(seed, "blocks", self.global_step), x.device):
            logits = self.net(x, self.mode.train_plan(self.net.n_blocks))
        loss = self.loss(logits, y)
        self.log("train/loss", loss, prog_bar=x.device.type != "cuda")
        trainer = self._trainer
        if trainer is not None and self.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch, split: str) -> None:
        x, y = batch
        plan = self.eval_plan if split == "test" else self.mode.val_plan(self.net.n_blocks)
        logits = self.net(x, plan)
        n = y.numel()
        self.metrics[f"{split}_loss"].update(self.loss(logits, y), n)  # weighted by tokens
        self.metrics[f"{split}_error"].update((logits.argmax(-1) != y).float().mean(), n)

    def _epoch_end(self, split: str) -> None:
        loss, error = self.metrics[f"{split}_loss"], self.metrics[f"{split}_error"]
        if not loss.update_called:
            return
        value = loss.compute()  # synced across DDP ranks by torchmetrics
        self.log(f"{split}/loss", value)
        self.log(f"{split}/perplexity", value.exp(), prog_bar=split != "test")
        self.log(f"{split}/error", error.compute())
        loss.reset()
        error.reset()

    def validation_step(self, batch, batch_idx: int):
        with precision.evaluating(self.device):
            self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int):
        with precision.evaluating(self.device):
            self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self):
        return self.recipe.configure(self)
