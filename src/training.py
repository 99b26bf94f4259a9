"""Training modes as plans (paper Sec. 5 and 6), chosen by `training=<mode>`:

- `standard`: the full network every step;
- `stochastic_depth` (Huang et al. 2016): block l of L is dropped with probability
  l/L * (1 - final_survival), one decision per block per mini-batch
  (`torchvision.ops.stochastic_depth`,
  mode "batch"; it rescales kept branches by 1/survival in training, so test time runs all blocks
  unscaled);
- `block_subset` (Sec. 5, "effective paths"): every mini-batch runs exactly k of the n blocks,
  chosen uniformly without replacement; the other n-k keep only their shortcut, in forward and
  backward. The paper does not say how this network is tested; `test_mode` picks the rule:
  `full` runs all blocks with the statistics of training (what the paper's Sec. 5 reads as
  "the network"), `rescale` multiplies every residual branch by k/n (the dropout-style
  expectation), `recalibrate` runs all blocks with batch-norm statistics re-estimated for the
  full network on `bn_batches` training batches before testing (`src/bn.py`), and `ensemble`
  averages the softmax of `ensemble_size` random k-subsets (Monte-Carlo, as in MC dropout), the
  same subsets for every test batch, logging the error of the first m members for m = 1, 2, 4, ...
- `pruned` (issue 20, healing): the blocks `deleted` never run, in training, validation and test
  (one fixed `Plan(deleted=...)`, like a step plan of block-subset training); `src/healing.py`
  fine-tunes a network that way for a few steps, from a study.

On a network without shortcuts (`model=vgg15`) a deleted layer is the identity, as in the lesion
study, so `block_subset` trains k of its plain layers per mini-batch and tests them with any rule
but `rescale` (there is no residual branch to rescale); `stochastic_depth` is refused, since it
rescales a residual branch that a plain layer does not have.

The draws of `train_plan` and of the forward pass it plans (stochastic depth) use torch's global
generator, which `Classifier.training_step` seeds from (run seed, step) for that step only: every
DDP rank runs the same blocks, and a resumed run draws what the uninterrupted one drew.
`RequeueBetweenSteps` keeps Slurm's requeue checkpoint at a step boundary, where Lightning
resumes exactly.
"""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Literal

import lightning as L
import torch

from src import seeds
from src.errors import ConfigError
from src.models.network import Network, Plan
from src.schema import NON_NEGATIVE, POSITIVE, UNIT


class TrainingMode:
    """Hands the network a plan for each training step and one for evaluation."""

    def check(self, net: Network) -> None:
        """Raise ConfigError if the mode cannot train `net`."""

    def train_plan(self, n_blocks: int) -> Plan | None:
        return None

    def eval_plan(self, n_blocks: int) -> Plan | None:
        """The plan of the trained network at test time (None: the full network)."""
        return None

    def val_plan(self, n_blocks: int) -> Plan | None:
        """The plan validation runs during fit (the test-time plan unless that is expensive)."""
        return self.eval_plan(n_blocks)

    def ensemble_plans(self, n_blocks: int, seed: int) -> list[Plan] | None:
        """The members whose softmax test time averages (None: one network, `eval_plan`)."""
        return None

    def ensemble_sizes(self) -> tuple[int, ...]:
        """Member counts m whose running-average error test time also reports."""
        return ()

    bn_batches: int = 0  # > 0: re-estimate batch-norm statistics on this many training batches

    def blocks_per_step(self, n_blocks: int) -> int | None:
        """Blocks every training step runs (None: it varies from step to step)."""
        return None


class Standard(TrainingMode):
    def blocks_per_step(self, n_blocks: int) -> int:
        return n_blocks


class StochasticDepth(TrainingMode):
    def __init__(self, final_survival: Annotated[float, UNIT] = 0.5):
        if not 0 < final_survival <= 1:
            raise ConfigError(f"training.final_survival must lie in (0, 1], got {final_survival}")
        self.final_survival = final_survival

    def drop_probs(self, n_blocks: int) -> tuple[float, ...]:
        return tuple((i + 1) / n_blocks * (1 - self.final_survival) for i in range(n_blocks))

    def check(self, net: Network) -> None:
        plain = sum(not b.has_shortcut for b in net.blocks)
        if plain:
            raise ConfigError(
                f"training=stochastic_depth drops residual branches, but {plain} of this model's "
                f"{net.n_blocks} blocks are plain layers without a shortcut (as in model=vgg15): "
                "use a ResNet (model=resnet110), or training=standard or training=block_subset"
            )

    def train_plan(self, n_blocks: int) -> Plan:
        """One draw per block per mini-batch (torchvision's mode "batch"): a dropped block's
        residual branch does not run, forward or backward (Huang et al.'s saving); a kept one is
        scaled by 1/survival, so test time runs every block unscaled."""
        survival = 1.0 - torch.tensor(self.drop_probs(n_blocks), dtype=torch.float64)
        kept = torch.bernoulli(survival).bool().tolist()
        return Plan(
            deleted=frozenset(i for i, k in enumerate(kept) if not k),
            branch_scale=tuple(1.0 / float(s) for s in survival),
        )


class BlockSubset(TrainingMode):
    TEST_MODES = ("full", "rescale", "recalibrate", "ensemble")

    def __init__(
        self,
        k: Annotated[int, POSITIVE] = 23,
        test_mode: Literal["full", "rescale", "recalibrate", "ensemble"] = "full",
        bn_batches: Annotated[int, POSITIVE] = 50,
        ensemble_size: Annotated[int, POSITIVE] = 16,
    ):
        if test_mode not in self.TEST_MODES:
            raise ConfigError(
                f"training.test_mode must be one of {', '.join(self.TEST_MODES)}, got {test_mode!r}"
            )
        if int(bn_batches) < 1 or int(ensemble_size) < 1:
            raise ConfigError(
                "training.bn_batches and training.ensemble_size must be positive, got "
                f"{bn_batches} and {ensemble_size}"
            )
        self.k, self.test_mode = int(k), test_mode
        self.ensemble_size = int(ensemble_size)
        self.bn_batches = int(bn_batches) if test_mode == "recalibrate" else 0

    def check(self, net: Network) -> None:
        n_blocks = net.n_blocks
        if not 1 <= self.k <= n_blocks:
            raise ConfigError(
                f"training.k={self.k} is outside 1..{n_blocks}: this model has {n_blocks} blocks"
            )
        if self.test_mode == "rescale" and not all(b.has_shortcut for b in net.blocks):
            raise ConfigError(
                "training.test_mode=rescale scales residual branches, but this model has plain "
                "layers without a shortcut (as in model=vgg15): use training.test_mode=full, "
                "recalibrate or ensemble"
            )

    def train_plan(self, n_blocks: int) -> Plan:
        keep = torch.randperm(n_blocks)[: self.k].tolist()
        return Plan(deleted=frozenset(range(n_blocks)) - frozenset(keep))

    def blocks_per_step(self, n_blocks: int) -> int:
        return self.k

    def eval_plan(self, n_blocks: int) -> Plan | None:
        """full and recalibrate: the full network (recalibrate with its re-estimated statistics
        in place once testing started); rescale: residual branches x k/n.

        ensemble: refused with a ConfigError. Lesion studies and gradient paths start from this
        one plan, and their baseline is meant to be the network whose test error the run
        reports; answering the full network would give them a baseline that silently differs
        from the ensemble's test error. A researcher who wants the full network's lesions tests
        the same checkpoint with training.test_mode=full (`train=false ckpt_path=...`)."""
        if self.test_mode == "ensemble":
            raise ConfigError(
                "training.test_mode=ensemble averages several block subsets, which no single plan "
                "expresses, so lesion studies and gradient paths cannot start from it: run them "
                "on the checkpoint with training.test_mode=full, rescale or recalibrate"
            )
        if self.test_mode == "rescale":
            return Plan(residual_scale=self.k / n_blocks)
        return None

    def val_plan(self, n_blocks: int) -> Plan | None:
        """Validation during fit runs one network: the full one for ensemble (and recalibrate,
        with the statistics of training), the test-time plan for full and rescale."""
        return None if self.test_mode == "ensemble" else self.eval_plan(n_blocks)

    def ensemble_plans(self, n_blocks: int, seed: int) -> list[Plan] | None:
        """test_mode=ensemble: member m runs the k blocks of a permutation drawn from its own
        generator (run seed, "ensemble", m), so the first m members do not depend on M."""
        if self.test_mode != "ensemble":
            return None
        plans = []
        for m in range(self.ensemble_size):
            g = seeds.generator(seed, "ensemble", m)
            keep = torch.randperm(n_blocks, generator=g)[: self.k].tolist()
            plans.append(Plan(deleted=frozenset(range(n_blocks)) - frozenset(keep)))
        return plans

    def ensemble_sizes(self) -> tuple[int, ...]:
        """1, 2, 4, ... up to ensemble_size, and ensemble_size itself."""
        if self.test_mode != "ensemble":
            return ()
        m, sizes = 1, []
        while m < self.ensemble_size:
            sizes.append(m)
            m *= 2
        return (*sizes, self.ensemble_size)


class RequeueBetweenSteps(L.Callback):
    """Hand Slurm's requeue signal to Lightning at the end of a training step.

    On the signal (SIGUSR1, 90 s before the time limit) Lightning saves `hpc_ckpt_<n>.ckpt` at
    once, which may be halfway through a step (batch-norm statistics updated, weights not yet):
    no resume could continue that exactly. At `on_train_batch_end` the step is complete
    (weights, optimizer, lr schedule) and Lightning resumes after it, as from a
    `ModelCheckpoint(every_n_train_steps=...)` checkpoint. Under DDP the ranks agree, at each
    step's end, whether any of them got the signal, so all save (a collective call) at the same
    step. Acts only where Lightning installed a handler for the signal (Slurm with auto-requeue);
    a signal after training ends goes to Lightning directly.
    """

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum, self.handler, self.pending, self.handled = signum, None, None, False

    def _hold(self, signum, frame) -> None:
        if not self.handled:  # one requeue per attempt; a rank's late signal changes nothing
            self.pending = (signum, frame)

    def _release(self, trainer) -> None:
        pending = self.pending is not None
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            signum, frame = self.pending or (self.signum, None)
            self.pending, self.handled = None, True
            self.handler(signum, frame)

    def on_train_start(self, trainer, pl_module) -> None:
        handler = signal.getsignal(self.signum)
        if callable(handler) and threading.current_thread() is threading.main_thread():
            self.handler = handler
            signal.signal(self.signum, self._hold)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.handler is not None:
            self._release(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.handler is not None:
            signal.signal(self.signum, self.handler)
            self._release(trainer)
            self.handler = None


class Pruned(TrainingMode):
    """The blocks `deleted` are absent in every plan (train, validation, test): a network with
    those blocks pruned, trained or healed (src/healing.py) and tested without them."""

    def __init__(self, deleted: list[Annotated[int, NON_NEGATIVE]] = ()):
        ids = None if isinstance(deleted, (str, bytes, int)) else list(deleted)
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"training.deleted must be a list of block ids, got {deleted!r}")
        self.deleted = frozenset(ids)

    def check(self, net: Network) -> None:
        bad = sorted(i for i in self.deleted if not 0 <= i < net.n_blocks)
        if bad:
            raise ConfigError(
                f"training.deleted: block {bad[0]} is out of range: this model has blocks "
                f"0..{net.n_blocks - 1}"
            )

    def plan(self) -> Plan:
        return Plan(deleted=self.deleted)

    def train_plan(self, n_blocks: int) -> Plan:
        return self.plan()

    def eval_plan(self, n_blocks: int) -> Plan:
        return self.plan()

    def blocks_per_step(self, n_blocks: int) -> int:
        return n_blocks - len(self.deleted)
