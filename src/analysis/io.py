"""Result files every analysis writes: CSV/JSON/PNG written atomically into `<run dir>/analysis/`,
and the same numbers to W&B (table + image) when a WandbLogger is attached.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({c: row[c] for c in columns})
    return atomic_write(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def update_json(path: Path, updates: dict) -> Path:
    """Merge `updates` into the JSON object at `path` (created if missing)."""
    path = Path(path)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(updates)
    return write_json(path, current)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def log_to_wandb(
    trainer: L.Trainer,
    key: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    image: Path | None = None,
) -> None:
    """Send a table (and a figure) to every attached WandbLogger; no-op without one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(
                key=f"{key}/table",
                columns=list(columns),
                data=[[r[c] for c in columns] for r in rows],
            )
            if image is not None:
                logger.log_image(key=f"{key}/figure", images=[str(image)])


class AnalysisCallback(Callback):
    """Base of the post-training measurements: runs once testing ends (after fit, or on a loaded
    checkpoint with `train=false`) and writes into `<run dir>/analysis/`.

    Under DDP the analysis runs on global rank 0 only, as plain PyTorch on `pl_module.net` (no
    collective calls), so its results equal a single-process run; the other ranks wait.
    Lightning calls `on_test_end` under inference mode; the analysis runs outside it, so that a
    study that moves the network (`net.to(device)`) leaves ordinary parameters behind, not
    inference tensors that a later analysis could not differentiate through.
    """

    def analysis_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "analysis"

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            with torch.inference_mode(False):
                self.analyse(trainer, pl_module)
        trainer.strategy.barrier("analysis")

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError
