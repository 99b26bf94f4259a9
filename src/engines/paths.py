"""The gradient-path engine behind paper Sec. 5 (Figs 6b and 6c): the gradient of single paths.

A path of length k enters the residual branch of k blocks and the shortcut of the other n-k. Its
gradient is what backpropagation gives when every other branch is cut: `net(x,
Plan(grad_path=path))` then backward (the *straightforward* method, one full forward and backward
per sample). The *fast* engine shares one forward pass among all samples of a batch and walks the
blocks backwards once for a whole stack of sampled paths: the cotangents of S paths are stacked
along a new leading dimension and at block i the residual-branch VJP is applied (batched, with
`is_grads_batched`) only to the samples whose path enters block i, the shortcut VJP to the rest
(nothing at all for an identity shortcut). A sample then costs the residual branches it crosses.

Every measurement runs the network that was tested: the trained network's eval plan (`plan`,
e.g. `training.test_mode=rescale` scaling residual branches by k/n; None: the full network) with
the backward-only gate on top, `Plan(grad_path=...)` composed with it as the lesion studies compose
their deletions. A block the eval plan deletes has no residual branch for a path to enter.

"Gradient at the input" is the gradient of the batch-mean cross-entropy w.r.t. the network input
x (`wrt=input`, default: the stem is part of every path) or the stem output (`wrt=stem`); its norm
is the Frobenius norm over the whole batch. BatchNorm runs in eval mode by default (the trained
network's function; `bn=train` uses batch statistics, on a copy, so running stats are untouched).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from src.errors import ConfigError
from src.models.network import FULL, Block, Network, Plan

WRT = ("input", "stem")
GRADIENT_KINDS = ("lesion", "scale", "block_scale")  # the Plan.FIELDS kinds measured here
BN_MODES = ("eval", "train")


def prepared(net: Network, bn: str = "eval", dtype: torch.dtype | None = None) -> Network:
    """The network to measure: `net` itself in eval mode, or a copy (train-mode BN / another
    dtype, e.g. float64)."""
    if bn not in BN_MODES:
        raise ConfigError(f"bn={bn!r}: choose 'eval' (running statistics) or 'train' (batch)")
    if bn == "eval" and dtype in (None, next(net.parameters()).dtype):
        return net.eval()
    net = copy.deepcopy(net).train(bn == "train")
    return net.to(dtype) if dtype is not None else net


def gradient_plan(base: Plan | None, **gate) -> Plan:
    """`base` (the trained network's eval plan, or the full network) with a backward-only gate
    (`grad_path=...` or `grad_scale=...`) on top."""
    base = FULL if base is None else base
    # what BlockVJPs runs: the lesion fields and the branch scales of `Network.scaled`
    refused = base.changed(*(k for k in base.KINDS if k not in GRADIENT_KINDS))
    if refused:
        handled = "/".join(base.of_kind(*GRADIENT_KINDS))
        raise ConfigError(
            f"gradient paths measure a fixed eval plan ({handled}), not one with "
            f"{'/'.join(refused)}: pass the network's test-time plan"
        )
    if base.order is not None and len(set(base.order)) < len(base.order):
        raise ConfigError(
            f"order={list(base.order)} runs a block more than once: a path is a set of blocks, "
            "so gradient paths measure plans that run each block at most once"
        )
    return dataclasses.replace(base, **gate)


def loss_of(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per target: (B, C) logits of a classifier, or (B, T, V) next-token
    logits of a language model with (B, T) targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def as_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Images in the measuring dtype; integer inputs (a language model's tokens) as they are."""
    return x.to(dtype) if x.is_floating_point() else x


def check_wrt(x: Tensor, wrt: str) -> None:
    if wrt not in WRT:
        raise ConfigError(f"wrt={wrt!r}: choose 'input' (network input) or 'stem' (its output)")
    if wrt == "input" and not x.is_floating_point():
        raise ConfigError(
            "wrt=input: this network's input is integer tokens, which have no gradient; use "
            "wrt=stem (the gradient at the embedding output)"
        )


def check_residual(net: Network) -> None:
    plain = [i for i, b in enumerate(net.blocks) if not b.has_shortcut]
    if plain:
        raise ConfigError(
            f"gradient paths need residual blocks, but this {type(net.blocks[plain[0]]).__name__} "
            f"network has {len(plain)} plain layers without a shortcut: use a ResNet "
            "(e.g. model=resnet110)"
        )


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
    """One forward pass of `net` under `plan` (an eval plan: None is the full network) on (x, y),
    keeping every running branch as a separate graph.

    The pass runs the plan's steps (`Network.steps`: one block each, or the branches of a
    parallel-residual layer on one input). For step t, `inputs[t]` is its input leaf;
    `enter[t]` maps each block whose residual branch runs there to that branch as a function of
    `inputs[t]` (merge(shortcut.detach(), residual) of a single block; a parallel layer's branch
    alone; residuals scaled by `Network.scaled`, as the network runs them); `bypass[t]` is
    merge(shortcut, residual.detach()), or None for an identity shortcut with an additive merge
    (its VJP is the identity; always so in a parallel layer); a block the plan deletes has no
    entry in `enter[t]` (only its skip runs). `g_top` is d loss / d (trunk output), shared by
    every path.
    """

    def __init__(
        self,
        net: Network,
        x: Tensor,
        y: Tensor,
        wrt: str = "input",
        batched: bool | None = None,
        plan: Plan | None = None,
    ):
        check_wrt(x, wrt)
        check_residual(net)
        plan = gradient_plan(plan)
        plan.validate(net.n_blocks)
        self.wrt, self.n_blocks = wrt, net.n_blocks
        self.sequence = plan.sequence(net.n_blocks)
        self.steps = [tuple(self.sequence[p] for p in step) for step in net.steps(plan)]
        self.batched = x.device.type != "cpu" if batched is None else batched
        self.inputs, self.enter, self.bypass = [], [], []
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(wrt == "input")
            self.stem_out = net.stem(self.x)
            h = self.stem_out.detach().requires_grad_()
            for blocks in self.steps:
                self.inputs.append(h)
                if len(blocks) > 1:  # a parallel layer: identity shortcut, branches summed
                    rs = {i: net.scaled(i, net.blocks[i].residual(h), plan) for i in blocks}
                    rs = {i: r for i, r in rs.items() if i not in plan.deleted}
                    self.enter.append(rs)
                    self.bypass.append(None)
                    out = h + sum(rs.values()) if rs else h
                    h = out.detach().requires_grad_()
                    continue
                i = blocks[0]
                block = net.blocks[i]
                if i in plan.deleted:
                    out = block.skip(h)
                    self.enter.append({})
                    self.bypass.append(None if out is h else out)
                else:
                    s, r = block.shortcut(h), net.scaled(i, block.residual(h), plan)
                    self.enter.append({i: block.merge(s.detach(), r)})
                    identity = s is h and type(block).merge is Block.merge
                    self.bypass.append(None if identity else block.merge(s, r.detach()))
                    out = block.merge(s, r)
                h = out.detach().requires_grad_()
            loss = loss_of(net.head(h), y)
            self.g_top = torch.autograd.grad(loss, h)[0]

    def branches(self, t: int) -> list[int]:
        """The blocks whose residual branch a path can enter at step t (none: all deleted)."""
        return list(self.enter[t])

    def choice(self, t: int, path: frozenset[int]) -> int | None:
        """The block `path` enters at step t (None: it takes the shortcut)."""
        entered = [i for i in self.enter[t] if i in path]
        if len(entered) > 1:
            raise ConfigError(
                f"path {sorted(path)} enters blocks {entered} of one parallel layer: a path "
                "enters at most one branch of a parallel layer (sample with its path groups)"
            )
        return entered[0] if entered else None

    def trie_order(self, paths: Sequence[frozenset[int]]) -> list[int]:
        return trie_order(self.sequence, paths)

    def through_residual(self, t: int, i: int, gs: list[Tensor]) -> list[Tensor]:
        return _vjp(self.enter[t][i], self.inputs[t], gs, self.batched)

    def through_shortcut(self, t: int, gs: list[Tensor]) -> list[Tensor]:
        return (
            gs if self.bypass[t] is None else _vjp(self.bypass[t], self.inputs[t], gs, self.batched)
        )

    def to_wrt(self, gs: list[Tensor]) -> list[Tensor]:
        """Carry gradients at the stem output back to the measured point."""
        return gs if self.wrt == "stem" else _vjp(self.stem_out, self.x, gs, self.batched)

    def path_grads(self, paths: Sequence[frozenset[int]]) -> Tensor:
        """Gradients (S, *x.shape) of the S given paths (sets of blocks whose residual they enter).

        Paths that made the same choices in all steps above step t share one cotangent there
        (a trie walked from the output), so a shared prefix is computed once; an identity shortcut
        passes its cotangents on untouched.
        """
        states, ptr = [self.g_top], [0] * len(paths)  # distinct cotangents; path -> state
        for t in reversed(range(len(self.steps))):
            choices = [self.choice(t, path) for path in paths]
            if all(c is None for c in choices) and self.bypass[t] is None:
                continue
            keys: dict[tuple[int, int | None], int] = {}
            ptr = [keys.setdefault((s, c), len(keys)) for s, c in zip(ptr, choices)]
            skip = [k for k in keys if k[1] is None]
            done = dict(zip(skip, self.through_shortcut(t, [states[s] for s, _ in skip])))
            for i in self.branches(t):
                enter = [k for k in keys if k[1] == i]
                done.update(zip(enter, self.through_residual(t, i, [states[s] for s, _ in enter])))
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
    plan: Plan | None = None,
) -> Tensor:
    """Gradients of many paths on one batch: one forward, batched VJPs, `chunk` paths at a time,
    under the eval plan `plan` (None: the full network).

    Paths are walked in the lexicographic order of their choices from the output down, so that
    paths with shared top choices land in the same chunk (and share those VJPs).
    """
    engine = BlockVJPs(net, x, y, wrt, batched, plan)
    order = engine.trie_order(paths)
    grads = torch.cat(
        [
            engine.path_grads([paths[j] for j in order[c : c + chunk]])
            for c in range(0, len(paths), chunk)
        ]
    )
    return grads[torch.argsort(torch.tensor(order))]


def gated_grad(net: Network, x: Tensor, y: Tensor, plan: Plan, wrt: str = "input") -> Tensor:
    """Gradient of the batch-mean cross-entropy w.r.t. the input (or stem output) under `plan`."""
    check_wrt(x, wrt)
    with torch.enable_grad():
        x = x.detach().requires_grad_(wrt == "input")
        h = net.stem(x)
        leaf = x
        if wrt == "stem":
            h = leaf = h.detach().requires_grad_()
        loss = loss_of(net.head(net.trunk(h, plan)), y)
        return torch.autograd.grad(loss, leaf)[0]


def straightforward_path_grad(
    net: Network,
    x: Tensor,
    y: Tensor,
    path: frozenset[int],
    wrt: str = "input",
    plan: Plan | None = None,
) -> Tensor:
    """Reference: a full forward + backward under the eval plan with `grad_path=path` on top."""
    return gated_grad(net, x, y, gradient_plan(plan, grad_path=frozenset(path)), wrt)


def straightforward_path_grads(net, x, y, paths, wrt: str = "input", plan=None) -> Tensor:
    return torch.stack([straightforward_path_grad(net, x, y, p, wrt, plan) for p in paths])


ENGINES = {"fast": fast_path_grads, "straightforward": straightforward_path_grads}


def path_counts(n: int, groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Exact number of paths of each length 0..n: C(n, k) for n blocks in sequence; with
    `groups` (`Network.path_groups`: a path enters at most one block of each), the elementary
    symmetric sums of the group sizes (3^L paths for L parallel layers of two branches)."""
    if groups is None:
        return [math.comb(n, k) for k in range(n + 1)]
    counts = [1] + [0] * n
    for g in groups:  # each group: skip it (length kept) or enter one of its len(g) blocks
        counts = [counts[0], *(c + len(g) * d for c, d in zip(counts[1:], counts[:-1]))]
    return counts


def sample_paths(
    n: int,
    lengths: Sequence[int],
    samples: int,
    gen: torch.Generator,
    groups: Sequence[Sequence[int]] | None = None,
):
    """`samples` uniformly random paths of each length k: [(k, frozenset), ...]. Without
    `groups`, k-subsets of range(n); with `groups` (some holding the branches of a parallel
    layer), uniform over the paths that enter at most one block per group: groups are chosen
    one by one with the probability of the paths that take them, then a block within."""
    if groups is None:
        return [
            (k, frozenset(torch.randperm(n, generator=gen)[:k].tolist()))
            for k in lengths
            for _ in range(samples)
        ]
    # tail[t][r]: paths of length r through groups t.. (exact integers)
    tail = [[1] + [0] * n]
    for g in reversed(groups):
        after = tail[0]
        tail.insert(0, [after[0], *(a + len(g) * b for a, b in zip(after[1:], after[:-1]))])
    rng = random.Random(int(torch.randint(2**62, (1,), generator=gen)))  # exact big integers
    out = []
    for k in lengths:
        if not 0 <= k <= n or tail[0][k] == 0:
            raise ConfigError(f"lengths={list(lengths)}: this network has no path of length {k}")
        for _ in range(samples):
            path, r = [], k
            for t, g in enumerate(groups):
                if r == 0:
                    break
                take = len(g) * tail[t + 1][r - 1]  # paths that enter group t
                u = rng.randrange(tail[t][r])
                if u < take:
                    path.append(g[u % len(g)])
                    r -= 1
            out.append((k, frozenset(path)))
    return out


def trie_order(sequence: Sequence[int], paths: Sequence[frozenset[int]]) -> list[int]:
    """Path indices in the lexicographic order of their choices from the output down (the
    order the fast engine walks them in, `chunk` at a time; it depends on the plan only)."""
    top_down = list(reversed(sequence))
    return sorted(range(len(paths)), key=lambda j: [i in paths[j] for i in top_down])


def path_chunks(sequence: Sequence[int], paths: Sequence[frozenset[int]], chunk: int) -> list:
    """The fast engine's chunks of `paths` (lists of path indices), in the order it walks them:
    each chunk's norms depend on its own paths only, so chunks can be computed apart."""
    order = trie_order(sequence, paths)
    return [order[c : c + chunk] for c in range(0, len(order), chunk)]


def path_grad_norms(
    net: Network,
    x: Tensor,
    y: Tensor,
    paths: Sequence[frozenset[int]],
    wrt: str = "input",
    engine: str = "fast",
    chunk: int = 128,
    plan: Plan | None = None,
    chunks: Sequence[int] | None = None,
) -> Tensor:
    """Norm of each path's gradient on the batch (x, y) under the eval plan `plan` (None: the full
    network), by the chosen engine, in path order. `chunks`: only the fast engine's chunks with
    these indices (`path_chunks`; the other paths' norms are NaN); None: every path."""
    if engine not in ("fast", "straightforward"):
        raise ConfigError(f"engine={engine!r}: choose 'fast' or 'straightforward'")
    walk = path_chunks(gradient_plan(plan).sequence(net.n_blocks), paths, chunk)
    chunks = range(len(walk)) if chunks is None else chunks
    norms = torch.full((len(paths),), math.nan, dtype=torch.float64)
    if engine == "straightforward":  # each path alone
        for j in (j for c in chunks for j in walk[c]):
            norms[j] = straightforward_path_grad(net, x, y, paths[j], wrt, plan).double().norm()
        return norms
    vjps = BlockVJPs(net, x, y, wrt, plan=plan)
    for c in chunks:
        idx = walk[c]
        grads = vjps.path_grads([paths[j] for j in idx]).flatten(1)
        norms[idx] = grads.double().norm(dim=1).cpu()  # squares of tiny float32s underflow
    return norms
