"""Reordering blocks at test time (paper Sec. 4.3, Fig. 5b): error grows smoothly as Kendall's tau
between the trained and the executed block order falls.

For each k in `swaps`, `trials` times: k distinct random pairs of shape-compatible blocks (same
stage, downsampling blocks excluded, as in the paper) swap their positions one after another.
Writes `analysis/reorder.csv` (swaps,trial,kendall_tau,error), the `reorder` entry of
`summary.json` (mean tau and error per k) and `reorder.png` (error vs tau).
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Sequence

import lightning as L
from scipy.stats import kendalltau

from src.analysis.io import log_to_wandb, save_figure, update_json, write_csv
from src.analysis.lesion import LesionStudy, lesion_plan
from src.errors import ConfigError
from src.models.network import Network

COLUMNS = ("swaps", "trial", "kendall_tau", "error")


def compatible_pairs(net: Network) -> list[tuple[int, int]]:
    """Pairs of blocks that can trade places: same stage, neither one downsampling."""
    info = [b for b in net.block_info() if not b["downsampling"]]
    return [
        (a["block"], b["block"])
        for a, b in itertools.combinations(info, 2)
        if a["stage"] == b["stage"]
    ]


def swapped_order(order: Sequence[int], pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """`order` after swapping the positions of each pair of blocks, one swap after another."""
    order = list(order)
    for a, b in pairs:
        i, j = order.index(a), order.index(b)
        order[i], order[j] = order[j], order[i]
    return tuple(order)


def tau(order: Sequence[int], reference: Sequence[int]) -> float:
    if list(order) == list(reference):
        return 1.0
    return float(kendalltau(reference, order).statistic)


class Reorder(LesionStudy):
    """swaps: numbers of random pair swaps; trials: random reorderings per number."""

    name = "reorder"

    def __init__(
        self,
        swaps: Sequence[int] = (0, 1, 2, 4, 8, 16, 32, 64),
        trials: int = 10,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.swaps = [int(k) for k in swaps]
        self.trials, self.seed = int(trials), int(seed)
        if not self.swaps or min(self.swaps) < 0 or self.trials < 1:
            raise ConfigError(
                "reorder needs a non-empty list of swaps >= 0 and trials >= 1, got "
                f"swaps={self.swaps} trials={self.trials}"
            )

    def check(self, net: Network) -> None:
        n_pairs = len(compatible_pairs(net))
        if max(self.swaps) > n_pairs:
            raise ConfigError(
                f"reorder.swaps has {max(self.swaps)} swaps, but this network has only {n_pairs} "
                f"compatible pairs (same stage, no downsampling): use at most {n_pairs}"
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        pairs = compatible_pairs(net)
        base = pl_module.eval_plan
        reference = base.sequence(net.n_blocks) if base is not None else range(net.n_blocks)
        rng = random.Random(self.seed)
        samples = []
        for k in self.swaps:
            for t in range(self.trials):
                order = swapped_order(reference, rng.sample(pairs, k))
                samples.append((k, t, order, tau(order, reference)))
        plans = [lesion_plan(base, order=order) for _, _, order, _ in samples]
        baseline, errors = self.evaluate(trainer, pl_module, plans)
        rows = [
            {"swaps": k, "trial": t, "kendall_tau": tk, "error": e}
            for (k, t, _, tk), e in zip(samples, errors)
        ]
        out = self.analysis_dir(trainer)
        write_csv(out / "reorder.csv", rows, COLUMNS)
        summary = {
            "per_swaps": {
                str(k): {
                    "mean_kendall_tau": statistics.fmean(r["kendall_tau"] for r in group),
                    "mean_error": statistics.fmean(r["error"] for r in group),
                    "max_error": max(r["error"] for r in group),
                }
                for k in self.swaps
                for group in [[r for r in rows if r["swaps"] == k]]
            },
            "trials": self.trials,
            "label": self.run_label(pl_module),
        }
        update_json(out / "summary.json", {"baseline_error": baseline, "reorder": summary})
        png = save_figure(plot(rows, baseline, summary["label"]), out / "reorder.png")
        log_to_wandb(trainer, "reorder", rows, COLUMNS, image=png)


def plot(rows: list[dict], baseline: float, label: str):
    """Error vs Kendall tau of the block order (Fig. 5b), one dot per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sc = ax.scatter(
        [r["kendall_tau"] for r in rows],
        [r["error"] for r in rows],
        c=[r["swaps"] for r in rows],
        s=12,
        cmap="viridis",
        label=label,
    )
    fig.colorbar(sc, ax=ax, label="swaps")
    ax.axhline(baseline, color="k", ls="--", lw=1, label="unlesioned")
    ax.set_xlabel("Kendall tau of the block order")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.invert_xaxis()
    ax.set_title("Reordering blocks (Veit et al. Fig. 5b)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig
