"""Gradient per path length (paper Sec. 5, Figs 6b and 6c) and the engine that measures it.

A path of length k enters the residual branch of k blocks and the shortcut of the other n-k. Its
gradient is what backpropagation gives when every other branch is cut: `net(x,
Plan(grad_path=path))` then backward (the *straightforward* method, one full forward and backward
per sample). The *fast* engine shares one forward pass among all samples of a batch and walks the
blocks backwards once for a whole stack of sampled paths: the cotangents of S paths are stacked
along a new leading dimension and at block i the residual-branch VJP is applied (batched, with
`is_grads_batched`) only to the samples whose path enters block i, the shortcut VJP to the rest
(nothing at all for an identity shortcut). A sample then costs the residual branches it crosses.

"Gradient at the input" is the gradient of the batch-mean cross-entropy w.r.t. the network input
x (`wrt=input`, default: the stem is part of every path) or the stem output (`wrt=stem`); its norm
is the Frobenius norm over the whole batch. BatchNorm runs in eval mode by default (the trained
network's function; `bn=train` uses batch statistics, on a copy, so running stats are untouched).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from src.errors import ConfigError
from src.models.network import Block, Network, Plan

WRT = ("input", "stem")
BN_MODES = ("eval", "train")


def prepared(net: Network, bn: str = "eval", dtype: torch.dtype | None = None) -> Network:
    """The network to measure: `net` itself in eval mode, or a copy (train-mode BN / float64)."""
    if bn not in BN_MODES:
        raise ConfigError(f"bn={bn!r}: choose 'eval' (running statistics) or 'train' (batch)")
    if bn == "eval" and dtype is None:
        return net.eval()
    net = copy.deepcopy(net).train(bn == "train")
    return net.to(dtype) if dtype is not None else net


def _vjp(out: Tensor, inp: Tensor, cotangents: list[Tensor], batched: bool) -> list[Tensor]:
    """VJPs of `out` w.r.t. `inp`, one per cotangent: one vmapped backward (`batched`), or a loop.

    On CPU the loop is faster (PyTorch's batched conv backward copies more than it saves); on an
    accelerator, one wide kernel per block is what makes sampling cheap.
    """
    if not cotangents:
        return []
    if batched and len(cotangents) > 1:
        grads = torch.autograd.grad(
            out, inp, torch.stack(cotangents), retain_graph=True, is_grads_batched=True
        )[0]
        return list(grads.unbind(0))
    return [torch.autograd.grad(out, inp, g, retain_graph=True)[0] for g in cotangents]


class BlockVJPs:
    """One forward pass of `net` on (x, y), keeping every block's two branches as a separate graph.

    `enter[i]` is merge(shortcut.detach(), residual) and `bypass[i]` is merge(shortcut,
    residual.detach()) of block i, both as functions of the block's own input leaf `inputs[i]`;
    `bypass[i]` is None for an identity shortcut with an additive merge (its VJP is the identity).
    `g_top` is d loss / d (trunk output), shared by every path.
    """

    def __init__(
        self, net: Network, x: Tensor, y: Tensor, wrt: str = "input", batched: bool | None = None
    ):
        if wrt not in WRT:
            raise ConfigError(f"wrt={wrt!r}: choose 'input' (network input) or 'stem' (its output)")
        self.wrt = wrt
        self.batched = x.device.type != "cpu" if batched is None else batched
        self.inputs, self.enter, self.bypass = [], [], []
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(wrt == "input")
            self.stem_out = net.stem(self.x)
            h = self.stem_out.detach().requires_grad_()
            for block in net.blocks:
                if not block.has_shortcut:
                    raise ConfigError("gradient paths need residual blocks: use a ResNet model")
                s, r = block.shortcut(h), block.residual(h)
                self.inputs.append(h)
                self.enter.append(block.merge(s.detach(), r))
                identity = s is h and type(block).merge is Block.merge
                self.bypass.append(None if identity else block.merge(s, r.detach()))
                h = block.merge(s, r).detach().requires_grad_()
            loss = F.cross_entropy(net.head(h), y)
            self.g_top = torch.autograd.grad(loss, h)[0]

    @property
    def n_blocks(self) -> int:
        return len(self.inputs)

    def through_residual(self, i: int, gs: list[Tensor]) -> list[Tensor]:
        return _vjp(self.enter[i], self.inputs[i], gs, self.batched)

    def through_shortcut(self, i: int, gs: list[Tensor]) -> list[Tensor]:
        return (
            gs if self.bypass[i] is None else _vjp(self.bypass[i], self.inputs[i], gs, self.batched)
        )

    def to_wrt(self, gs: list[Tensor]) -> list[Tensor]:
        """Carry gradients at the stem output back to the measured point."""
        return gs if self.wrt == "stem" else _vjp(self.stem_out, self.x, gs, self.batched)

    def path_grads(self, paths: Sequence[frozenset[int]]) -> Tensor:
        """Gradients (S, *x.shape) of the S given paths (sets of blocks whose residual they enter).

        Paths that made the same choices in all blocks above block i share one cotangent there
        (a trie walked from the output), so a shared prefix is computed once; an identity shortcut
        passes its cotangents on untouched.
        """
        states, ptr = [self.g_top], [0] * len(paths)  # distinct cotangents; path -> state
        for i in reversed(range(self.n_blocks)):
            enters = [i in p for p in paths]
            if not any(enters) and self.bypass[i] is None:
                continue
            keys: dict[tuple[int, bool], int] = {}
            ptr = [keys.setdefault((s, e), len(keys)) for s, e in zip(ptr, enters)]
            skip = [k for k in keys if not k[1]]
            enter = [k for k in keys if k[1]]
            done = dict(zip(skip, self.through_shortcut(i, [states[s] for s, _ in skip])))
            done.update(zip(enter, self.through_residual(i, [states[s] for s, _ in enter])))
            states = [done[k] for k in keys]
        states = self.to_wrt(states)
        return torch.stack([states[s] for s in ptr])


def fast_path_grads(
    net: Network,
    x: Tensor,
    y: Tensor,
    paths: Sequence[frozenset[int]],
    wrt: str = "input",
    chunk: int = 128,
    batched: bool | None = None,
) -> Tensor:
    """Gradients of many paths on one batch: one forward, batched VJPs, `chunk` paths at a time.

    Paths are walked in the lexicographic order of their choices from the output down, so that
    paths with shared top choices land in the same chunk (and share those VJPs).
    """
    engine = BlockVJPs(net, x, y, wrt, batched)
    n = engine.n_blocks
    order = sorted(range(len(paths)), key=lambda j: [i in paths[j] for i in reversed(range(n))])
    grads = torch.cat(
        [
            engine.path_grads([paths[j] for j in order[c : c + chunk]])
            for c in range(0, len(paths), chunk)
        ]
    )
    return grads[torch.argsort(torch.tensor(order))]


def straightforward_path_grad(
    net: Network, x: Tensor, y: Tensor, path: frozenset[int], wrt: str = "input"
) -> Tensor:
    """Reference: a full forward + backward under `Plan(grad_path=path)`."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(wrt == "input")
        h = net.stem(x)
        leaf = x
        if wrt == "stem":
            h = leaf = h.detach().requires_grad_()
        loss = F.cross_entropy(net.head(net.trunk(h, Plan(grad_path=frozenset(path)))), y)
        return torch.autograd.grad(loss, leaf)[0]


def straightforward_path_grads(net, x, y, paths, wrt: str = "input") -> Tensor:
    return torch.stack([straightforward_path_grad(net, x, y, p, wrt) for p in paths])


ENGINES = {"fast": fast_path_grads, "straightforward": straightforward_path_grads}


def sample_paths(n: int, lengths: Sequence[int], samples: int, gen: torch.Generator):
    """`samples` uniformly random k-subsets of range(n) for each k: [(k, frozenset), ...]."""
    return [
        (k, frozenset(torch.randperm(n, generator=gen)[:k].tolist()))
        for k in lengths
        for _ in range(samples)
    ]
