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
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.analysis.gradient_paths import BlockVJPs, prepared, straightforward_path_grad
from src.errors import ConfigError
from src.models.network import Network, Plan

METHODS = ("propagate", "interpolate")


def propagate(net: Network, x: Tensor, y: Tensor, wrt: str = "input") -> Tensor:
    """G_0..G_n, shape (n+1, *x.shape), by propagating polynomial coefficients (exact)."""
    engine = BlockVJPs(net, x, y, wrt)
    coeffs = [engine.g_top]  # coefficient j of the cotangent's polynomial in lam
    for i in reversed(range(engine.n_blocks)):
        skip = engine.through_shortcut(i, coeffs)
        enter = engine.through_residual(i, coeffs)
        coeffs = [skip[0], *(a + b for a, b in zip(skip[1:], enter[:-1])), enter[-1]]
    return torch.stack(engine.to_wrt(coeffs))


def scaled_grad(net: Network, x: Tensor, y: Tensor, lam: float, wrt: str = "input") -> Tensor:
    """Reference g(lam): one forward + backward under `Plan(grad_scale=lam)`."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(wrt == "input")
        h = leaf = net.stem(x)
        if wrt == "stem":
            h = leaf = h.detach().requires_grad_()
        else:
            leaf = x
        loss = F.cross_entropy(net.head(net.trunk(h, Plan(grad_scale=float(lam)))), y)
        return torch.autograd.grad(loss, leaf)[0]


def interpolate(net: Network, x: Tensor, y: Tensor, wrt: str = "input") -> tuple[Tensor, float]:
    """G_0..G_n from n+1 evaluations of g at Chebyshev nodes; returns (G, cond(Vandermonde))."""
    n = net.n_blocks
    nodes = np.cos(np.pi * (np.arange(n + 1) + 0.5) / (n + 1))
    values = torch.stack([scaled_grad(net, x, y, lam, wrt) for lam in nodes])
    vander = np.vander(nodes, n + 1, increasing=True)
    flat = values.reshape(n + 1, -1).double().cpu().numpy()
    coeffs = np.linalg.solve(vander, flat).reshape(values.shape)
    return torch.from_numpy(coeffs).to(values), float(np.linalg.cond(vander))


def enumerate_paths(net: Network, x: Tensor, y: Tensor, wrt: str = "input") -> Tensor:
    """Brute force: sum the straightforward gradient of every one of the 2^n paths by length."""
    n = net.n_blocks
    if n > 16:
        raise ConfigError(f"enumerating 2^{n} paths is infeasible: use a network of <= 16 blocks")
    sums: list[Tensor | int] = [0] * (n + 1)
    for bits in itertools.product((0, 1), repeat=n):
        path = frozenset(i for i, b in enumerate(bits) if b)
        sums[len(path)] = sums[len(path)] + straightforward_path_grad(net, x, y, path, wrt)
    return torch.stack(sums)


def decompose(
    net: Network,
    x: Tensor,
    y: Tensor,
    wrt: str = "input",
    bn: str = "eval",
    method: str = "propagate",
) -> Tensor:
    """G_0..G_n in float64 on a float64 copy of `net` (the model itself is left untouched)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    net64 = prepared(net, bn, torch.float64)
    x64 = x.detach().to(torch.float64)
    if method == "propagate":
        return propagate(net64, x64, y, wrt)
    return interpolate(net64, x64, y, wrt)[0]
