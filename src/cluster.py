"""Slurm and DDP glue: a check that refuses Slurm requests no node can meet, Lightning's DDP
ranks kept inside the current sweep job, and SIGTERM bookkeeping for requeued Slurm jobs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from src.errors import ConfigError, exit_with


def partition_nodes(partition: str | None) -> list[dict] | None:
    """CPUs, memory (MB) and GPUs of each node of `partition` (the default one if None), from
    `sinfo`; None where sinfo is missing or says nothing."""
    if shutil.which("sinfo") is None:
        return None
    res = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        return None
    nodes = []
    for line in res.stdout.splitlines():
        part, cpus, mem, gres = (line.split("|") + ["", "", "", ""])[:4]
        default = part.endswith("*")
        part = part.rstrip("*")
        if (partition is None and not default) or (partition is not None and part != partition):
            continue
        gres = [re.sub(r"\(.*?\)", "", g).split(":") for g in gres.split(",")]
        gpus = sum(int(g[-1]) for g in gres if g[0] == "gpu" and g[-1].isdigit())
        nodes.append(
            {
                "partition": part,
                "cpus": int(cpus.rstrip("+")),
                "mem_mb": int(mem.rstrip("+")),
                "gpus": gpus,
            }
        )
    return nodes


def check_request(params: dict, nodes: list[dict] | None) -> None:
    """Raise ConfigError when no node of the partition can hold one job of this sweep (Slurm
    would leave it pending forever with reason PartitionConfig or Resources)."""
    if nodes is None:
        return
    partition = params.get("partition")
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise ConfigError(
            f"Slurm has no {where}: set hydra.launcher.partition=<one listed by sinfo>"
        )
    tasks = int(params.get("tasks_per_node") or 1)
    want = {
        "cpus": tasks * int(params.get("cpus_per_task") or 1),
        "mem_mb": int(float(params.get("mem_gb") or 0) * 1024),
        "gpus": int(params.get("gpus_per_node") or 0),
    }
    have = {k: max(n[k] for n in nodes) for k in want}
    fixes = {
        "cpus": f"hydra.launcher.cpus_per_task<={have['cpus'] // tasks}",
        "mem_mb": f"hydra.launcher.mem_gb<={have['mem_mb'] // 1024}",
        "gpus": "hydra.launcher.partition=<a partition with GPUs> (or hydra/launcher=slurm)",
    }
    short = [k for k in want if want[k] > have[k]]
    if short:
        fix = " and ".join(fixes[k] for k in short)
        unit = {"cpus": "CPUs", "mem_mb": "MB of memory", "gpus": "GPUs"}
        asked = ", ".join(f"{want[k]} {unit[k]}" for k in short)
        offered = ", ".join(f"{have[k]} {unit[k]}" for k in short)
        raise ConfigError(
            f"this sweep asks Slurm for {asked} per node but the largest node of {where} has "
            f"{offered}, so its jobs would pend forever: set {fix}"
        )


class CheckSlurmRequest(Callback):
    """Hydra callback: before a sweep goes to Slurm (hydra/launcher=slurm*), check its request
    against the partition and stop with a one-line error instead of blocking on jobs that can
    never start."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.launcher
        if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
            return
        params = OmegaConf.to_container(launcher, resolve=True)
        try:
            check_request(params, partition_nodes(params.get("partition")))
        except ConfigError as err:
            exit_with(err)


def ddp_ranks_join_this_job() -> None:
    """Outside Slurm, Lightning starts DDP ranks 1.. by re-running `sys.argv` plus
    `hydra.run.dir=<hydra.run.dir>`. In a sweep (`-m`) that would re-run the whole sweep into new
    directories (lightning-hydra-template #393), so point it at this job: its own overrides, run
    mode, its own directory."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def leave_ddp() -> None:
    """Lightning's DDP launcher leaves its process group and rank variables (LOCAL_RANK, ...) in
    this process. Clear them after each job, so the next job of a local sweep starts its own ranks
    instead of taking LOCAL_RANK as a sign that someone else started them."""
    import torch  # here: the entry point reports config errors without loading torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)
    os.environ.pop("PL_GLOBAL_SEED", None)  # a `seed=null` job after a seeded one draws anew


SIGTERMED = {"received": False}


def watch_sigterm() -> None:
    """Under Slurm, note a SIGTERM (requeue or preemption) and pass it on to the handler already
    installed (submitit's); Lightning later chains its own handlers in front of this one."""
    if "SLURM_JOB_ID" not in os.environ:
        return
    previous = signal.getsignal(signal.SIGTERM)

    def note(signum, frame):
        SIGTERMED["received"] = True
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, note)


def terminating(grace_s: float = 15.0) -> bool:
    """Whether Slurm is ending this job (requeue, preemption, scancel). Asked after a failure:
    Slurm signals a job's processes one at a time, so a helper process (W&B's service) may die
    and break this one before its own SIGTERM arrives; wait up to `grace_s` for it."""
    if "SLURM_JOB_ID" not in os.environ:
        return False
    end = time.monotonic() + grace_s
    while not SIGTERMED["received"] and time.monotonic() < end:
        time.sleep(0.1)  # the handler runs between sleeps
    return SIGTERMED["received"]


def requeued() -> bool:
    """True inside a Slurm job that was requeued (it continues its own run directory)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
