"""A resumed run ends with the weights of the uninterrupted run, tensor for tensor: after a SIGKILL
and `resume=true` (the epoch-end last.ckpt), and from a checkpoint saved mid-epoch on Slurm's
requeue signal (hpc_ckpt_<n>.ckpt). Checkpoints load with `weights_only=True`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors import signal_connector

from src.data import DigitsDataModule
from src.models import preact_resnet_cifar
from src.module import Classifier
from src.training import BlockSubset, Standard, StochasticDepth
from tests.conftest import REPO, run_cli


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def weights(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------------------
# The CLI: SIGKILL after an epoch-end checkpoint, then resume=true

# 19 steps per epoch of digits at batch 64: checkpoints at steps 19, 38, 57. Block subset
# (k of 9 blocks) and augmentation make every kind of random draw part of the run.
STEPS = 60
ARGS = (
    "preset=quick",
    "model=resnet20",
    "logger=csv",
    "callbacks.progress_bar=null",
    "training=block_subset",
    "training.k=3",
    "data.augment=true",
    "+data.padding=1",
    f"trainer.max_steps={STEPS}",
)
ENV = {"OMP_NUM_THREADS": "1"}  # both runs on the same number of threads


def kill_after_first_checkpoint(run_dir) -> int:
    """Start the run, SIGKILL it once checkpoints/last.ckpt is complete; its global step."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "src.run", *ARGS, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            env={**os.environ, "WANDB_MODE": "offline", **ENV},
            stdout=sink,
            stderr=sink,
        )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline, step = time.time() + 300, None
    try:
        while step is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if last.exists():
                proc.send_signal(signal.SIGSTOP)  # frozen: the file cannot change under us
                try:
                    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
                except Exception:  # still being written
                    proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    assert step is not None, f"no complete checkpoint before the run ended: {log.read_text()}"
    assert not (run_dir / "metrics.json").exists(), "the run finished before it was killed"
    return step


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    step = kill_after_first_checkpoint(killed)
    assert 0 < step < STEPS
    # Lightning's own resume (Trainer.fit(ckpt_path=...)) with every torch.load weights-only
    run_cli(
        *ARGS,
        f"hydra.run.dir={killed}",
        "resume=true",
        env={**ENV, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert (
        f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in (killed / "run.log").read_text()
    )
    run_cli(*ARGS, f"hydra.run.dir={whole}", env=ENV)

    resumed = json.loads((killed / "metrics.json").read_text())
    uninterrupted = json.loads((whole / "metrics.json").read_text())
    assert resumed["global_step"] == uninterrupted["global_step"] == STEPS
    assert_same_weights(
        weights(killed / "checkpoints" / "last.ckpt"), weights(whole / "checkpoints" / "last.ckpt")
    )
    assert resumed["test_error"] == uninterrupted["test_error"]


# ---------------------------------------------------------------------------------------------
# In-process: Slurm's requeue signal in the middle of a step, mid-epoch


class SignalMidStep(L.Callback):
    """Sends this process Slurm's requeue signal between backward and optimizer step."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def fit(mode, root, ckpt_path=None, callbacks=(), plugins=()) -> dict:
    """30 steps (1.6 epochs) of a 3-block ResNet on augmented digits, seed 0, past an lr step."""
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, augment=True, padding=1)
    module = Classifier(
        preact_resnet_cifar(1, in_channels=1), mode=mode, warmup_steps=5, milestones=[27]
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=30,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=list(callbacks),
        plugins=list(plugins),
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module.state_dict()


@pytest.mark.parametrize(
    "mode", [Standard, StochasticDepth, lambda: BlockSubset(k=2)], ids=["standard", "sd", "subset"]
)
def test_requeue_checkpoint_mid_epoch_resumes_bit_identically(mode, tmp_path, monkeypatch):
    # a Slurm job with auto-requeue; `scontrol requeue` is not run
    for key, value in {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "t"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(signal_connector, "call", lambda *args, **kwargs: 0)
    slurm = SLURMEnvironment(auto_requeue=True)
    whole = fit(mode(), tmp_path / "a", callbacks=[SignalMidStep(24)], plugins=[slurm])
    ckpt = tmp_path / "a" / "hpc_ckpt_1.ckpt"
    # the signal came mid-step; Lightning saved at the step's end (step 25 done), mid-epoch
    assert torch.load(ckpt, weights_only=True)["global_step"] == 25
    resumed = fit(mode(), tmp_path / "b", ckpt_path=ckpt)
    assert_same_weights(whole, resumed)


def test_epoch_end_checkpoint_resumes_bit_identically(tmp_path):
    """Lightning's own epoch-end checkpoint (after validation), resumed in a new epoch."""
    every_epoch = ModelCheckpoint(tmp_path / "a", save_top_k=-1)
    whole = fit(Standard(), tmp_path / "a", callbacks=[every_epoch])
    ckpt = tmp_path / "a" / "epoch=0-step=19.ckpt"
    resumed = fit(Standard(), tmp_path / "b", ckpt_path=ckpt)
    assert_same_weights(whole, resumed)
