"""The one shape every network here has: stem -> ordered blocks -> head, run under a Plan.

Paper Sec. 3 ("unraveled view"): a residual block is y = shortcut(x) + residual(x). Every
experiment of the paper is a *plan* handed to `Network.forward` for that call only:

- delete blocks at test time (Sec. 4.1, 4.2): `Plan(deleted={i, ...})` keeps the shortcut;
- reorder blocks (Sec. 4.3): `Plan(order=(...))`;
- train k of n blocks per mini-batch (Sec. 5): `Plan(deleted=<the n-k others>)`;
- stochastic depth (Sec. 6), as trained: the drawn drops as a plan,
  `Plan(deleted=<dropped>, branch_scale=<1/survival>)`, so a dropped branch does not run;
  `Plan(drop_prob=(...))` computes every branch and zeroes the dropped ones
  (`torchvision.ops.stochastic_depth`; the reference the drawn plan is tested and timed against);
- gradient of one path (Sec. 5, Fig. 6b): `Plan(grad_path={blocks whose residual it crosses})`;
- backward-only residual scaling lambda (path decomposition): `Plan(grad_scale=lam)`.

The model object is never modified, so an interrupted sweep cannot leave a lesioned model behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import stochastic_depth


class Block(nn.Module):
    """A block with two branches: `shortcut(x)` and `residual(x)`, merged by `merge(s, r)`.

    `skip(x)` is the block's output when its residual branch is deleted. A plain (VGG) layer is
    a block without a shortcut whose deletion is the identity (plus any pooling it owns).
    """

    has_shortcut: bool = True
    downsampling: bool = False
    stage: int = 0
    layer_index: int | None = None  # transformers: the layer this sub-layer block belongs to
    kind: str | None = None  # transformers: "attn", "mlp" or "layer"

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def merge(self, s: Tensor, r: Tensor) -> Tensor:
        return s + r

    def skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.shortcut(x), self.residual(x))


@dataclass(frozen=True)
class Plan:
    """What one call of the network runs. The default plan is the unmodified network.

    order:        block indices in execution order (None: 0..n-1). Blocks left out do not run.
    deleted:      blocks whose residual branch is removed; their shortcut (skip) still runs.
    residual_scale: forward multiplier on every residual branch that runs (test-time rescaling).
    branch_scale: per-block forward multiplier of the residual branch (stochastic depth's
                  1/survival on the branches a training step keeps).
    drop_prob:    per-block stochastic-depth drop probability (used in training mode only).
    grad_path:    backward only: gradient flows through the residual branch of these blocks and
                  through the shortcut of all others (one path of the unraveled view).
    grad_scale:   backward only: residual-branch gradients are multiplied by this scalar.
    """

    order: tuple[int, ...] | None = None
    deleted: frozenset[int] = frozenset()
    residual_scale: float = 1.0
    branch_scale: tuple[float, ...] | None = None
    drop_prob: tuple[float, ...] | None = None
    grad_path: frozenset[int] | None = None
    grad_scale: float | None = None

    def sequence(self, n_blocks: int) -> tuple[int, ...]:
        return tuple(range(n_blocks)) if self.order is None else self.order

    @property
    def plain(self) -> bool:
        """True when every running block can use its fused `forward`."""
        return (
            self.residual_scale == 1.0
            and self.branch_scale is None
            and self.drop_prob is None
            and self.grad_path is None
            and self.grad_scale is None
        )

    def validate(self, n_blocks: int) -> None:
        bad = [i for i in (*self.sequence(n_blocks), *self.deleted) if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(
                f"block index {bad[0]} out of range: this network has blocks 0..{n_blocks - 1}"
            )
        for name in ("drop_prob", "branch_scale"):
            values = getattr(self, name)
            if values is not None and len(values) != n_blocks:
                raise ValueError(f"{name} needs one value per block ({n_blocks})")


FULL = Plan()


def _fused(block: Block, h: Tensor) -> Tensor:
    return block(h)


def _branches(block: Block, h: Tensor) -> tuple[Tensor, Tensor]:
    return block.shortcut(h), block.residual(h)


def _skip(block: Block, h: Tensor) -> Tensor:
    return block.skip(h)


def _backward_scale(t: Tensor, lam: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by `lam` in the backward pass."""
    d = t.detach()
    return d + lam * (t - d)


class Network(nn.Module):
    """stem -> blocks (an ordered ModuleList of `Block`) -> head, executed under a `Plan`."""

    def __init__(self, stem: nn.Module, blocks: Sequence[Block], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_info(self) -> list[dict]:
        """Index, stage and downsampling flag of every block (for lesion tables); transformer
        blocks add their layer index and branch kind."""
        rows = []
        for i, b in enumerate(self.blocks):
            row = {"block": i, "stage": b.stage, "downsampling": b.downsampling}
            if b.kind is not None:
                row.update(layer=b.layer_index, kind=b.kind)
            rows.append(row)
        return rows

    def compile_blocks(self, **options) -> Network:
        """Compile the blocks, not the network: `torch.compile` of one function that runs a
        block given as an argument, so blocks of one type and shape share a graph, and the plan
        (which blocks run, in which order, deleted, scaled, gated) stays in eager Python around
        them. One set of graphs then serves every plan: a lesion sweep or block-subset training
        never recompiles (compiling `forward` itself guards on each plan and falls back to eager
        after eight). `options` go to `torch.compile` (e.g. backend, mode)."""
        self._compiled = (
            torch.compile(_fused, **options),
            torch.compile(_branches, **options),
            torch.compile(_skip, **options),
        )
        return self

    def run_block(self, i: int, h: Tensor, plan: Plan = FULL) -> Tensor:
        block = self.blocks[i]
        fused, branches, skip = getattr(self, "_compiled", None) or (_fused, _branches, _skip)
        if i in plan.deleted:
            return skip(block, h)
        if plan.plain or not block.has_shortcut:
            if plan.drop_prob is not None and not block.has_shortcut:
                raise ValueError("stochastic depth needs residual blocks, not plain layers")
            if not block.has_shortcut and not plan.plain:
                raise ValueError("gradient/scale plans need residual blocks, not plain layers")
            return fused(block, h)
        s, r = branches(block, h)
        if plan.drop_prob is not None:
            r = stochastic_depth(r, plan.drop_prob[i], "batch", self.training)
        if plan.residual_scale != 1.0:
            r = r * plan.residual_scale
        if plan.branch_scale is not None and plan.branch_scale[i] != 1.0:
            r = r * plan.branch_scale[i]
        if plan.grad_path is not None:
            if i in plan.grad_path:
                s = s.detach()
            else:
                r = r.detach()
        if plan.grad_scale is not None:
            r = _backward_scale(r, plan.grad_scale)
        return block.merge(s, r)

    def trunk(self, h: Tensor, plan: Plan = FULL, start: int = 0) -> Tensor:
        """Run the plan's block sequence from position `start` on the stem features `h`."""
        for i in plan.sequence(self.n_blocks)[start:]:
            h = self.run_block(i, h, plan)
        return h

    def block_inputs(self, x: Tensor) -> list[Tensor]:
        """Cache of the unlesioned network: the input of every block, then the trunk output.

        `cache[i]` is the input of block i; `cache[n]` feeds the head.
        """
        h = self.stem(x)
        cache = [h]
        for block in self.blocks:
            h = block(h)
            cache.append(h)
        return cache

    def forward(self, x: Tensor, plan: Plan | None = None) -> Tensor:
        plan = FULL if plan is None else plan
        return self.head(self.trunk(self.stem(x), plan))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
