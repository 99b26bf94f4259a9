"""Run directories and W&B identity.

Every run writes into its own directory (`outputs/<experiment>/<time>_<suffix>/`, set in
conf/hydra/default.yaml); this module keeps a finished run's results from being overwritten and
gives each run directory one W&B run id (`<run dir>/wandb_id`), so that a resumed or requeued job
continues its own W&B run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from src.errors import ConfigError
from src.results import atomic_write

# A per-process random suffix keeps run directories unique when many jobs start in one second.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)


# Set while the config is checked (src/schema.py): `${wandb_id:}` then reads an id but writes none,
# so that a run refused before any work leaves no `wandb_id` behind.
_CHECKING = contextvars.ContextVar("checking", default=False)
UNASSIGNED = "unassigned"  # the id a check sees where the run dir has none yet


@contextlib.contextmanager
def no_new_ids() -> Iterator[None]:
    """Within: `wandb_id` creates no id file (it gives UNASSIGNED where there is none)."""
    token = _CHECKING.set(True)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def wandb_id(output_dir: str) -> str:
    """This run dir's W&B run id (`<run dir>/wandb_id`), created by the first rank to get here
    (UNASSIGNED, and nothing written, while the config is checked: `no_new_ids`)."""
    path = Path(output_dir) / "wandb_id"
    if not path.exists():
        if _CHECKING.get():
            return UNASSIGNED
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


# What Hydra's records of a run (`<run dir>/.hydra/*.yaml`) held before this process rewrote them.
_EARLIER: dict[Path, bytes] = {}


def keep_earlier_records() -> None:
    """Hydra writes `<run dir>/.hydra/{config,hydra,overrides}.yaml` before the run starts, over
    those of a run already in that directory (a re-run, `resume=true`): keep what they held, so
    that a refused run can put them back (`restore_earlier_records`). For the CLI only."""
    from hydra.core import utils

    save = getattr(utils, "_save_config", None)
    if save is None or getattr(save, "keeps_earlier", False):  # another Hydra, or done already
        return

    def _save_config(cfg, filename: str, output_dir: Path) -> None:
        path = Path(output_dir) / filename
        if path.is_file():
            _EARLIER.setdefault(path.resolve(), path.read_bytes())
        save(cfg, filename, output_dir)

    _save_config.keeps_earlier = True
    utils._save_config = _save_config


def restore_earlier_records(output_dir: Path) -> list[Path]:
    """Put back the records under `output_dir` that Hydra rewrote for a run that was refused;
    the paths put back."""
    root = Path(output_dir).resolve()
    back = []
    for path, data in _EARLIER.items():
        if path.is_relative_to(root) and (not path.is_file() or path.read_bytes() != data):
            atomic_write(path, data)
            back.append(path)
    return back


def results_state(output_dir: Path) -> dict[Path, int]:
    """The results a run dir holds (`finished_results`), each with its modification time: the
    same before and after a run that wrote no results."""
    return {p: p.stat().st_mtime_ns for p in finished_results(Path(output_dir))}
