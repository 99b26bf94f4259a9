"""Progress where no terminal is: a run under nohup or Slurm writes its training steps and lesion
sweeps to the log as lines (rate, time left), a terminal keeps rich's bars."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from rich.progress import Progress

from src import progress
from src.engines.lesion import lesion_errors
from src.models import preact_resnet_cifar
from src.models.network import Plan


class ValLogged(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch))


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "src.progress"]


def test_rich_on_a_terminal_log_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    assert isinstance(progress.progress_bar(), RichProgressBar)
    assert isinstance(progress.lesion_bar(True), Progress)
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    assert isinstance(progress.progress_bar(5), progress.LogProgressBar)
    assert isinstance(progress.lesion_bar(True), progress.LogProgress)
    assert isinstance(progress.lesion_bar(False), Progress)  # progress=false: nothing at all


def test_training_steps_and_results_as_log_lines(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="src.progress")
    clock = iter(range(0, 1000, 2))  # every call to the clock: 2 s later
    monkeypatch.setattr(progress, "monotonic", lambda: next(clock))
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=4,
        limit_train_batches=4,
        limit_val_batches=2,
        callbacks=[progress.LogProgressBar(interval=3)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(ValLogged())
    steps = [line for line in lines(caplog) if line.startswith("train: step")]
    # the clock reads 2 s per call; with interval 3 every second step reports
    assert [s.split(",")[0] for s in steps] == ["train: step 2/4 (50%)", "train: step 4/4 (100%)"]
    assert steps[0].split(", ")[1:3] == ["2 s/step", "~4s left"]
    [val] = [line for line in lines(caplog) if line.startswith("validation")]
    assert val == f"validation at step 4: val/loss {trainer.callback_metrics['val/loss']:.4g}"


def test_lesion_sweep_as_log_lines(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="src.progress")
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    monkeypatch.setattr(progress, "monotonic", iter(range(0, 1000, 40)).__next__)
    net = preact_resnet_cifar(blocks_per_stage=1, in_channels=1, num_classes=10)
    plans = [Plan(deleted=frozenset({b})) for b in range(net.n_blocks)]
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))] * 2
    lesion_errors(net, plans, batches, progress=True, description="delete single")
    got = lines(caplog)
    assert got[0].startswith("delete single (test batch 1): 1/3 (33%), 40 s/lesion, ~1m20s left")
    assert any(line.startswith("delete single (test batch 2): 3/3 (100%)") for line in got)
    assert got[-1].startswith("delete single (test batch 2): done in")


@pytest.mark.parametrize("seconds,text", [(5.4, "5s"), (75, "1m15s"), (3725, "1h02m")])
def test_durations_read_like_a_clock(seconds, text):
    assert progress._duration(seconds) == text
