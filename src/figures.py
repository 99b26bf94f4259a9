"""Figures in the paper's style, drawn from the tidy tables (src/results.py) with matplotlib's
object API: a `Figure` per call, no pyplot state and no global backend switch, so importing this
module in a notebook changes nothing there.

Each study has one figure function. It takes the study's table with a `label` column (one curve
per label: one run, or a group of runs of a sweep). Runs of one label are averaged, and their 95%
confidence band is drawn when there are several (seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import comb

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from src.results import steps
from src.stats import curve
from src.studies import draws_steps


def _band(ax, x, mean, half, color, clip: bool = True) -> None:
    half = np.nan_to_num(np.asarray(half, dtype=float))
    if not half.any():
        return
    lo, hi = np.asarray(mean) - half, np.asarray(mean) + half
    if clip:  # an error rate's band stays within [0, 1]
        lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
    ax.fill_between(x, lo, hi, color=color, alpha=0.25, linewidth=0)


def _runs(table: pd.DataFrame, label: str) -> int:
    return table.loc[table.label == label, "run_dir"].nunique() if "run_dir" in table else 1


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    if "label" not in table:
        table["label"] = "run"
    if "run_dir" not in table:
        table["run_dir"] = "."
    return table


@draws_steps
def delete_single(table: pd.DataFrame) -> Figure:
    """Test error per deleted block (Figs 3, 4, 8): one line per label, its unlesioned error
    dashed, downsampling blocks marked; a table of several steps: `damage_heatmap`."""
    return per_block(
        table,
        "deleted",
        "Deleting individual blocks at test time (Veit et al. Figs 3, 4, 8)",
    )


@draws_steps
def duplicate(table: pd.DataFrame) -> Figure:
    """Test error per duplicated block (each run twice in place), as Fig. 3 draws deletions."""
    return per_block(table, "duplicated", "Duplicating individual blocks at test time")


@draws_steps
def per_block(table: pd.DataFrame, verb: str, title: str) -> Figure:
    """Test error per lesioned block ("block `verb`"), as Fig. 3 draws deletions: one line per
    label, its unlesioned error dashed, downsampling blocks marked. A table of several steps
    (lesions across training) is drawn as `damage_heatmap`."""
    if len(steps(table)) > 1:
        return damage_heatmap(table, "error", verb)
    table = _labelled(table)
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for k, (label, t) in enumerate(table.groupby("label", sort=False)):
        color = f"C{k}"
        c = curve(t, "block", "error")
        n = _runs(table, label)
        tag = f"{label} (n={n})" if n > 1 else label
        ax.plot(c.block, c["mean"], "-o", ms=3, lw=1.2, color=color, label=f"{tag}: block {verb}")
        _band(ax, c.block, c["mean"], c.ci, color)
        base = t.groupby("run_dir").baseline.first().mean()
        ax.axhline(base, color=color, ls="--", lw=1, label=f"{tag}: unlesioned")
        down = c[c.block.isin(t.loc[t.downsampling, "block"])]
        ax.scatter(
            down.block,
            down["mean"],
            marker="v",
            s=60,
            facecolors="none",
            edgecolors="k",
            zorder=3,
            label="downsampling block" if k == 0 else None,
        )
    ax.set_xlabel(f"{verb} block (index)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    return fig


def damage_heatmap(table: pd.DataFrame, metric: str = "error", verb: str = "deleted") -> Figure:
    """Lesions across training: the rise of `metric` over the unlesioned network when one block
    is `verb` (colour), block (rows) x optimizer step (columns), one panel per label, the mean
    over its runs (seeds) at each step; downsampling blocks' indices in blue. An error rise in
    percentage points, a loss rise in nats, on a diverging scale centred at no change."""
    table = _labelled(table).dropna(subset=["step"])
    scale, unit = (100.0, "pp") if metric == "error" else (1.0, "nats")
    table = table.assign(rise=(table[metric] - table.baseline) * scale)
    labels = list(dict.fromkeys(table.label))
    grids = {
        label: t.groupby(["block", "step"]).rise.mean().unstack("step").sort_index()
        for label, t in table.groupby("label", sort=False)
    }
    top = max(float(np.nanmax(g.to_numpy())) for g in grids.values())
    low = min(0.0, min(float(np.nanmin(g.to_numpy())) for g in grids.values()))
    n_blocks = max(len(g) for g in grids.values())
    fig = Figure(figsize=(2.0 + 3.0 * len(labels), 1.5 + min(6.0, 0.09 * n_blocks + 1.5)))
    axes = np.atleast_1d(fig.subplots(1, len(labels), sharey=True, squeeze=False)[0])
    down = set(table.loc[table.downsampling.fillna(False).astype(bool), "block"].astype(int))
    image = None
    for ax, label in zip(axes, labels):
        grid = grids[label]
        image = ax.imshow(
            grid.to_numpy(dtype=float),
            aspect="auto",
            origin="lower",
            cmap="RdBu_r",  # red: the deletion hurts; blue: it helps; white: no change
            # one scale both ways: a small helpful deletion stays pale beside a harmful one
            norm=TwoSlopeNorm(0.0, -max(top, -low, 1e-9), max(top, -low, 1e-9)),
            interpolation="nearest",
        )
        cols = [int(c) for c in grid.columns]
        every = max(1, len(cols) // 6)
        ax.set_xticks(range(len(cols))[::every], [str(c) for c in cols[::every]], fontsize=7)
        ax.set_xlabel("optimizer step", fontsize=8)
        rows = [int(b) for b in grid.index]
        marks = [i for i, b in enumerate(rows) if b in down]
        ax.set_title(str(label).replace(", ", "\n"), fontsize=7)
        ticks = sorted({0, len(rows) - 1, *marks})
        ax.set_yticks(ticks, [str(rows[i]) for i in ticks], fontsize=7)
        for tick, i in zip(ax.get_yticklabels(), ticks):
            if i in marks:
                tick.set_color("C0")
                tick.set_fontweight("bold")
    axes[0].set_ylabel(f"{verb} block" + (" (downsampling in blue)" if down else ""), fontsize=8)
    fig.colorbar(image, ax=list(axes), label=f"test {metric} rise ({unit})", shrink=0.9)
    fig.suptitle(
        f"One block {verb}, across training: test {metric} rise over the unlesioned network",
        fontsize=9,
    )
    return fig


def delete_many(table: pd.DataFrame) -> Figure:
    """Error vs number of deleted blocks (Fig. 5a): trials as dots, the mean as a line with the
    spread over trials (one run) or the 95% CI over runs (several) as a band."""
    table = _labelled(table)
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    for j, (label, t) in enumerate(table.groupby("label", sort=False)):
        color = f"C{j}"
        c = curve(t, "k", "error")
        n = _runs(table, label)
        ax.scatter(t.k, t.error, s=6, alpha=0.35, color=color)
        tag = f"{label} (n={n}): mean" if n > 1 else f"{label}: mean over trials"
        ax.plot(c.k, c["mean"], "-o", ms=3, color=color, label=tag)
        spread = c.ci if n > 1 else t.groupby("k").error.std(ddof=0).reindex(c.k).to_numpy()
        _band(ax, c.k, c["mean"], spread, color)
        base = t.groupby("run_dir").baseline.first().mean()
        ax.axhline(base, color=color, ls="--", lw=1, label=f"{label}: unlesioned")
    ax.set_xlabel("number of blocks deleted (k)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.set_title("Deleting many blocks (Veit et al. Fig. 5a)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def reorder(table: pd.DataFrame) -> Figure:
    """Error vs Kendall tau of the block order (Fig. 5b). One run: a dot per trial, coloured by
    the number of swaps. Several labels: the mean per number of swaps, one line per label."""
    table = _labelled(table)
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    labels = list(dict.fromkeys(table.label))
    if len(labels) == 1 and table.run_dir.nunique() == 1:
        sc = ax.scatter(
            table.kendall_tau, table.error, c=table.swaps, s=12, cmap="viridis", label=labels[0]
        )
        fig.colorbar(sc, ax=ax, label="swaps")
    else:
        for j, (label, t) in enumerate(table.groupby("label", sort=False)):
            c = curve(t, "swaps", "error")
            taus = t.groupby("swaps").kendall_tau.mean().reindex(c.swaps)
            n = _runs(table, label)
            ax.plot(taus, c["mean"], "-o", ms=3, color=f"C{j}", label=f"{label} (n={n})")
            _band(ax, taus, c["mean"], c.ci, f"C{j}")
    base = table.groupby("run_dir").baseline.first().mean()
    ax.axhline(base, color="k", ls="--", lw=1, label="unlesioned")
    ax.set_xlabel("Kendall tau of the block order")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.invert_xaxis()
    ax.set_title("Reordering blocks (Veit et al. Fig. 5b)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def gradient_paths(
    counts: Sequence[int],
    rows: pd.DataFrame,
    fit: dict,
    totals: pd.DataFrame,
    window: tuple[int, int],
    exact: pd.DataFrame | None = None,
) -> Figure:
    """Fig 6: (a) path lengths, (b) gradient norm per path length with the exponential fit,
    (c) total gradient per length (count x mean norm; and the exact signed sums ||G_k||).
    `counts[k]`: the number of paths of length k."""
    ks = rows.length.tolist()
    fig = Figure(figsize=(13, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].bar(range(len(counts)), [c / sum(counts) for c in counts])
    axes[0].set(title="(a) path lengths", xlabel="path length", ylabel="fraction of paths")
    axes[1].errorbar(ks, rows.grad_norm_mean, yerr=rows.grad_norm_std, fmt="o", ms=3, lw=0.8)
    if fit["decay_rate"] is not None:
        axes[1].plot(
            ks,
            [math.exp(fit["intercept"] + fit["decay_rate"] * k) for k in ks],
            "r-",
            label=f"fit: x{fit['factor_per_block']:.3f} per block",
        )
        axes[1].legend(fontsize=7)
    axes[1].set(
        yscale="log", title="(b) gradient per path", xlabel="path length", ylabel="grad norm"
    )
    axes[2].plot(totals.length, totals.share, "o-", ms=3, label="count x mean norm")
    if exact is not None:
        s = math.fsum(exact.grad_norm_exact)
        axes[2].plot(
            exact.length, exact.grad_norm_exact / s, "s-", ms=2, label="exact ||G_k|| (signed sum)"
        )
    lo, hi = window
    axes[2].axvspan(ks[lo] - 0.5, ks[hi] + 0.5, color="grey", alpha=0.2, label="effective paths")
    axes[2].set(title="(c) total gradient per length", xlabel="path length", ylabel="share")
    axes[2].legend(fontsize=7)
    return fig


def gradient_curves(table: pd.DataFrame) -> Figure:
    """Fig 6b across runs: mean gradient norm per path length, one line per label, 95% CI."""
    table = _labelled(table)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for j, (label, t) in enumerate(table.groupby("label", sort=False)):
        c = curve(t, "length", "grad_norm_mean")
        n = _runs(table, label)
        ax.plot(c.length, c["mean"], "-o", ms=3, color=f"C{j}", label=f"{label} (n={n})")
        _band(ax, c.length, c["mean"], c.ci, f"C{j}", clip=False)
    ax.set(yscale="log", xlabel="path length", ylabel="grad norm at input")
    ax.set_title("Gradient per path length (Veit et al. Fig. 6b)")
    ax.legend(fontsize=7)
    return fig


def path_lengths(table: pd.DataFrame, window: tuple[int, int], share: float, k=None) -> Figure:
    """Fig 6a: the Binomial(n, 1/2) distribution of path lengths, and the paths one mini-batch
    trains when k blocks run."""
    n = int(table.length.max())
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.bar(table.length, table.fraction, color="tab:blue", label=f"all {n} blocks")
    if k is not None:
        trained = [comb(k, x) / 2**k if x <= k else 0.0 for x in range(n + 1)]
        ax.plot(range(n + 1), trained, "o-", ms=2, color="tab:orange", label=f"trained (k={k})")
    lo, hi = window
    ax.axvspan(lo - 0.5, hi + 0.5, color="grey", alpha=0.15, label=f"{share:.0%} of paths")
    ax.set(xlabel="path length (blocks)", ylabel="fraction of paths", title="Fig 6a")
    ax.legend(fontsize=7)
    return fig


def remaining_paths(table: pd.DataFrame) -> Figure:
    """Fig 7 / Eq. 8: the fraction of paths of each length left after deleting d blocks."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for d, t in table.groupby("deleted"):
        ax.plot(t.length, t.fraction_remaining, label=f"delete {d}")
    ax.set(xlabel="path length (blocks)", ylabel="fraction of paths remaining", title="Fig 7")
    ax.legend(fontsize=7)
    return fig


def effective_paths(runs: pd.DataFrame, res: dict) -> Figure:
    """Sec. 5: test error per arm (full training first, then each block-subset rule), one dot per
    seed, mean +- std beside it."""
    fig = Figure(figsize=(4 + 0.6 * max(len(res["arms"]) - 2, 0), 3.2))
    ax = fig.subplots()
    for i, s in enumerate(res["arms"].values()):
        ax.plot([i] * len(s["errors"]), s["errors"], "o", alpha=0.6)
        ax.errorbar(i + 0.15, s["mean_error"], yerr=s["std_error"], fmt="k_", capsize=4)
    ax.set_xticks(range(len(res["arms"])), list(res["arms"]), rotation=20, fontsize=7)
    ax.set(ylabel="test error", title="Sec. 5: block-subset vs full training")
    return fig


SCORE_NAMES = {
    "block_influence": "Block Influence 1 - cos(in, out)",
    "relative_contribution": "relative contribution |f(h)| / |h|",
    "angular_distance": "angular distance arccos(cos) / pi",
}


def importance(table: pd.DataFrame, metric: str = "error") -> Figure:
    """Each cheap score of a block (x) against the rise of `metric` when the block is deleted
    (y), one panel per score, one colour per label; downsampling blocks marked."""
    table = _labelled(table)
    scores = [s for s in SCORE_NAMES if s in table and table[s].notna().any()]
    fig = Figure(figsize=(4 * max(1, len(scores)), 3.6))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(scores))))
    for ax, score in zip(axes, scores):
        for k, (label, t) in enumerate(table.groupby("label", sort=False)):
            rise = t[metric] - t.baseline
            down = t.downsampling.fillna(False).astype(bool)
            ax.scatter(t[score][~down], rise[~down], s=14, color=f"C{k}", label=label)
            ax.scatter(
                t[score][down], rise[down], s=50, marker="v", facecolors="none", edgecolors="k"
            )
        ax.set_xlabel(SCORE_NAMES[score])
        ax.set_ylabel(f"{metric} rise when deleted")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Cheap importance scores against single-block deletions", fontsize=10)
    fig.tight_layout()
    return fig


def angular_distance(table: pd.DataFrame) -> Figure:
    """Gromov et al.'s heatmap: the angular distance between the stream before block l (x) and
    after a run of m blocks (y), averaged over the runs of a label (the first label drawn)."""
    t = table[table.label == table.label.iloc[0]] if "label" in table else table
    grid = t.groupby(["m", "first_block"]).angular_distance.mean().unstack("first_block")
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    im = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(grid.columns))[:: max(1, len(grid.columns) // 12)])
    ax.set_xticklabels(list(grid.columns)[:: max(1, len(grid.columns) // 12)])
    ax.set_yticks(range(len(grid.index))[:: max(1, len(grid.index) // 8)])
    ax.set_yticklabels(list(grid.index)[:: max(1, len(grid.index) // 8)])
    ax.set_xlabel("first block of the run (l)")
    ax.set_ylabel("run length m (steps)")
    fig.colorbar(im, ax=ax, label="angular distance / pi")
    ax.set_title("Angular distance of the stream across m blocks (Gromov et al.)", fontsize=9)
    return fig


def prune(table: pd.DataFrame, metric: str = "error") -> Figure:
    """`metric` after deleting k blocks (x) per strategy: random as mean and spread over trials,
    each other strategy a line; healed values dashed where measured (first label drawn)."""
    table = _labelled(table)
    t = table[table.label == table.label.iloc[0]]
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    for j, (strategy, s) in enumerate(t.groupby("strategy", sort=False)):
        color = f"C{j}"
        c = s.groupby("k")[metric].agg(["mean", "std"]).reset_index()
        ax.plot(c.k, c["mean"], "-o", ms=3, color=color, label=strategy)
        if strategy == "random":
            _band(ax, c.k, c["mean"], c["std"].fillna(0), color, clip=metric == "error")
        if "healed" in s and s.healed.notna().any():
            h = s.dropna(subset=["healed"]).groupby("k").healed.mean()
            ax.plot(h.index, h.to_numpy(), "--s", ms=4, color=color, label=f"{strategy}, healed")
    ax.axhline(t.baseline.iloc[0], color="k", ls=":", lw=1, label="unpruned")
    unit = t["unit"].iloc[0] if "unit" in t else "block"
    ax.set_xlabel(f"{unit}s deleted (k)")
    ax.set_ylabel(f"test {metric}")
    # the informed strategies sit near the baseline, random sets far above: a log axis shows both
    ax.set_yscale(
        "symlog" if metric == "error" else "log",
        **({"linthresh": 0.01} if metric == "error" else {}),
    )
    if metric == "error":
        ax.set_ylim(0, 1)
    ax.set_title("Which k blocks to delete: strategies (SLEB greedy, scores, random)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig
