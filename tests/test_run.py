"""End to end through the real CLI (`python -m src.run`) in subprocesses: what a run writes, that
it describes itself, and the one-line errors on the user's path."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.checkpoint import check_overrides_against
from src.cluster import check_request, partition_nodes
from src.data import DigitsDataModule
from src.errors import ConfigError
from src.models import preact_resnet_cifar
from tests.conftest import REPO, run_cli

TINY = ("preset=quick", "model=resnet20", "trainer.max_steps=30")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_of(ckpt: Path) -> float:
    """The test error of a checkpoint's weights, computed here without Lightning or src.run."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net = preact_resnet_cifar(blocks_per_stage=3, in_channels=1, num_classes=10)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k[:4] == "net."})
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.splits["test"].tensors
    with torch.no_grad():
        wrong = (net.eval()(dm.transform(x, train=False)).argmax(1) != y).sum().item()
    return wrong / len(y)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("tiny_run")
    res = run_cli(*TINY, f"hydra.run.dir={run}")  # the default logger: W&B, offline
    return run, res.stdout + res.stderr


@pytest.mark.slow
def test_a_run_writes_what_it_ran_and_its_test_error(tiny_run):
    run, output = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    facts = {k: metrics[k] for k in ("model", "data", "training", "n_blocks", "k", "seed")}
    assert facts == {
        "model": "resnet20",
        "data": "digits",
        "training": "standard",
        "n_blocks": 9,
        "k": 9,
        "seed": 0,
    }
    assert metrics["global_step"] == 30
    # the reported error is the final weights' error, recomputed independently; after 30 steps it
    # is far from chance (0.9; measured 0.27), so a run that did not train fails here
    assert metrics["test_error"] == pytest.approx(error_of(run / "checkpoints" / "last.ckpt"))
    assert metrics["test_error"] < 0.6
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # plain data: loads with weights_only
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)["run_config"]
        assert saved["choices"]["model"] == "resnet20" and saved["model"]["blocks_per_stage"] == 3
    [offline] = (run / "wandb").glob("offline-run-*")
    assert (offline / f"run-{(run / 'wandb_id').read_text().strip()}.wandb").is_file()
    # the project's own lines, not Lightning's advertisement or W&B's deprecation notice
    assert "litlogger" not in output and "anonymous setting" not in output
    assert "training src.models.preact_resnet_cifar (9 blocks)" in output
    # no terminal here: progress and results reach the log as lines (src/progress.py)
    [tested] = [line for line in output.splitlines() if "test at step 30: " in line]
    assert f"test/error {metrics['test_error']:.4g}," in tested


@pytest.mark.slow
def test_a_checkpoint_describes_its_run(tiny_run, tmp_path):
    """train=false needs no model=/data=/preset=: the checkpoint says what it is."""
    run, _ = tiny_run
    ckpt = run / "checkpoints" / "last.ckpt"
    again = tmp_path / "again"
    run_cli("train=false", f"ckpt_path={ckpt}", f"hydra.run.dir={again}", "logger=csv")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (run, again))
    assert m2["test_error"] == pytest.approx(m1["test_error"], abs=1e-6)
    assert (m2["model"], m2["data"], m2["n_blocks"]) == ("resnet20", "digits", 9)
    # an override that contradicts the checkpoint names both values
    res = run_cli(
        "train=false",
        f"ckpt_path={ckpt}",
        "model=vgg15",
        f"hydra.run.dir={tmp_path}/x",
        check=False,
    )
    line = last_line(res.stderr)
    assert res.returncode == 2 and "model=vgg15" in line and "model=resnet20" in line, line


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten(tiny_run):
    run, _ = tiny_run
    kept = {p: digest(p) for p in [run / "metrics.json", *(run / "checkpoints").glob("*.ckpt")]}
    res = run_cli(*TINY, "seed=1", f"hydra.run.dir={run}", "logger=csv", check=False)
    line = last_line(res.stderr)
    assert res.returncode == 2 and "resume=true" in line and str(run) in line, line
    assert {p: digest(p) for p in kept} == kept
    assert sorted((run / "checkpoints").glob("*.ckpt")) == sorted(
        p for p in kept if p.suffix == ".ckpt"
    )


@pytest.mark.slow
def test_bad_input_gets_one_line_error_and_nonzero_exit(tmp_path):
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello\n")
    cases = {
        ("model=resnet111",): "choose one of",
        ("preset=quick", "training=block_subset", "training.k=0"): "training.k=0",
        ("preset=quick", "train=false"): "ckpt_path=",
        ("preset=quick", "train=false", "ckpt_path=nope.ckpt"): "no such file",
        ("train=false", f"ckpt_path={not_a_checkpoint}"): f"{not_a_checkpoint} is not a checkpoint",
        ("preset=quick", "data.batch_size=0"): "batch_size",
        ("model=hf_causal_lm", "preset=quick"): "the model takes tokens, the data takes images",
        ("experiment=lm_lesions", "preset=quick", "model=vit_digits"): (
            "the model takes images, the data takes tokens"
        ),
    }
    if not torch.cuda.is_available():
        cases[("preset=quick", "trainer=gpu")] = "trainer=gpu needs a CUDA GPU"
    for overrides, hint in cases.items():
        res = run_cli(*overrides, f"hydra.run.dir={tmp_path}/x", "logger=csv", check=False)
        assert res.returncode == 2, (overrides, res.stderr[-2000:])
        line = last_line(res.stderr)
        assert line.startswith("error:") and hint in line, (overrides, res.stderr[-500:])
        assert "Traceback" not in res.stderr, (overrides, res.stderr[-2000:])
    assert not list(tmp_path.glob("x/checkpoints/*.ckpt"))


NODE = {"partition": "small", "cpus": 2, "mem_mb": 8000, "gpus": 0}


TERMINATING = """
import os, signal, sys, threading
from src.cluster import terminating, watch_sigterm
watch_sigterm()
print(terminating(grace_s=0.3), flush=True)  # no signal comes
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
print(terminating(grace_s=5), flush=True)  # the job's SIGTERM arrives after the failure
"""


@pytest.mark.parametrize("slurm", [True, False])
def test_a_failure_just_before_slurms_sigterm_counts_as_termination(slurm):
    """Slurm signals a job's processes one by one: W&B's service can die (and break training)
    before the training process gets its own SIGTERM. Such a failure must not be reported as the
    job's result (the requeued job reports), so `terminating` waits a grace period for the signal;
    outside Slurm it answers at once and a SIGTERM ends the process as usual."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if slurm:
        env["SLURM_JOB_ID"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", TERMINATING],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if slurm:
        assert res.returncode == 0 and res.stdout.split() == ["False", "True"], res.stderr
    else:  # answered at once (a wait would have met the signal first), then SIGTERM ended it
        assert res.stdout.split() == ["False", "False"] and res.returncode == -signal.SIGTERM


def test_slurm_request_larger_than_any_node_is_refused():
    ok = {"partition": "small", "cpus_per_task": 1, "tasks_per_node": 2, "mem_gb": 4}
    check_request(ok, [NODE])
    check_request(ok, None)  # no sinfo: nothing to check against
    cases = {
        "cpus_per_task": (4, "hydra.launcher.cpus_per_task<=1"),
        "mem_gb": (16, "hydra.launcher.mem_gb<=7"),
        "gpus_per_node": (1, "hydra.launcher.partition="),
    }
    for key, (value, fix) in cases.items():
        with pytest.raises(ConfigError, match="would pend forever") as err:
            check_request({**ok, key: value}, [NODE])
        assert fix in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no partition small"):
        check_request(ok, [])


def test_sinfo_parsing(tmp_path, monkeypatch):
    sinfo = tmp_path / "sinfo"
    sinfo.write_text(
        "#!/bin/sh\nprintf 'cpu*|2|8000|(null)\\ngpu|64|512000|gpu:a100:8(S:0-1)\\n"
        "gpu|32|256000+|gpu:4\\n'\n"
    )
    sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert partition_nodes(None) == [{"partition": "cpu", "cpus": 2, "mem_mb": 8000, "gpus": 0}]
    assert [n["gpus"] for n in partition_nodes("gpu")] == [8, 4]


def test_overrides_checked_against_a_checkpoint():
    saved = {
        "choices": {"model": "resnet20", "data": "digits", "training": "standard", "preset": None},
        "model": {"blocks_per_stage": 3, "shortcut": "B"},
        "data": {"batch_size": 64},
        "training": {"_target_": "src.training.Standard"},
    }
    check_overrides_against(saved, ["model=resnet20", "data.batch_size=7", "experiment=x"], "c")
    for override, named in [
        ("model=vgg15", "model=resnet20"),
        ("preset=quick", "preset=None"),
        ("model.shortcut=A", "model.shortcut=B"),
        ("data.data_dir=/x", "data.data_dir"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_overrides_against(saved, [override], "c")
        assert override in str(err.value) and named in str(err.value)


def test_a_sweep_job_leaves_no_seed_for_the_next(monkeypatch):
    """`seed=null` after a seeded job of the same local sweep must draw a fresh seed."""
    from src.cluster import leave_ddp
    from src.seeds import run_seed

    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    assert run_seed() == 3
    leave_ddp()
    assert "PL_GLOBAL_SEED" not in os.environ and run_seed() != 3
