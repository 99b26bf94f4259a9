"""Batch-norm statistics re-estimated for a plan (issue 9): the running mean and variance of every
BatchNorm layer recomputed on given batches, for the network a `Plan` runs.

A block-subset network (paper Sec. 5) learned its statistics on k-block subnetworks, and a lesion
changes the inputs of every layer after it: `bn=recalibrate` tests either with statistics of the
network actually run. As `torch.optim.swa_utils.update_bn` does: reset the running statistics,
set momentum=None (a cumulative average: running_mean is the mean of the batch means,
running_var the mean of the unbiased batch variances) and run the batches in train mode without
gradient. Train-mode batch norm normalises with batch statistics, so the estimate depends only on
the plan and the batches (deterministic given both); the weights are never touched.

- `recalibrate(net, plan, batches, n)`: in place (test_mode=recalibrate);
- `recalibrated(net, plan, batches, n)`: a context manager; the original statistics are back on
  exit, also on an exception (one lesion plan after another);
- `training_batches(datamodule, n, seed)`: a seeded choice of n training batches, without
  augmentation, the same on every DDP rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from src import seeds
from src.data.datamodules import TensorDataModule
from src.models.network import Network, Plan

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_layers(net: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of `net` that keep running statistics."""
    return [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _save(layers: list[_BatchNorm]) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(getattr(m, b).detach().clone() for b in _BUFFERS) for m in layers]


def _load(layers: list[_BatchNorm], saved: list[tuple[torch.Tensor, ...]]) -> None:
    with torch.no_grad():
        for m, values in zip(layers, saved):
            for b, v in zip(_BUFFERS, values):
                getattr(m, b).copy_(v)


def recalibrate(net: Network, plan: Plan | None, batches: Iterable, n_batches: int) -> int:
    """Re-estimate the running statistics of `net`'s batch-norm layers, in place, from the first
    `n_batches` of `batches` ((x, y) pairs or inputs x, on the network's device) run under `plan`
    (None: the full network). A layer the plan never runs keeps its statistics. Momenta and the
    train/eval flag of every module are restored; on an exception the statistics are too.
    Returns the number of batches used."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be positive, got {n_batches}")
    layers = bn_layers(net)
    saved, momenta = _save(layers), [m.momentum for m in layers]
    flags = [(m, m.training) for m in net.modules()]
    used = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        net.train()
        with torch.no_grad():
            for batch in islice(batches, n_batches):
                net(batch[0] if isinstance(batch, (tuple, list)) else batch, plan)
                used += 1
        if used == 0:
            raise ValueError("recalibrate got no batches")
    except BaseException:
        _load(layers, saved)
        raise
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    idle = [i for i, m in enumerate(layers) if int(m.num_batches_tracked) == 0]
    _load([layers[i] for i in idle], [saved[i] for i in idle])
    return used


@contextmanager
def recalibrated(
    net: Network, plan: Plan | None, batches: Iterable, n_batches: int
) -> Iterator[Network]:
    """Within the block `net` has batch-norm statistics re-estimated for `plan` (see
    `recalibrate`); on exit, also on an exception, its original statistics are back."""
    layers = bn_layers(net)
    saved = _save(layers)
    try:
        recalibrate(net, plan, batches, n_batches)
        yield net
    finally:
        _load(layers, saved)


def training_batches(datamodule, n_batches: int, seed: int, device="cpu") -> Iterator:
    """The first `n_batches` full training batches of a seeded shuffle of the training split
    (the stream (seed, "bn")), normalised without augmentation, on `device`: the same batches on
    every DDP rank and on every call. At most one pass over the split. A data module that is
    not held as tensors (ImageNet) is read through its training loader's dataset and transform,
    in a seeded order."""
    generator = seeds.generator(seed, "bn")
    if isinstance(datamodule, TensorDataModule):
        if not datamodule.splits:
            datamodule.setup("test")
        x, y = datamodule.splits["train"].tensors[:2]
        size = min(datamodule.batch_size, len(y))
        order = torch.randperm(len(y), generator=generator)
        for b in range(min(n_batches, len(y) // size)):
            idx = order[b * size : (b + 1) * size]
            yield datamodule.transform(x[idx].to(device), False), y[idx].to(device)
        return
    loader = datamodule.train_dataloader()
    loader = torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=True,
        num_workers=loader.num_workers,
    )
    for x, y in islice(loader, n_batches):
        yield x.to(device), y.to(device)
