"""Entry point: `python -m src.run [experiment=...] [preset=quick] [key=value ...]`.

Builds data, model, LightningModule, callbacks, loggers and trainer from the Hydra config, fits
(unless `train=false`), tests, and lets the analysis callbacks run at the end of testing. Every run
directory gets `metrics.json` (final test metrics, `test_error` as a fraction) and `checkpoints/`.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

from src.analysis.io import atomic_write, write_json
from src.data import DataUnavailable
from src.errors import ConfigError
from src.module import Classifier

log = logging.getLogger("src.run")
USER_ERRORS = (ConfigError, DataUnavailable, FileNotFoundError)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A per-process random suffix keeps run directories unique when many jobs start in one second.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def wandb_id(output_dir: str) -> str:
    """This run dir's W&B run id, kept beside its checkpoints (`checkpoints/wandb_id`) so that a
    resumed or requeued job continues its own W&B run. The first rank to get here creates it."""
    path = Path(output_dir) / "checkpoints" / "wandb_id"
    if not path.exists():
        tmp = atomic_write(path.with_name(f".wandb_id.{os.getpid()}"), secrets.token_hex(8))
        try:
            os.link(tmp, path)  # atomic and never overwrites another rank's id
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_text().strip()


def wandb_group(experiment_name: str) -> str:
    """W&B group: `<experiment>` for a single run, `<experiment>/<sweep dir>` for a sweep's jobs."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"{experiment_name}/{Path(hydra_cfg.sweep.dir).name}"
    return experiment_name


OmegaConf.register_new_resolver("wandb_id", wandb_id, replace=True)
OmegaConf.register_new_resolver("wandb_group", wandb_group, replace=True)


def build(cfg: DictConfig, list_key: str) -> list:
    """Instantiate each entry of a dict of configs that has a `_target_` (null: switched off)."""
    return [
        instantiate(c)
        for c in (cfg.get(list_key) or {}).values()
        if c is not None and "_target_" in c
    ]


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume=true`: continue from this run dir's newest checkpoint (last.ckpt, or the
    hpc_ckpt_<n>.ckpt Lightning saves on Slurm's requeue signal) if any; `resume=<file>`: from it.
    A requeued Slurm job (SLURM_RESTART_COUNT > 0) always continues its own run dir."""
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if cfg.resume is True or requeued:
        found = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
        found = [p for p in found if p.exists()]
        if found:
            return str(max(found, key=lambda p: p.stat().st_mtime))
    if cfg.resume in (None, False, True):
        return None
    path = Path(str(cfg.resume)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"resume={cfg.resume}: no such checkpoint file; pass a .ckpt or resume=true"
        )
    return str(path)


def load_weights(module: Classifier, ckpt_path: str) -> None:
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such file; pass the .ckpt of a finished run")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(
            f"checkpoint {path} was trained with a different architecture than "
            f"model={module.net.__class__.__name__}({module.net.n_blocks} blocks): pass the "
            "model=... (and data=...) it was trained with"
        ) from None


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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)


def validate(cfg: DictConfig) -> None:
    if not cfg.train and not cfg.ckpt_path:
        raise ConfigError("train=false needs a checkpoint to analyse: add ckpt_path=<file.ckpt>")


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("task") is not None:  # an analysis that needs no trained network (Figs 6a, 7)
        instantiate(cfg.task, _convert_="all", output_dir=str(output_dir))
        return {}
    validate(cfg)
    if cfg.seed is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    net = instantiate(
        cfg.model,
        _convert_="all",
        in_channels=datamodule.channels,
        num_classes=datamodule.num_classes,
    )
    module = Classifier(
        net, mode=instantiate(cfg.training), num_classes=datamodule.num_classes, **cfg.optim
    )
    ddp_ranks_join_this_job()
    trainer = instantiate(
        cfg.trainer,
        callbacks=build(cfg, "callbacks"),
        logger=build(cfg, "logger"),
        default_root_dir=str(output_dir),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if cfg.train:
        log.info(
            "training %s (%d blocks) on %s", cfg.model._target_, net.n_blocks, cfg.data._target_
        )
        ckpt = resume_checkpoint(cfg, output_dir)
        if ckpt:
            log.info("resuming from %s", ckpt)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        # the weights tested below are the final ones, also when fit stopped mid-epoch
        trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt")
    else:
        load_weights(module, cfg.ckpt_path)
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k.replace("/", "_"): float(v) for k, v in results.items()}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        log.info(
            "test error %.4f; results in %s", metrics.get("test_error", float("nan")), output_dir
        )
    return metrics


def check_choices(argv: list[str]) -> None:
    """Fail fast, in one line, on an unknown config-group option (e.g. `model=resnet111`)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = CONF_DIR / key
        if not sep or key.startswith("hydra") or not group.is_dir():
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options and choice != "null":
                raise ConfigError(f"unknown {key} {choice!r}: choose one of {', '.join(options)}")


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    watch_sigterm()
    try:
        try:
            return train(cfg).get("test_error")
        except InstantiationException as err:  # a bad value caught by a constructor
            if isinstance(err.__cause__, USER_ERRORS):
                raise err.__cause__ from None
            raise
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if SIGTERMED["received"]:
            # Slurm is requeueing this job and its SIGTERM broke something on the way (e.g. it
            # killed W&B's service): report no result, so the requeued job runs and reports.
            log.warning("failed after SIGTERM under Slurm; exiting for the requeued job to resume")
            logging.shutdown()
            os._exit(143)
        raise
    finally:
        if "wandb" in sys.modules:
            import wandb

            try:
                wandb.finish()
            except Exception as err:  # W&B's service is gone, e.g. killed by a Slurm requeue:
                log.warning("could not close the W&B run: %r", err)  # don't mask the real exit
        leave_ddp()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        check_choices(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"error: {err}")
    main()
