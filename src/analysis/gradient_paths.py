"""Gradient per path length (paper Sec. 5, Figs 6b and 6c) and the engine that measures it.

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
from collections.abc import Sequence
from math import comb

import torch
import torch.nn.functional as F
from torch import Tensor

from src.analysis.io import AnalysisCallback, log_to_wandb, save_figure, update_json, write_csv
from src.analysis.path_stats import check_share, share_between, shortest_window
from src.data.datamodules import batches
from src.errors import ConfigError
from src.models.network import FULL, Block, Network, Plan

WRT = ("input", "stem")
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
    training_only = (base.drop_prob, base.branch_scale, base.grad_path, base.grad_scale)
    if any(v is not None for v in training_only):
        raise ConfigError(
            "gradient paths measure a fixed eval plan (order, deleted, residual_scale), not one "
            "with drop_prob/branch_scale/grad_path/grad_scale: pass the network's test-time plan"
        )
    return dataclasses.replace(base, **gate)


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
    keeping every running block's two branches as a separate graph.

    Position p of the plan's sequence runs block `sequence[p]`. `enter[p]` is merge(shortcut
    .detach(), residual) and `bypass[p]` is merge(shortcut, residual.detach()) of that block, both
    as functions of its own input leaf `inputs[p]`, with the plan's residual scale applied;
    `bypass[p]` is None for an identity shortcut with an additive merge (its VJP is the identity);
    `enter[p]` is None for a block the plan deletes (only its skip runs). `g_top` is
    d loss / d (trunk output), shared by every path.
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
        if wrt not in WRT:
            raise ConfigError(f"wrt={wrt!r}: choose 'input' (network input) or 'stem' (its output)")
        check_residual(net)
        plan = gradient_plan(plan)
        plan.validate(net.n_blocks)
        self.wrt, self.n_blocks = wrt, net.n_blocks
        self.sequence = plan.sequence(net.n_blocks)
        self.batched = x.device.type != "cpu" if batched is None else batched
        self.inputs, self.enter, self.bypass = [], [], []
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(wrt == "input")
            self.stem_out = net.stem(self.x)
            h = self.stem_out.detach().requires_grad_()
            for i in self.sequence:
                block = net.blocks[i]
                self.inputs.append(h)
                if i in plan.deleted:
                    out = block.skip(h)
                    self.enter.append(None)
                    self.bypass.append(None if out is h else out)
                else:
                    s, r = block.shortcut(h), block.residual(h)
                    if plan.residual_scale != 1.0:
                        r = r * plan.residual_scale
                    self.enter.append(block.merge(s.detach(), r))
                    identity = s is h and type(block).merge is Block.merge
                    self.bypass.append(None if identity else block.merge(s, r.detach()))
                    out = block.merge(s, r)
                h = out.detach().requires_grad_()
            loss = F.cross_entropy(net.head(h), y)
            self.g_top = torch.autograd.grad(loss, h)[0]

    def enterable(self, p: int) -> bool:
        """Whether the block at position p has a residual branch for paths to enter."""
        return self.enter[p] is not None

    def trie_order(self, paths: Sequence[frozenset[int]]) -> list[int]:
        """Path indices in the lexicographic order of their choices from the output down."""
        top_down = list(reversed(self.sequence))
        return sorted(range(len(paths)), key=lambda j: [i in paths[j] for i in top_down])

    def through_residual(self, p: int, gs: list[Tensor]) -> list[Tensor]:
        return _vjp(self.enter[p], self.inputs[p], gs, self.batched)

    def through_shortcut(self, p: int, gs: list[Tensor]) -> list[Tensor]:
        return (
            gs if self.bypass[p] is None else _vjp(self.bypass[p], self.inputs[p], gs, self.batched)
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
        for p in reversed(range(len(self.sequence))):
            i = self.sequence[p]
            enters = [self.enterable(p) and i in path for path in paths]
            if not any(enters) and self.bypass[p] is None:
                continue
            keys: dict[tuple[int, bool], int] = {}
            ptr = [keys.setdefault((s, e), len(keys)) for s, e in zip(ptr, enters)]
            skip = [k for k in keys if not k[1]]
            enter = [k for k in keys if k[1]]
            done = dict(zip(skip, self.through_shortcut(p, [states[s] for s, _ in skip])))
            done.update(zip(enter, self.through_residual(p, [states[s] for s, _ in enter])))
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
    with torch.enable_grad():
        x = x.detach().requires_grad_(wrt == "input")
        h = net.stem(x)
        leaf = x
        if wrt == "stem":
            h = leaf = h.detach().requires_grad_()
        loss = F.cross_entropy(net.head(net.trunk(h, plan)), y)
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


def sample_paths(n: int, lengths: Sequence[int], samples: int, gen: torch.Generator):
    """`samples` uniformly random k-subsets of range(n) for each k: [(k, frozenset), ...]."""
    return [
        (k, frozenset(torch.randperm(n, generator=gen)[:k].tolist()))
        for k in lengths
        for _ in range(samples)
    ]


def path_grad_norms(
    net: Network,
    x: Tensor,
    y: Tensor,
    paths: Sequence[frozenset[int]],
    wrt: str = "input",
    engine: str = "fast",
    chunk: int = 128,
    plan: Plan | None = None,
) -> Tensor:
    """Norm of each path's gradient on the batch (x, y) under the eval plan `plan` (None: the full
    network), by the chosen engine, in path order."""
    if engine == "straightforward":
        return torch.stack(
            [straightforward_path_grad(net, x, y, p, wrt, plan).double().norm() for p in paths]
        )
    if engine != "fast":
        raise ConfigError(f"engine={engine!r}: choose 'fast' or 'straightforward'")
    vjps = BlockVJPs(net, x, y, wrt, plan=plan)
    order = vjps.trie_order(paths)
    norms = torch.empty(len(paths), dtype=torch.float64)
    for c in range(0, len(paths), chunk):
        idx = order[c : c + chunk]
        grads = vjps.path_grads([paths[j] for j in idx]).flatten(1)
        norms[idx] = grads.double().norm(dim=1).cpu()  # squares of tiny float32s underflow
    return norms


# --- Figs 6b and 6c from the measured norms -----------------------------------------------------


def length_stats(lengths: Sequence[int], norms: Sequence[float]) -> list[dict]:
    """Rows `length,samples,grad_norm_mean,grad_norm_std` (std with ddof=1; 0 for one sample)."""
    rows = []
    for k in sorted(set(lengths)):
        v = torch.tensor(
            [float(g) for l_, g in zip(lengths, norms) if l_ == k], dtype=torch.float64
        )
        std = float(v.std()) if len(v) > 1 else 0.0
        rows.append(
            {
                "length": k,
                "samples": len(v),
                "grad_norm_mean": float(v.mean()),
                "grad_norm_std": std,
            }
        )
    return rows


def fit_decay(rows: Sequence[dict]) -> dict:
    """Least-squares line log(mean norm) = a + b k: b is the decay rate per block entered."""
    pts = [(r["length"], math.log(r["grad_norm_mean"])) for r in rows if r["grad_norm_mean"] > 0]
    if len(pts) < 2:
        return {"decay_rate": None, "intercept": None, "factor_per_block": None}
    k = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    v = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    b = float(((k - k.mean()) * (v - v.mean())).sum() / ((k - k.mean()) ** 2).sum())
    a = float(v.mean() - b * k.mean())
    return {"decay_rate": b, "intercept": a, "factor_per_block": math.exp(b)}


def total_gradient(n: int, rows: Sequence[dict]) -> list[dict]:
    """Fig 6c: C(n, k) x mean norm per measured length, as log10 and as a share of their sum.

    Counts reach 2^54, so the products are formed in log space (math.log of exact ints)."""
    logs = [
        math.log(comb(n, r["length"])) + math.log(r["grad_norm_mean"])
        if r["grad_norm_mean"] > 0
        else -math.inf
        for r in rows
    ]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    total = math.fsum(weights)
    return [
        {"length": r["length"], "log10_total": v / math.log(10), "share": w / total}
        for r, v, w in zip(rows, logs, weights)
    ]


# --- the callback (experiment=gradient_paths) ---------------------------------------------------


class GradientPaths(AnalysisCallback):
    """Figs 6b/6c after testing: `samples` random paths of each length in `lengths` (None: 1..n),
    spread round-robin over `batches` random training batches, each batch forwarded once.

    Writes `analysis/gradient_paths.csv` (length,samples,grad_norm_mean,grad_norm_std),
    `analysis/path_decomposition.csv` (exact ||G_k||, when `decomposition`), the figure, and
    `gradient_paths` in `analysis/summary.json` (decay rate, Fig 6c window of `share`).
    """

    def __init__(
        self,
        samples: int = 1000,
        lengths: Sequence[int] | None = None,
        batches: int = 10,
        split: str = "train",
        bn: str = "eval",
        wrt: str = "input",
        share: float = 0.9,
        engine: str = "fast",
        chunk: int = 128,
        decomposition: bool = True,
        seed: int = 0,
        dtype: str = "float64",
    ):
        self.samples, self.batches, self.chunk, self.seed = samples, batches, chunk, seed
        self.lengths = None if lengths is None else sorted({int(k) for k in lengths})
        self.split, self.bn, self.wrt, self.share, self.engine = split, bn, wrt, share, engine
        self.decomposition, self.dtype = decomposition, dtype

    def validate(self, n: int) -> list[int]:
        """Raise ConfigError on bad settings; return the lengths to sample for n blocks.

        Called from `setup` (before training) rather than the constructor: Hydra's `instantiate`
        wraps constructor errors, while errors from Lightning hooks reach run.py's one-line report.
        """
        if int(self.samples) < 1:
            raise ConfigError(f"samples={self.samples}: need at least 1 path sample per length")
        if int(self.batches) < 1 or int(self.chunk) < 1:
            raise ConfigError(f"batches={self.batches} and chunk={self.chunk} must be at least 1")
        check_share(self.share)
        if self.bn not in BN_MODES or self.wrt not in WRT or self.engine not in ENGINES:
            raise ConfigError(
                f"bn={self.bn!r}, wrt={self.wrt!r}, engine={self.engine!r}: choose bn in "
                f"{BN_MODES}, wrt in {WRT}, engine in {tuple(ENGINES)}"
            )
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype={self.dtype!r}: choose float64 (default) or float32")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split={self.split!r}: choose train, val or test")
        lengths = list(range(1, n + 1)) if self.lengths is None else self.lengths
        if not lengths or not 1 <= min(lengths) <= max(lengths) <= n:
            raise ConfigError(
                f"lengths={lengths}: path lengths must lie in 1..{n} (this network has {n} blocks)"
            )
        return lengths

    def check(self, pl_module) -> list[int]:
        """Raise ConfigError when the analysis cannot apply to the module's network; return the
        lengths to sample."""
        check_residual(pl_module.net)
        gradient_plan(pl_module.eval_plan)
        return self.validate(pl_module.net.n_blocks)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.check(pl_module)  # fail before training, not after

    def analyse(self, trainer, pl_module) -> None:
        was_training = pl_module.net.training
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self._analyse(trainer, pl_module)
        finally:
            pl_module.net.train(was_training)

    def _analyse(self, trainer, pl_module) -> None:
        net, plan = pl_module.net, pl_module.eval_plan  # measure the network that was tested
        n, lengths = net.n_blocks, self.check(pl_module)
        dtype = getattr(torch, self.dtype)  # float64: long paths' norms (~1e-40) stay representable
        measured = prepared(net, self.bn, dtype)
        gen = torch.Generator().manual_seed(int(self.seed))
        sampled = sample_paths(n, lengths, int(self.samples), gen)
        data = batches(trainer.datamodule, self.split, pl_module.device, train=False)
        held = [xy for _, xy in zip(range(int(self.batches)), data)]  # fewer if the split is small
        norms = torch.empty(len(sampled), dtype=torch.float64)
        for b, (x, y) in enumerate(held):
            x = x.to(dtype)
            idx = list(range(b, len(sampled), len(held)))
            paths = [sampled[j][1] for j in idx]
            got = path_grad_norms(
                measured, x, y, paths, self.wrt, self.engine, int(self.chunk), plan
            )
            norms[idx] = got.to(norms)
        rows = length_stats([k for k, _ in sampled], norms.tolist())
        fit = fit_decay(rows)
        totals = total_gradient(n, rows)
        lo, hi = shortest_window([t["share"] for t in totals], self.share)
        summary = {
            "n_blocks": n,
            "samples_per_length": self.samples,
            "batches": len(held),
            "batch_size": len(held[0][1]),
            "bn": self.bn,
            "wrt": self.wrt,
            "engine": self.engine,
            "dtype": self.dtype,
            "residual_scale": (plan or Plan()).residual_scale,  # of the eval plan measured
            **fit,
            "share": self.share,
            "effective_window": [rows[lo]["length"], rows[hi]["length"]],
            "effective_window_share": math.fsum(t["share"] for t in totals[lo : hi + 1]),
            "effective_window_fraction_of_paths": float(
                share_between(n, rows[lo]["length"], rows[hi]["length"])
            ),
            "peak_total_length": max(totals, key=lambda t: t["share"])["length"],
        }
        out = self.analysis_dir(trainer)
        columns = ["length", "samples", "grad_norm_mean", "grad_norm_std"]
        write_csv(out / "gradient_paths.csv", rows, columns)
        exact = None
        if self.decomposition:
            exact = self._decompose(measured, held[0][0].to(dtype), held[0][1], rows, out, plan)
            summary.update(exact["summary"])
        update_json(out / "summary.json", {"gradient_paths": summary})
        fig = plot(n, rows, fit, totals, (lo, hi), exact and exact["rows"])
        image = save_figure(fig, out / "gradient_paths.png")
        log_to_wandb(trainer, "gradient_paths", rows, columns, image)

    def _decompose(self, net, x, y, rows, out, plan) -> dict:
        from src.analysis.path_decomposition import decompose

        n = net.n_blocks
        g = decompose(net, x, y, self.wrt, self.bn, plan=plan)
        mean = {r["length"]: r["grad_norm_mean"] for r in rows}
        table = [
            {
                "length": k,
                "count": comb(n, k),
                "grad_norm_exact": float(g[k].norm()),
                "count_x_mean_norm": comb(n, k) * mean[k] if k in mean else "",
            }
            for k in range(n + 1)
        ]
        columns = ["length", "count", "grad_norm_exact", "count_x_mean_norm"]
        write_csv(out / "path_decomposition.csv", table, columns)
        norms = [t["grad_norm_exact"] for t in table]
        lo, hi = shortest_window(norms, self.share)
        full = float(g.sum(0).norm())
        return {
            "rows": table,
            "summary": {
                "exact_window": [lo, hi],
                "exact_peak_length": max(range(n + 1), key=norms.__getitem__),
                "exact_full_grad_norm": full,
                "exact_sum_of_norms_over_full": math.fsum(norms) / full if full else None,
            },
        }


def plot(n, rows, fit, totals, window, exact=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["length"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].bar(range(n + 1), [comb(n, k) / 2**n for k in range(n + 1)])
    axes[0].set(title="(a) path lengths", xlabel="path length", ylabel="fraction of paths")
    mean = [r["grad_norm_mean"] for r in rows]
    axes[1].errorbar(ks, mean, yerr=[r["grad_norm_std"] for r in rows], fmt="o", ms=3, lw=0.8)
    if fit["decay_rate"] is not None:
        axes[1].plot(
            ks,
            [math.exp(fit["intercept"] + fit["decay_rate"] * k) for k in ks],
            "r-",
            label=f"fit: x{fit['factor_per_block']:.3f} per block",
        )
        axes[1].legend(fontsize=7)
    axes[1].set(
        yscale="log",
        title="(b) gradient per path",
        xlabel="path length",
        ylabel="grad norm at input",
    )
    axes[2].plot(ks, [t["share"] for t in totals], "o-", ms=3, label="count x mean norm")
    if exact:
        s = math.fsum(e["grad_norm_exact"] for e in exact)
        axes[2].plot(
            [e["length"] for e in exact],
            [e["grad_norm_exact"] / s for e in exact],
            "s-",
            ms=2,
            label="exact ||G_k|| (signed sum)",
        )
    lo, hi = window
    axes[2].axvspan(ks[lo] - 0.5, ks[hi] + 0.5, color="grey", alpha=0.2, label="effective paths")
    axes[2].set(title="(c) total gradient per length", xlabel="path length", ylabel="share")
    axes[2].legend(fontsize=7)
    return fig
