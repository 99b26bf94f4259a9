"""Exact signed decomposition of the input gradient by path length (beyond the paper's Fig 6c).

Scale every residual branch by lambda in the backward pass only (`Plan(grad_scale=lam)`). Each
block's backward map becomes J_s^T + lam J_r^T, so the input gradient is a polynomial

    g(lam) = sum_k lam^k G_k,    G_k = sum of the gradients of all C(n, k) paths of length k.

Fig 6c estimates the gradient carried by length k as C(n, k) x (mean path-gradient norm), which
ignores cancellation between paths; ||G_k|| is the exact size of their signed sum.

`method="propagate"` (default) computes the G_k exactly, with no interpolation: walking the blocks
from the output, the cotangent is a polynomial in lam whose coefficients follow
C'_j = J_s^T C_j + J_r^T C_{j-1} (a path either skips block i, keeping its length, or enters it,
adding one). That is n(n+1)/2 residual VJPs after one shared forward, in float64, and it is the
dynamic program that sums the 2^n paths of the unraveled view by length.
`method="interpolate"` is the textbook route: n+1 backward passes of `Plan(grad_scale=lam)` at
Chebyshev nodes in [-1, 1] and a float64 Vandermonde solve; the monomial Vandermonde's condition
number grows like ~2.4^n, so it is only trustworthy for small n (the condition is returned).
`enumerate_paths` is the brute-force check: every one of the 2^n paths, summed by length.

All of them measure the network under an eval plan (`plan`; None: the full network), with
`grad_scale` composed on top: a block the plan deletes has no residual branch, so G_k is zero for
k above the number of blocks that keep theirs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import Tensor

from src.engines.paths import (
    BlockVJPs,
    as_input,
    gated_grad,
    gradient_plan,
    prepared,
    straightforward_path_grad,
)
from src.errors import ConfigError
from src.models.network import FULL, Network, Plan

METHODS = ("propagate", "interpolate")


def propagate(
    net: Network, x: Tensor, y: Tensor, wrt: str = "input", plan: Plan | None = None
) -> Tensor:
    """G_0..G_n, shape (n+1, *x.shape), by propagating polynomial coefficients (exact)."""
    engine = BlockVJPs(net, x, y, wrt, plan=plan)
    coeffs = [engine.g_top]  # coefficient j of the cotangent's polynomial in lam
    for t in reversed(range(len(engine.steps))):
        skip = engine.through_shortcut(t, coeffs)
        if not engine.branches(t):
            coeffs = skip
            continue
        # a path skips step t (length kept) or enters one of its branches (length + 1)
        enters = [engine.through_residual(t, i, coeffs) for i in engine.branches(t)]
        new = [skip[0]]
        for j in range(1, len(coeffs)):
            c = skip[j]
            for enter in enters:
                c = c + enter[j - 1]
            new.append(c)
        last = enters[0][-1]
        for enter in enters[1:]:
            last = last + enter[-1]
        coeffs = [*new, last]
    coeffs = engine.to_wrt(coeffs)
    zeros = [torch.zeros_like(coeffs[0])] * (engine.n_blocks + 1 - len(coeffs))
    return torch.stack([*coeffs, *zeros])


def scaled_grad(
    net: Network, x: Tensor, y: Tensor, lam: float, wrt: str = "input", plan: Plan | None = None
) -> Tensor:
    """Reference g(lam): one forward + backward under the eval plan with `grad_scale=lam`."""
    return gated_grad(net, x, y, gradient_plan(plan, grad_scale=float(lam)), wrt)


def interpolate(
    net: Network, x: Tensor, y: Tensor, wrt: str = "input", plan: Plan | None = None
) -> tuple[Tensor, float]:
    """G_0..G_n from n+1 evaluations of g at Chebyshev nodes; returns (G, cond(Vandermonde))."""
    n = net.n_blocks
    nodes = np.cos(np.pi * (np.arange(n + 1) + 0.5) / (n + 1))
    values = torch.stack([scaled_grad(net, x, y, lam, wrt, plan) for lam in nodes])
    vander = np.vander(nodes, n + 1, increasing=True)
    flat = values.reshape(n + 1, -1).double().cpu().numpy()
    coeffs = np.linalg.solve(vander, flat).reshape(values.shape)
    return torch.from_numpy(coeffs).to(values), float(np.linalg.cond(vander))


def enumerate_paths(
    net: Network, x: Tensor, y: Tensor, wrt: str = "input", plan: Plan | None = None
) -> Tensor:
    """Brute force: sum the straightforward gradient of every path by length: the 2^m subsets of
    the m blocks that run with their residual branch under `plan`, where a path enters at most
    one branch of a parallel layer (`Network.path_groups`)."""
    n, plan = net.n_blocks, FULL if plan is None else plan
    groups = net.path_groups(plan)  # a path enters at most one block of each
    if math.prod(len(g) + 1 for g in groups) > 2**16:
        raise ConfigError(
            f"enumerating {math.prod(len(g) + 1 for g in groups)} paths is infeasible: use a "
            "network of <= 16 blocks"
        )
    sums: list[Tensor | int] = [0] * (n + 1)  # lengths above len(groups): no path, zero
    for choice in itertools.product(*[(None, *g) for g in groups]):
        path = frozenset(i for i in choice if i is not None)
        sums[len(path)] = sums[len(path)] + straightforward_path_grad(net, x, y, path, wrt, plan)
    like = sums[0]
    return torch.stack([s if torch.is_tensor(s) else torch.zeros_like(like) for s in sums])


def decompose(
    net: Network,
    x: Tensor,
    y: Tensor,
    wrt: str = "input",
    bn: str = "eval",
    method: str = "propagate",
    plan: Plan | None = None,
) -> Tensor:
    """G_0..G_n in float64 on a float64 copy of `net` (the model itself is left untouched), under
    the eval plan `plan` (None: the full network)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    net64 = prepared(net, bn, torch.float64)
    x64 = as_input(x.detach(), torch.float64)
    if method == "propagate":
        return propagate(net64, x64, y, wrt, plan)
    return interpolate(net64, x64, y, wrt, plan)[0]
