"""Run directories and W&B identity.

Every run writes into its own directory (`outputs/<experiment>/<time>_<suffix>/`, set in
conf/hydra/default.yaml); this module keeps a finished run's results from being overwritten and
gives each run directory one W&B run id (`<run dir>/wandb_id`), so that a resumed or requeued job
continues its own W&B run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from src.errors import ConfigError
from src.results import atomic_write

# A per-process random suffix keeps run directories unique when many jobs start in one second.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def wandb_id(output_dir: str) -> str:
    """This run dir's W&B run id (`<run dir>/wandb_id`), created by the first rank to get here."""
    path = Path(output_dir) / "wandb_id"
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


def finished_results(output_dir: Path) -> list[Path]:
    """What a run already wrote into `output_dir` that a new run would overwrite."""
    found = [output_dir / "metrics.json", *sorted(output_dir.glob("checkpoints/*.ckpt"))]
    return [p for p in [*found, *sorted(output_dir.glob("hpc_ckpt_*.ckpt"))] if p.exists()]


def refuse_to_overwrite(output_dir: Path, resuming: bool) -> None:
    """A new run never writes into a directory that holds another run's results."""
    if resuming or int(os.environ.get("LOCAL_RANK") or 0) > 0:  # DDP ranks 1.. join rank 0
        return
    found = finished_results(output_dir)
    if found:
        raise ConfigError(
            f"run directory {output_dir} already holds a run ({found[0].name}): add resume=true "
            "to continue it, or leave out hydra.run.dir to start in a fresh directory"
        )
