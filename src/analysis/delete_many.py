"""Deleting many blocks at test time (paper Sec. 4.2, Fig. 5a): error grows smoothly with k.

For each k in `ks`, `trials` random sets of k distinct blocks (seeded) are deleted together.
Writes `analysis/delete_many.csv` (k,trial,deleted,error; `deleted` = space-separated block
indices), the `delete_many` entry of `summary.json` (mean/std/min/max error per k) and
`delete_many.png` (error vs k with the spread over trials).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

import lightning as L

from src.analysis.io import log_to_wandb, save_figure, update_json, write_csv
from src.analysis.lesion import LesionStudy, lesion_plan
from src.errors import ConfigError
from src.models.network import Network

COLUMNS = ("k", "trial", "deleted", "error")


def sample_deletions(n_blocks: int, ks: Sequence[int], trials: int, seed: int) -> list[tuple]:
    """(k, trial, sorted block indices) for every k and trial, reproducible from `seed`."""
    rng = random.Random(seed)
    return [
        (k, t, tuple(sorted(rng.sample(range(n_blocks), k)))) for k in ks for t in range(trials)
    ]


def per_k(rows: list[dict]) -> dict:
    out = {}
    for k in sorted({r["k"] for r in rows}):
        errs = [r["error"] for r in rows if r["k"] == k]
        out[str(k)] = {
            "mean": statistics.fmean(errs),
            "std": statistics.pstdev(errs),
            "min": min(errs),
            "max": max(errs),
        }
    return out


class DeleteMany(LesionStudy):
    """ks: numbers of blocks deleted together (paper: 0..20); trials: random sets per k."""

    name = "delete_many"

    def __init__(
        self, ks: Sequence[int] = tuple(range(21)), trials: int = 10, seed: int = 0, **kwargs
    ):
        super().__init__(**kwargs)
        self.ks = [int(k) for k in ks]
        self.trials, self.seed = int(trials), int(seed)
        if not self.ks or min(self.ks) < 0 or self.trials < 1:
            raise ConfigError(
                "delete_many needs a non-empty list of ks >= 0 and trials >= 1, got "
                f"ks={self.ks} trials={self.trials}"
            )

    def check(self, net: Network) -> None:
        if max(self.ks) > net.n_blocks:
            raise ConfigError(
                f"delete_many.ks has k={max(self.ks)}, but this network has only {net.n_blocks} "
                f"blocks: use ks of at most {net.n_blocks}"
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        samples = sample_deletions(net.n_blocks, self.ks, self.trials, self.seed)
        plans = [lesion_plan(pl_module.eval_plan, d) for _, _, d in samples]
        baseline, errors = self.evaluate(trainer, pl_module, plans)
        rows = [
            {"k": k, "trial": t, "deleted": " ".join(map(str, d)), "error": e}
            for (k, t, d), e in zip(samples, errors)
        ]
        out = self.analysis_dir(trainer)
        write_csv(out / "delete_many.csv", rows, COLUMNS)
        summary = {"per_k": per_k(rows), "trials": self.trials, "label": self.run_label(pl_module)}
        update_json(out / "summary.json", {"baseline_error": baseline, "delete_many": summary})
        png = save_figure(plot(rows, baseline, summary["label"]), out / "delete_many.png")
        log_to_wandb(trainer, "delete_many", rows, COLUMNS, image=png)


def plot(rows: list[dict], baseline: float, label: str):
    """Error vs number of deleted blocks (Fig. 5a): trials as dots, mean +- std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = per_k(rows)
    ks = [int(k) for k in stats]
    mean = [stats[str(k)]["mean"] for k in ks]
    std = [stats[str(k)]["std"] for k in ks]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.scatter([r["k"] for r in rows], [r["error"] for r in rows], s=6, alpha=0.35, color="C0")
    ax.plot(ks, mean, "-o", ms=3, color="C0", label=f"{label}: mean over trials")
    ax.fill_between(
        ks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2
    )
    ax.axhline(baseline, color="k", ls="--", lw=1, label="unlesioned")
    ax.set_xlabel("number of blocks deleted (k)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.set_title("Deleting many blocks (Veit et al. Fig. 5a)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig
