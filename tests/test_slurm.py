"""Sweeps on a real Slurm cluster through `hydra/launcher=slurm` (hydra-submitit-launcher).
The README's own two-job sweep runs as written in tests/test_docs.py.

CI starts a single-node cluster with `scripts/slurm_local.sh start`; without `sinfo` on the PATH
these tests are skipped. The requeue test also covers preemption: a job requeued by
`scontrol requeue` resumes from its last.ckpt, and Lightning's own auto-requeue (SIGUSR1) saves an
hpc checkpoint, requeues the job and resumes from it; all attempts log to the job's one W&B run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.test_resume import assert_same_weights, weights

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(
        shutil.which("sinfo") is None
        or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
        reason="no Slurm cluster here: run `scripts/slurm_local.sh start` (as root) first",
    ),
]

# One CPU and 1 GB per job so that two jobs run side by side on a 2-core CI machine.
SMALL = (
    "hydra/launcher=slurm",
    "preset=quick",
    "model=resnet20",
    "logger=csv",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=15",
)


def test_ddp_job_gets_one_slurm_task_per_rank(tmp_path):
    """trainer=ddp on Slurm: tasks_per_node follows trainer.devices, srun starts both ranks,
    Lightning reads them from Slurm; one run dir, one W&B run, metrics from rank 0."""
    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        *SMALL,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_steps=10",
        "logger=wandb",
        "seed=0",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0",
        "multirun.yaml",
        "report",  # the sweep's report, written once when the Slurm array had finished
    ]
    [script] = (sweep / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --ntasks-per-node=2" in script.read_text()
    logs = _job_logs(sweep)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert json.loads((sweep / "0" / "metrics.json").read_text())["global_step"] == 10
    assert len(list((sweep / "0" / "wandb").glob("offline-run-*"))) == 1


def _job_logs(sweep: Path, job: str | None = None) -> str:
    """stdout + stderr of sweep job `job` (submitit keeps them in .submitit/<array>_<job>/), or
    of all jobs (a one-job sweep is a plain job, not an array: .submitit/<job id>/)."""
    logs = sorted((sweep / ".submitit").glob(f"*_{job}/*_log.*" if job else "*/*_log.*"))
    assert logs, f"no submitit logs for job {job}"
    return "".join(p.read_text() for p in logs)


def _wait(what: str, cond, timeout: float = 240, proc: subprocess.Popen | None = None):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def _release(job_id: str, proc: subprocess.Popen) -> None:
    """A requeued job waits ~2 min (BeginTime) before it may start again; start it in 10 s.
    Not at once: slurmd revokes the previous attempt's credential a moment after the requeue,
    and an attempt launched within that moment is killed ("Job credential revoked", FAILED)."""
    _wait(f"job {job_id} pending again", lambda: _state(job_id) == "PENDING", 120, proc)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+10"], check=True)


def test_requeued_job_resumes_from_its_checkpoints(tmp_path):
    sweep = tmp_path / "sweep"
    # bit-identical results need the same thread count in the job and the local reference run
    one_thread = {"OMP_NUM_THREADS": "1"}
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", **one_thread}
    cmd = [sys.executable, "-m", "src.run", "-m", *SMALL, "logger=wandb", "trainer.max_steps=120"]
    out = tmp_path / "sweep.log"
    job_id = None
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [*cmd, f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, stdout=sink, stderr=sink
        )
    try:
        run = sweep / "0"
        run_log = run / "run.log"
        _wait("the first checkpoint", (run / "checkpoints" / "last.ckpt").exists, 300, proc)
        [job_id] = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir()]
        assert _state(job_id) == "RUNNING"

        # 1. an admin (or a preempting partition) requeues the running job
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        _release(job_id, proc)
        _wait(
            "resume from last.ckpt",
            lambda: (
                "resuming from " + str(run / "checkpoints" / "last.ckpt") in run_log.read_text()
            ),
            240,
            proc,
        )
        # 2. the time-limit signal: Lightning saves hpc_ckpt_1.ckpt and requeues the job itself.
        # Its handler is set when fit starts; before that, USR1 would simply kill the job.
        _wait(
            "the resumed fit to start",
            lambda: _job_logs(sweep).count("SLURM auto-requeueing enabled") >= 2,
            120,
            proc,
        )
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        _wait("Lightning's hpc checkpoint", (run / "hpc_ckpt_1.ckpt").exists, 120, proc)
        _release(job_id, proc)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        if job_id is not None:  # never leave the job behind (no-op once it has finished)
            subprocess.run(["scancel", job_id], capture_output=True)
        if proc.returncode != 0:  # say why the sweep failed: its own log and its job's logs
            jobs = _job_logs(sweep) if (sweep / ".submitit").is_dir() else ""
            print(f"sweep log:\n{out.read_text()[-4000:]}\njob logs:\n{jobs[-6000:]}")
    assert proc.returncode == 0, out.read_text()[-3000:]

    log = run_log.read_text()
    assert f"resuming from {run / 'hpc_ckpt_1.ckpt'}" in log
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 120
    # all three attempts logged to the job's one W&B run (an offline folder per attempt)
    run_id = (run / "wandb_id").read_text().strip()
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 3 and all(a.name.endswith(f"-{run_id}") for a in attempts)
    err = _job_logs(sweep)
    # exactly one mechanism requeued: Lightning, once (on USR1); submitit never caught a signal
    assert err.count("Handling auto-requeue signal") == 1
    assert err.count("Requeued SLURM job") == 1
    assert "Caught signal" not in err
    # the job re-ran in its own directory: no second run dir appeared
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0",
        "multirun.yaml",
        "report",  # the sweep's report, written once when the Slurm array had finished
    ]
    # and, resumed twice (from last.ckpt, then mid-epoch from hpc_ckpt_1.ckpt), it ends with the
    # weights of an uninterrupted run with the same seed, tensor for tensor
    whole = tmp_path / "whole"
    reference = ("preset=quick", "model=resnet20", "logger=csv", "trainer.max_steps=120")
    run_cli(*reference, f"hydra.run.dir={whole}", env=one_thread, timeout=600)
    assert_same_weights(
        weights(run / "checkpoints" / "last.ckpt"), weights(whole / "checkpoints" / "last.ckpt")
    )
