"""A pruned copy of a network (issue 20, sections 4 and 5): the blocks a plan deletes taken out.

`prune(net, deleted)` returns a `Network` with fewer blocks whose full-plan output equals `net`'s
under `Plan(deleted=deleted)`, checked on a seeded probe before it is returned (as `adapt` checks
an adapter). A deleted block whose skip is the identity on its input (a residual block with an
identity shortcut, a plain layer without pooling) is absent; one whose skip is not (a downsampling
block's projection or zero-padding shortcut, a VGG layer's pooling, a timm stage's downsample) is
kept as `Skipped`, which runs that skip only. The pruned network shares `net`'s modules (deep-copy
it to change one without the other).

`pruned_network(model, removed, skipped)` is the model config of a pruned checkpoint
(src/export.py): it builds `model` (the original model config) and takes the same blocks out, so
the checkpoint's state dict loads into it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.models.adapt import PROBE_SEED, TOLERANCE, first_param, probe_input
from src.models.network import Block, Network, Plan
from src.schema import NON_NEGATIVE


class Skipped(Block):
    """A deleted block whose skip is not the identity, kept as that skip: its output is
    `block.skip(x)` under every plan (its residual branch is zero, so deleting it changes
    nothing). Its residual branch's parameters stay in the state dict but never run."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block
        self.stage, self.downsampling = block.stage, block.downsampling
        self.layer_index, self.kind = block.layer_index, block.kind

    def shortcut(self, x: Tensor) -> Tensor:
        return self.block.skip(x)

    def residual(self, x: Tensor) -> Tensor:
        return x.new_zeros(())

    def forward(self, x: Tensor) -> Tensor:
        return self.block.skip(x)


def probe(net: Network) -> Tensor:
    """The seeded probe input of `net`: its source model's (`adapt`), else (2, C, H, W) images
    (C from the first convolution, H x W from a patch embedding's size, else 32 x 32) or (2, 8)
    token ids within the first embedding's vocabulary."""
    source = getattr(net, "source", None)
    if source is not None:
        return probe_input(source)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    p = first_param(net)
    if net.inputs == "tokens":
        embed = next(m for m in net.modules() if isinstance(m, nn.Embedding))
        return torch.randint(0, embed.num_embeddings, (2, 8), generator=gen).to(p.device)
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    size = next((m.img_size for m in net.modules() if hasattr(m, "img_size")), None) or 32
    size = (size, size) if isinstance(size, int) else tuple(size)
    channels = conv.in_channels if conv is not None else 3
    return torch.randn(2, channels, *size, generator=gen).to(p.device, p.dtype)


def compare(got: Tensor, want: Tensor, what: str) -> float:
    """Largest |got - want|; a one-line ConfigError beyond `adapt`'s tolerance for the dtype."""
    atol, rtol = TOLERANCE.get(want.dtype, TOLERANCE[torch.float32])
    if got.shape != want.shape:
        raise ConfigError(f"{what}: outputs of shape {tuple(got.shape)}, not {tuple(want.shape)}")
    diff = (got.double() - want.double()).abs()
    if not torch.isfinite(got).all() or (diff > atol + rtol * want.double().abs()).any():
        raise ConfigError(
            f"{what}: outputs differ by up to {diff.max().item():.3g} (tolerance {atol:g} + "
            f"{rtol:g} x |output|, {want.dtype}); refusing a copy that is not the network"
        )
    return float(diff.max())


def check_blocks(net: Network, blocks: Iterable[int], what: str) -> frozenset[int]:
    """`blocks` as a set of valid block ids of `net`, or a one-line ConfigError."""
    blocks = frozenset(int(i) for i in blocks)
    bad = sorted(i for i in blocks if not 0 <= i < net.n_blocks)
    if bad:
        raise ConfigError(
            f"{what}: block {bad[0]} is out of range: this network has blocks 0..{net.n_blocks - 1}"
        )
    return blocks


def assemble(net: Network, removed: Iterable[int], skipped: Iterable[int]) -> Network:
    """`net` without the blocks `removed`, the blocks `skipped` as their skip (not verified)."""
    removed, skipped = set(removed), set(skipped)
    blocks = [
        Skipped(b) if i in skipped else b for i, b in enumerate(net.blocks) if i not in removed
    ]
    out = Network(net.stem, blocks, net.head).train(net.training)
    out.inputs = net.inputs
    out.pruned = {"removed": sorted(removed), "skipped": sorted(skipped)}
    return out


def prune(net: Network, deleted: Iterable[int], x: Tensor | None = None) -> Network:
    """`net` with the blocks `deleted` taken out (module doc), verified: its full-plan output on
    `x` (None: the seeded `probe`) equals `net(x, Plan(deleted=deleted))`. `out.pruned` says
    which blocks were removed and which kept as their skip (block ids of `net`)."""
    deleted = check_blocks(net, deleted, "prune")
    plan = Plan(deleted=deleted)
    x = probe(net) if x is None else x
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            inputs = net.block_inputs(x, plan)
            identity = {i for i in deleted if _same(net.blocks[i].skip(inputs[i]), inputs[i])}
            out = assemble(net, identity, deleted - identity)
            compare(out(x), net(x, plan), f"pruning blocks {sorted(deleted)}")
    finally:
        net.train(training)
    return out.train(training)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def pruned_network(
    model: Mapping[str, Any],
    removed: Sequence[Annotated[int, NON_NEGATIVE]] = (),
    skipped: Sequence[Annotated[int, NON_NEGATIVE]] = (),
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> Network:
    """The network of a pruned checkpoint: `model` (a model config with its `_target_`) built
    with the data's `in_channels` / `num_classes`, without the blocks `removed` and with the
    blocks `skipped` as their skip (ids of the unpruned network)."""
    from hydra.utils import instantiate

    given = {"in_channels": in_channels, "num_classes": num_classes}
    net = instantiate(model, _convert_="all", **{k: v for k, v in given.items() if v is not None})
    check_blocks(net, [*removed, *skipped], "model.removed / model.skipped")
    return assemble(net, removed, skipped)
