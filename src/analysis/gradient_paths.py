"""Gradient per path length after training (paper Sec. 5, Figs 6b and 6c).

`samples` random paths of each length are drawn from the analysis's `seed`, spread round-robin
over `batches` training batches (also drawn from `seed`), and measured by the gradient-path engine
(src/engines/paths.py) on the network that was tested: the trained network's eval plan with the
backward-only gate on top. The exact per-length decomposition (src/engines/decomposition.py) runs
on the first batch. Writes the tables `analysis/gradient_paths.{parquet,csv}` (the run's metadata
columns, then length,samples,grad_norm_mean,grad_norm_std,paths) and
`analysis/path_decomposition.{parquet,csv}`, the figure `gradient_paths.png`, and the
`gradient_paths` entry of `summary.json` (decay rate with its standard error, Fig 6c window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import pandas as pd
import torch

from src import claims, figures, results
from src.analysis.base import AnalysisCallback
from src.analysis.path_stats import check_share, shortest_window
from src.data.datamodules import batches
from src.distributed import evaluate
from src.engines.decomposition import decompose
from src.engines.paths import (
    BN_MODES,
    ENGINES,
    WRT,
    as_input,
    check_residual,
    gradient_plan,
    path_chunks,
    path_counts,
    path_grad_norms,
    prepared,
    sample_paths,
)
from src.errors import ConfigError
from src.models.network import Plan
from src.schema import POSITIVE, UNIT
from src.stats import fit_decay, length_stats, mean_ci, total_gradient
from src.studies import Study

GRAD = "grad_norm"  # the tables' `metric`: norms of the training loss's gradient


class GradientPaths(AnalysisCallback):
    """Figs 6b/6c after testing: `samples` random paths of each length in `lengths` (None: 1..n),
    spread round-robin over `batches` random training batches, each batch forwarded once.

    Writes `analysis/gradient_paths.csv` (length,samples,grad_norm_mean,grad_norm_std,paths),
    `analysis/path_decomposition.csv` (exact ||G_k||, when `decomposition`), the figure, and
    `gradient_paths` in `analysis/summary.json` (decay rate, Fig 6c window of `share`).
    """

    name = "gradient_paths"
    splits = shardable = True  # the engine's chunks of paths: each one's norms its own

    def __init__(
        self,
        samples: Annotated[int, POSITIVE] = 1000,
        lengths: Sequence[Annotated[int, POSITIVE]] | None = None,  # at most the longest path
        batches: Annotated[int, POSITIVE] = 10,
        split: Literal["train", "val", "test"] = "train",
        bn: Literal[BN_MODES] = "eval",
        wrt: Literal[WRT] = "input",
        share: Annotated[float, UNIT] = 0.9,
        engine: Literal[tuple(ENGINES)] = "fast",
        chunk: Annotated[int, POSITIVE] = 128,
        decomposition: bool = True,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float64",
    ):
        self.samples, self.batches, self.chunk, self.seed = samples, batches, chunk, seed
        self.lengths = None if lengths is None else sorted({int(k) for k in lengths})
        self.split, self.bn, self.wrt, self.share, self.engine = split, bn, wrt, share, engine
        self.decomposition, self.dtype = decomposition, dtype

    def validate(self, n: int, longest: int | None = None) -> list[int]:
        """Raise ConfigError on bad settings; return the lengths to sample for n blocks whose
        longest path has `longest` branches (None: n; fewer in parallel-residual layers).

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
        top = n if longest is None else longest
        lengths = list(range(1, top + 1)) if self.lengths is None else self.lengths
        if not lengths or not 1 <= min(lengths) <= max(lengths) <= top:
            raise ConfigError(
                f"lengths={lengths}: path lengths must lie in 1..{top} (this network has {n} "
                f"blocks, and its longest path enters {top})"
            )
        return lengths

    def check(self, pl_module) -> list[int]:
        """Raise ConfigError when the analysis cannot apply to the module's network; return the
        lengths to sample."""
        net = pl_module.net
        check_residual(net)
        gradient_plan(pl_module.eval_plan)
        groups = self.groups(net, pl_module.eval_plan)
        return self.validate(net.n_blocks, None if groups is None else len(groups))

    @staticmethod
    def groups(net, plan) -> list[tuple[int, ...]] | None:
        """The choices of a path per step where the network has parallel-residual layers (a path
        enters at most one branch of each); None for blocks in sequence."""
        return net.path_groups(plan or Plan()) if net.has_parallel else None

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
        groups = self.groups(net, plan)
        counts = path_counts(n, groups)
        sampled = sample_paths(n, lengths, int(self.samples), gen, groups)
        data = batches(
            trainer.datamodule, self.split, pl_module.device, train=False, seed=int(self.seed)
        )
        held = [xy for _, xy in zip(range(int(self.batches)), data)]  # fewer if the split is small
        # the work items: the engine's chunks of each batch's paths (their cost: the branches
        # their paths enter), and the exact decomposition (n(n+1)/2 branch VJPs on batch 0)
        seq = gradient_plan(plan).sequence(n)
        per_batch = [list(range(b, len(sampled), len(held))) for b in range(len(held))]
        walks = [
            path_chunks(seq, [sampled[j][1] for j in idx], int(self.chunk)) for idx in per_batch
        ]
        units = [(b, c) for b, walk in enumerate(walks) for c in range(len(walk))]
        costs = [1 + sum(len(sampled[per_batch[b][j]][1]) for j in walks[b][c]) for b, c in units]
        if self.decomposition:
            units.append(("decomposition", None))
            costs.append(n * (n + 1) // 2)

        def compute(items: list[int]) -> dict:
            out, mine = {}, {}
            for u in items:
                b, c = units[u]
                if b == "decomposition":
                    x, y = as_input(held[0][0], dtype), held[0][1]
                    out[b] = self.exact_norms(measured, x, y, plan)
                else:
                    mine.setdefault(b, []).append(c)
            for b, cs in mine.items():
                x, y = as_input(held[b][0], dtype), held[b][1]
                paths = [sampled[j][1] for j in per_batch[b]]
                got = path_grad_norms(
                    measured, x, y, paths, self.wrt, self.engine, int(self.chunk), plan, cs
                )
                out |= {per_batch[b][j]: float(got[j]) for c in cs for j in walks[b][c]}
            return out

        part = self.part()
        got = evaluate(part, costs, compute)
        shard = sorted(
            j
            for u in part.shard_items(costs)
            if units[u][0] != "decomposition"
            for j in (per_batch[units[u][0]][i] for i in walks[units[u][0]][units[u][1]])
        )
        if not part.shard.whole:  # one row per path: the report merges them (`merge`)
            rows = pd.DataFrame(
                {
                    "item": shard,
                    "length": [sampled[j][0] for j in shard],
                    "grad_norm": [got[j] for j in shard],
                    "paths": [float(counts[sampled[j][0]]) for j in shard],
                }
            )
            if "decomposition" in got:
                exact = exact_table(got["decomposition"], counts, {}).assign(item=range(n + 1))
                self.record(trainer, pl_module, exact, study="path_decomposition", metric=GRAD)
            self.record(trainer, pl_module, rows, metric=GRAD)
            return
        norms = torch.tensor([got[j] for j in range(len(sampled))], dtype=torch.float64)
        rows = length_stats([k for k, _ in sampled], norms.tolist())
        rows["paths"] = [float(counts[k]) for k in rows.length]  # paths of that length
        fit = fit_decay(rows.length, rows.grad_norm_mean)
        totals = total_gradient(counts, rows.length, rows.grad_norm_mean)
        lo, hi = shortest_window(totals.share.tolist(), self.share)
        lengths_lo, lengths_hi = int(rows.length[lo]), int(rows.length[hi])
        summary = {
            "n_blocks": n,
            "samples_per_length": self.samples,
            "batches": len(held),
            "batch_size": len(held[0][1]),
            "bn": self.bn,
            "wrt": self.wrt,
            "engine": self.engine,
            "dtype": self.dtype,
            "seed": int(self.seed),
            "residual_scale": (plan or Plan()).residual_scale,  # of the eval plan measured
            **fit,
            "share": self.share,
            "effective_window": [lengths_lo, lengths_hi],
            "effective_window_share": math.fsum(totals.share[lo : hi + 1]),
            "effective_window_fraction_of_paths": sum(counts[lengths_lo : lengths_hi + 1])
            / sum(counts),
            "peak_total_length": int(totals.length[totals.share.idxmax()]),
        }
        exact = None
        if self.decomposition:
            mean = dict(zip(rows.length, rows.grad_norm_mean))
            exact = exact_table(got["decomposition"], counts, mean)
            norms = exact.grad_norm_exact.tolist()
            e_lo, e_hi = shortest_window(norms, self.share)
            full = exact.attrs["full_grad_norm"]
            summary |= {
                "exact_window": [e_lo, e_hi],
                "exact_peak_length": int(exact.length[exact.grad_norm_exact.idxmax()]),
                "exact_full_grad_norm": full,
                "exact_sum_of_norms_over_full": math.fsum(norms) / full if full else None,
            }
            self.record(trainer, pl_module, exact, study="path_decomposition", metric=GRAD)
        fig = figures.gradient_paths(counts, rows, fit, totals, (lo, hi), exact)
        self.record(trainer, pl_module, rows, summary, fig, metric=GRAD)

    def exact_norms(self, net, x, y, plan) -> tuple[list[float], float]:
        """Exact ||G_k|| per length k = 0..n on (x, y), and the full gradient's norm."""
        g = decompose(net, x, y, self.wrt, self.bn, plan=plan)
        return [float(g[k].norm()) for k in range(net.n_blocks + 1)], float(g.sum(0).norm())


def exact_table(exact: tuple[list[float], float], counts, mean: dict) -> pd.DataFrame:
    """Exact ||G_k|| per length k beside Fig 6c's estimate counts[k] x mean path norm (`mean`:
    length -> mean sampled norm; a length it lacks: NaN)."""
    norms, full = exact
    table = pd.DataFrame(
        {
            "length": list(range(len(norms))),
            "count": [str(c) for c in counts],  # exact: C(96, 48) > 2^63
            "grad_norm_exact": norms,
            "count_x_mean_norm": [c * mean.get(k, math.nan) for k, c in enumerate(counts)],
        }
    )
    table.attrs["full_grad_norm"] = full
    return table


def merge(tables: dict) -> dict:
    """The shards' per-path rows (`shard=i/n`) as the unsharded tables: the statistics per
    length, in path order as one process computes them, and Fig 6c's estimate beside the exact
    decomposition."""
    t = tables.get("gradient_paths")
    if t is None or "grad_norm" not in t:
        return tables
    rows = length_stats(t.length.astype(int).tolist(), t.grad_norm.tolist())
    paths = t.groupby("length").paths.first()
    rows["paths"] = [float(paths[k]) for k in rows.length]
    front = [c for c in t.columns if c in results.META or c in ("run_dir", "shard")]
    meta = t[front].iloc[[0] * len(rows)].reset_index(drop=True)
    tables = dict(tables, gradient_paths=pd.concat([meta, rows], axis=1))
    exact = tables.get("path_decomposition")
    if exact is not None:
        mean = dict(zip(rows.length, rows.grad_norm_mean))
        exact = exact.assign(
            count_x_mean_norm=[
                int(c) * mean.get(int(k), math.nan) for k, c in zip(exact.length, exact["count"])
            ]
        )
        tables["path_decomposition"] = exact
    return tables


def headline(t: pd.DataFrame) -> str:
    per_run = t.groupby("run_dir")
    fits = per_run.apply(lambda r: fit_decay(r.length, r.grad_norm_mean)["decay_rate"])
    fits = fits.dropna()
    if fits.empty:
        return "too few path lengths to fit"
    m, h = mean_ci(fits.tolist())
    spread = f"log-slope {m:.3f}" + ("" if math.isnan(h) else f" ± {h:.3f}")
    return f"gradient norm changes by a factor {math.exp(m):.3f} per block ({spread})"


def gradient_decay(runs, tables):
    fits = tables.groupby("run_dir").apply(
        lambda r: fit_decay(r.length, r.grad_norm_mean)["factor_per_block"]
    )
    fits = fits.dropna()
    if fits.empty:
        return None
    text = f"x{fits.mean():.3f} per block entered ({claims.n_runs(len(fits))})"
    return text, bool(fits.mean() < 1)


def effective_window(runs, tables):
    windows = []
    for _, r in tables.groupby("run_dir"):
        n = int(r.n_blocks.iloc[0])
        # paths per length: recorded by the study (parallel layers have fewer); else C(n, k)
        counts = (
            dict(zip(r.length, r.paths))
            if "paths" in r
            else [math.comb(n, k) for k in range(n + 1)]
        )
        totals = total_gradient(counts, r.length, r.grad_norm_mean)
        lo, hi = shortest_window(totals.share.tolist(), 0.9)
        windows.append((int(r.length.iloc[lo]), int(r.length.iloc[hi]), n))
    lo, hi, n = windows[0]
    text = f"90% of the gradient from lengths {lo}-{hi} of {n}"
    return text, bool(hi <= n / 2)


STUDY = Study(
    name="gradient_paths",
    config="paths_analysis/gradient_paths",
    columns=("length", "samples", "grad_norm_mean", "grad_norm_std", "paths"),
    figures={GRAD: figures.gradient_curves},
    headline=headline,
    title="Fig. 6b: gradient magnitude per path length",
    claim="The gradient reaching the input through one path falls exponentially with the path's "
    "length; the effective paths of ResNet-110 are 5-17 blocks long.",
    claims=(
        claims.Claim(
            "Fig. 6b",
            "the gradient through a path decays roughly exponentially with its length",
            "fitted factor per block < 1",
            gradient_decay,
        ),
        claims.Claim(
            "Fig. 6c",
            "almost all gradient comes from paths 5-17 modules long (of 54)",
            "the window holding 90% of the gradient ends below n/2",
            effective_window,
        ),
    ),
    section="5",
    merge=merge,
)
