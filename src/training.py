"""Training modes as plans (paper Sec. 5 and 6), chosen by `training=<mode>`:

- `standard`: the full network every step;
- `stochastic_depth` (Huang et al. 2016): block l of L is dropped with probability
  l/L * (1 - final_survival), one decision per block per mini-batch
  (`torchvision.ops.stochastic_depth`,
  mode "batch"; it rescales kept branches by 1/survival in training, so test time runs all blocks
  unscaled);
- `block_subset` (Sec. 5, "effective paths"): every mini-batch runs exactly k of the n blocks,
  chosen uniformly without replacement; the other n-k keep only their shortcut, in forward and
  backward. At test time `test_mode=full` runs all blocks as trained (the paper's choice), and
  `test_mode=rescale` multiplies every residual branch by k/n (the dropout-style expectation).

On a network without shortcuts (`model=vgg15`) a deleted layer is the identity, as in the lesion
study, so `block_subset` trains k of its plain layers per mini-batch (test_mode=full only: there
is no residual branch to rescale); `stochastic_depth` is refused, since it rescales a residual
branch that a plain layer does not have.
"""

from __future__ import annotations

import torch

from src.errors import ConfigError
from src.models.network import Network, Plan


class TrainingMode:
    """Hands the network a plan for each training step and one for evaluation."""

    def check(self, net: Network) -> None:
        """Raise ConfigError if the mode cannot train `net`."""

    def train_plan(self, n_blocks: int) -> Plan | None:
        return None

    def eval_plan(self, n_blocks: int) -> Plan | None:
        return None


class Standard(TrainingMode):
    pass


class StochasticDepth(TrainingMode):
    def __init__(self, final_survival: float = 0.5):
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
        return Plan(drop_prob=self.drop_probs(n_blocks))


class BlockSubset(TrainingMode):
    def __init__(self, k: int = 23, test_mode: str = "full"):
        if test_mode not in ("full", "rescale"):
            raise ConfigError(f"training.test_mode must be 'full' or 'rescale', got {test_mode!r}")
        self.k, self.test_mode = int(k), test_mode

    def check(self, net: Network) -> None:
        n_blocks = net.n_blocks
        if not 1 <= self.k <= n_blocks:
            raise ConfigError(
                f"training.k={self.k} is outside 1..{n_blocks}: this model has {n_blocks} blocks"
            )
        if self.test_mode == "rescale" and not all(b.has_shortcut for b in net.blocks):
            raise ConfigError(
                "training.test_mode=rescale scales residual branches, but this model has plain "
                "layers without a shortcut (as in model=vgg15): use training.test_mode=full"
            )

    def train_plan(self, n_blocks: int) -> Plan:
        keep = torch.randperm(n_blocks)[: self.k].tolist()
        return Plan(deleted=frozenset(range(n_blocks)) - frozenset(keep))

    def eval_plan(self, n_blocks: int) -> Plan | None:
        if self.test_mode == "rescale":
            return Plan(residual_scale=self.k / n_blocks)
        return None
