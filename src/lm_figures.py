"""Figures of lesion tables measured in loss (a language model's next-token cross-entropy), the
counterparts of src/figures.py's per-block (delete_single, duplicate, ...), delete_many
and reorder figures, which draw an error rate on [0, 1]. A loss is unbounded, so the axis follows
the data (log scale when the values span more than a factor of 10), and a transformer's
sub-layers are marked by kind (attention, MLP).
Same object API: one `Figure` per call, no pyplot state. Tables of one run (a `label` column)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from src.results import steps
from src.studies import draws_steps

KIND_STYLE = {"attn": ("C0", "o", "attention"), "mlp": ("C1", "s", "MLP")}


def _axis(ax, values: pd.Series, metric: str) -> None:
    positive = values[values > 0]
    if len(positive) and positive.max() > 10 * positive.min():
        ax.set_yscale("log")
    ax.set_ylabel(f"test {metric} (nats per token)" if metric == "loss" else f"test {metric}")
    ax.grid(alpha=0.3)


def _label(table: pd.DataFrame) -> str:
    return str(table["label"].iloc[0]) if "label" in table else "run"


@draws_steps
def delete_single(table: pd.DataFrame, metric: str = "loss") -> Figure:
    """Loss per deleted block (Figs 3, 4 for a transformer): a marker per sub-layer kind, the
    unlesioned loss dashed."""
    return per_block(table, metric, "deleted", "Deleting one sub-layer")


@draws_steps
def duplicate(table: pd.DataFrame, metric: str = "loss") -> Figure:
    """Loss per duplicated block (each run twice in place), drawn as deletions are."""
    return per_block(table, metric, "duplicated", "Duplicating one sub-layer")


@draws_steps
def per_block(table: pd.DataFrame, metric: str, verb: str, title: str) -> Figure:
    """`metric` per lesioned block ("sub-layer `verb`"): a marker per sub-layer kind, the
    unlesioned value dashed; a table of several steps: src/figures.py `damage_heatmap`."""
    if len(steps(table)) > 1:
        from src.figures import damage_heatmap

        return damage_heatmap(table, metric, verb)
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    ax.plot(table.block, table[metric], "-", color="0.7", lw=1)
    kinds = table["kind"] if "kind" in table else pd.Series(["block"] * len(table))
    for kind, t in table.groupby(kinds.to_numpy(), sort=False):
        color, marker, name = KIND_STYLE.get(kind, ("C2", "o", str(kind)))
        ax.plot(t.block, t[metric], marker, ms=5, color=color, label=f"{name} {verb}")
    ax.axhline(table.baseline.iloc[0], color="k", ls="--", lw=1, label="unlesioned")
    ax.set_xlabel(f"{verb} sub-layer (block index; layer = block // 2)")
    _axis(ax, table[metric], metric)
    ax.set_title(f"{title} ({_label(table)})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def delete_many(table: pd.DataFrame, metric: str = "loss") -> Figure:
    """Loss vs number of deleted sub-layers (Fig. 5a): trials as dots, the mean as a line."""
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    ax.scatter(table.k, table[metric], s=8, alpha=0.4, color="C0")
    mean = table.groupby("k")[metric].mean()
    ax.plot(mean.index, mean.to_numpy(), "-o", ms=3, color="C0", label="mean over trials")
    ax.axhline(table.baseline.iloc[0], color="k", ls="--", lw=1, label="unlesioned")
    ax.set_xlabel("number of sub-layers deleted (k)")
    _axis(ax, table[metric], metric)
    ax.set_title(f"Deleting many sub-layers ({_label(table)})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def reorder(table: pd.DataFrame, metric: str = "loss") -> Figure:
    """Loss vs Kendall tau of the sub-layer order (Fig. 5b): a dot per trial, coloured by the
    number of swaps."""
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    sc = ax.scatter(table.kendall_tau, table[metric], c=table.swaps, s=12, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="swaps")
    ax.axhline(table.baseline.iloc[0], color="k", ls="--", lw=1, label="unlesioned")
    ax.set_xlabel("Kendall tau of the sub-layer order")
    ax.invert_xaxis()
    _axis(ax, table[metric], metric)
    ax.set_title(f"Reordering sub-layers ({_label(table)})", fontsize=9)
    ax.legend(fontsize=7)
    return fig
