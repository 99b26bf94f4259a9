"""Deleting individual blocks at test time (paper Sec. 4.1, Figs 3, 4 and 8).

For each block i the residual branch is removed and the shortcut kept (identity, or the
downsampling projection with the pre-activation feeding it); for VGG the layer becomes the
identity (keeping its pool). Writes `analysis/delete_single.csv` (block,stage,downsampling,error),
the `delete_single` entry of `summary.json` and `delete_single.png`. In a multirun (ResNet and VGG,
or standard and stochastic-depth training) the figure overlays every finished run of the sweep and
is also written to `<sweep dir>/delete_single.png`. Re-plot a sweep:
`python -m src.analysis.delete_single <sweep dir>`.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import lightning as L

from src.analysis.io import log_to_wandb, read_csv, save_figure, update_json, write_csv
from src.analysis.lesion import LesionStudy, lesion_plan
from src.errors import ConfigError
from src.models.network import Network

COLUMNS = ("block", "stage", "downsampling", "error")


def headline(rows: list[dict], baseline: float) -> dict:
    """Numbers a reader compares with Figs 3/4: median increase over non-downsampling blocks."""
    plain = [r["error"] for r in rows if not r["downsampling"]] or [r["error"] for r in rows]
    down = [r["error"] for r in rows if r["downsampling"]]
    worst = max(rows, key=lambda r: r["error"])
    return {
        "baseline_error": baseline,
        "median_error": statistics.median(r["error"] for r in rows),
        "median_increase_nondownsampling": statistics.median(plain) - baseline,
        "max_increase_nondownsampling": max(plain) - baseline,
        "min_error": min(r["error"] for r in rows),
        "max_error": worst["error"],
        "worst_block": worst["block"],
        "downsampling_errors": down,
    }


class DeleteSingle(LesionStudy):
    """blocks: the block indices to delete one at a time (None: every block)."""

    name = "delete_single"

    def __init__(self, blocks: list[int] | None = None, overlay: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        self.overlay = overlay

    def check(self, net: Network) -> None:
        bad = [b for b in self.blocks or [] if not 0 <= b < net.n_blocks]
        if bad:
            raise ConfigError(
                f"delete_single.blocks has index {bad[0]}, but this network has blocks "
                f"0..{net.n_blocks - 1}: pass indices in that range (or null for all)"
            )

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net  # checked in `setup`, before training
        info = net.block_info()
        blocks = self.blocks if self.blocks is not None else list(range(net.n_blocks))
        plans = [lesion_plan(pl_module.eval_plan, [i]) for i in blocks]
        baseline, errors = self.evaluate(trainer, pl_module, plans)
        rows = [{**info[i], "error": e} for i, e in zip(blocks, errors)]
        out = self.analysis_dir(trainer)
        write_csv(out / "delete_single.csv", rows, COLUMNS)
        summary = {**headline(rows, baseline), "label": self.run_label(pl_module)}
        update_json(out / "summary.json", {"baseline_error": baseline, "delete_single": summary})
        runs = sweep_runs(out.parent) if self.overlay else []
        runs = runs or [out.parent]
        png = save_figure(plot(runs), out / "delete_single.png")
        if len(runs) > 1:
            save_figure(plot(runs), out.parent.parent / "delete_single.png")
        log_to_wandb(trainer, "delete_single", rows, COLUMNS, image=png)


def sweep_runs(run_dir: Path) -> list[Path]:
    """This run and its finished siblings when it is one job of a Hydra multirun, else []."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return []
    except ImportError:
        return []
    return runs_in(run_dir.parent)


def runs_in(sweep_dir: Path) -> list[Path]:
    """Run directories under `sweep_dir` that hold a delete_single result."""
    found = Path(sweep_dir).glob("*/analysis/delete_single.csv")
    return sorted((p.parent.parent for p in found), key=lambda d: (len(d.name), d.name))


def load_run(run_dir: Path) -> tuple[str, float, list[dict]]:
    """(label, baseline error, rows) of a finished delete_single run."""
    analysis = Path(run_dir) / "analysis"
    summary = json.loads((analysis / "summary.json").read_text())["delete_single"]
    rows = [
        {
            "block": int(r["block"]),
            "downsampling": r["downsampling"] == "True",
            "error": float(r["error"]),
        }
        for r in read_csv(analysis / "delete_single.csv")
    ]
    return summary.get("label", Path(run_dir).name), summary["baseline_error"], rows


def plot(run_dirs: list[Path]):
    """Test error per deleted block (Fig. 3 style), one line per run, downsampling blocks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, run in enumerate(run_dirs):
        label, baseline, rows = load_run(run)
        color = f"C{k}"
        xs, ys = [r["block"] for r in rows], [r["error"] for r in rows]
        ax.plot(xs, ys, "-o", ms=3, lw=1.2, color=color, label=f"{label}: block deleted")
        ax.axhline(baseline, color=color, ls="--", lw=1, label=f"{label}: unlesioned")
        down = [r for r in rows if r["downsampling"]]
        ax.scatter(
            [r["block"] for r in down],
            [r["error"] for r in down],
            marker="v",
            s=60,
            facecolors="none",
            edgecolors="k",
            zorder=3,
            label="downsampling block" if k == 0 else None,
        )
    ax.set_xlabel("deleted block (index)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.set_title("Deleting individual blocks at test time (Veit et al. Figs 3, 4, 8)")
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    if len(sys.argv) != 2 or not runs_in(Path(sys.argv[1])):
        sys.exit("usage: python -m src.analysis.delete_single <sweep dir with delete_single runs>")
    sweep = Path(sys.argv[1])
    print(save_figure(plot(runs_in(sweep)), sweep / "delete_single.png"))
