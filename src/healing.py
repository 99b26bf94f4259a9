"""Healing (issue 20, section 4): a short fine-tune of a network with blocks deleted, under that
one fixed plan, so the deleted blocks never run (forward or backward), as in block-subset
training (`training=pruned` is the same plan as a training mode).

`heal(net, plan, batches, steps, lr)` is a plain function a study callback calls: it returns a
fine-tuned deep copy (the given network is left as it was), deterministic under `seed`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from src import seeds
from src.errors import ConfigError
from src.models.network import Network, Plan


def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of an image classifier's (B, C) or a language model's (B, T, V) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _cycle(batches: Iterable) -> Iterator:
    """`batches` over and over: a list or DataLoader is iterated again (a shuffling loader draws
    a new order), a one-pass iterator (a generator) is replayed from its first pass."""
    seen: list | None = [] if iter(batches) is batches else None
    for batch in batches:
        if seen is not None:
            seen.append(batch)
        yield batch
    if seen == [] or (seen is None and next(iter(batches), None) is None):
        raise ConfigError("heal: no training batches given")
    while True:
        yield from batches if seen is None else seen


def heal(
    net: Network,
    plan: Plan,
    batches: Iterable,
    steps: int,
    lr: float = 0.01,
    optimizer: str = "sgd",
    seed: int = 0,
    **optim,
) -> Network:
    """A copy of `net` trained for `steps` optimizer steps under the fixed `plan` (e.g.
    `Plan(deleted=...)`) on `batches` ((x, y) pairs, cycled: a list, a DataLoader, a generator;
    or a data module, whose training batches `src.data.batches` gives, augmented), at the
    constant learning rate `lr` with `optimizer` ("sgd" or "adamw") and the other settings of
    `src.module.Recipe` in `optim` (momentum, weight_decay, betas; its schedule is not used).
    Batch-norm statistics are updated for the plan's network (training mode); the copy is
    returned in `net`'s mode. Parameters that the plan never runs get no gradient and stay
    unchanged (SGD and AdamW skip them, weight decay included)."""
    from src.module import Recipe  # Lightning loads only when healing

    try:
        plan.validate(net.n_blocks)
    except ValueError as err:
        raise ConfigError(f"heal: {err}") from None
    if int(steps) < 0:
        raise ConfigError(f"heal: steps must be >= 0, got {steps}")
    healed = copy.deepcopy(net)
    opt = Recipe(optimizer=optimizer, lr=lr, **optim).make_optimizer(healed)
    device = next(healed.parameters()).device
    if hasattr(batches, "train_dataloader"):  # a data module
        from src.data import batches as ready

        batches = ready(batches, "train", device=device, train=True, seed=seed)
    healed.train()
    with seeds.seeded(seed, device):
        for _, (x, y) in zip(range(int(steps)), _cycle(batches)):
            opt.zero_grad(set_to_none=True)
            loss(healed(x.to(device), plan), y.to(device)).backward()
            opt.step()
    return healed.train(net.training)
