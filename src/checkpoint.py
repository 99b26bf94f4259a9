"""Self-describing checkpoints: every checkpoint carries the composed config of the run that wrote
it (as plain data), so that `train=false ckpt_path=<file>` rebuilds that run's network, data and
evaluation plan without `model=`/`data=`/`training=`/`preset=` repeated on the command line.

Checkpoints are read with `torch.load(..., weights_only=True)`: plain data only, no pickled code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.cluster import requeued
from src.errors import ConfigError

KEY = "run_config"
GROUPS = ("model", "data", "training")  # what the checkpoint decides
CHOICES = (*GROUPS, "preset")
# Keys that choose how a trained network is read or tested, not what it is: an analysis may set
# them freely (data location and batch sizes, the test-time rule of block-subset training and
# its batch-norm batches and ensemble size).
FREE_PREFIXES = ("data.", "training.test_mode", "training.bn_batches", "training.ensemble_size")


def describe(cfg: DictConfig, choices: dict, precision: str | None = None) -> dict:
    """The part of a run's config that defines its trained network, as plain data; `precision`:
    the one its weights were trained in (`trainer.precision` resolved, e.g. on the CPU it ran
    on), so that runs testing the checkpoint later report it."""
    return {
        "choices": {g: choices.get(g) for g in CHOICES},
        **{g: OmegaConf.to_container(cfg[g], resolve=True) for g in GROUPS},
        "seed": cfg.get("seed"),
        "precision": precision,
    }


class RunConfig(L.Callback):
    """Writes the run's description into every checkpoint Lightning saves."""

    def __init__(self, description: dict):
        self.description = description

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = self.description


def load(path: str | Path, what: str = "ckpt_path") -> dict:
    """Read a checkpoint of this project (weights_only), or stop with a one-line error."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"{what}={path}: no such file; pass the .ckpt of a finished run")
    fix = "pass a .ckpt written by python -m src.run (<run dir>/checkpoints/last.ckpt)"
    if not zipfile.is_zipfile(file):
        raise ConfigError(f"{what}={path} is not a checkpoint (not a torch.save file): {fix}")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{what}={path} holds pickled objects that weights_only loading refuses: {fix}"
        ) from None
    except Exception as err:  # truncated or corrupt
        raise ConfigError(f"{what}={path} cannot be read ({type(err).__name__}): {fix}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{what}={path} is not a Lightning checkpoint (no state_dict): {fix}")
    return ckpt


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def check_overrides_against(saved: dict, overrides: list[str], path: str) -> None:
    """A group choice, or a model/training value, that contradicts the checkpoint is a one-line
    error naming both values; a data.* key the checkpoint's data module lacks is one too."""
    choices = saved.get("choices") or {}
    config = OmegaConf.create({g: saved.get(g) or {} for g in GROUPS})
    for override in overrides:
        key, value = _split(override)
        if key in CHOICES:
            was = choices.get(key)
            if str(was) != value and not (was is None and value == "null"):
                raise ConfigError(
                    f"{key}={value} contradicts checkpoint {path}, which was trained with "
                    f"{key}={was}: drop {key}= (the checkpoint says what it is; with a "
                    f"multirun experiment, name {key}={was})"
                )
        elif key.startswith("data."):
            if OmegaConf.select(config, key, default="<missing>") == "<missing>":
                raise ConfigError(
                    f"{key}={value} does not apply to checkpoint {path}, trained on "
                    f"data={choices.get('data')}: drop {key}="
                )
        elif key.split(".")[0] in GROUPS and not key.startswith(FREE_PREFIXES):
            saved_value = _plain(OmegaConf.select(config, key, default=None))
            if saved_value is not None and _plain(_parse(value)) != saved_value:
                raise ConfigError(
                    f"{key}={value} contradicts checkpoint {path}, which was trained with "
                    f"{key}={saved_value}: drop {key}="
                )


def adopt(cfg: DictConfig, saved: dict, overrides: list[str], path: str) -> None:
    """Rebuild the checkpoint's network, data and training mode in `cfg` (in place), keeping the
    run's explicit overrides of FREE_PREFIXES (data.*, training.test_mode, ...). `overrides`: the
    run's own (command line and sweep)."""
    check_overrides_against(saved, overrides, path)
    free = {
        key: OmegaConf.select(cfg, key)
        for key in (_split(o)[0] for o in overrides)
        if key.startswith(FREE_PREFIXES)
    }
    with open_dict(cfg):
        for group in GROUPS:
            cfg[group] = OmegaConf.create(saved[group])
        for key, value in free.items():
            OmegaConf.update(cfg, key, value, force_add=True)


def _parse(value: str):
    """An override's value as Hydra would type it (`3` -> 3, `[1,2]` -> [1, 2])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={value}").value()


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume=true`: continue from this run dir's newest checkpoint (last.ckpt, or the
    hpc_ckpt_<n>.ckpt Lightning saves on Slurm's requeue signal) if any; `resume=<file>`: from it.
    A requeued Slurm job (SLURM_RESTART_COUNT > 0) always continues its own run dir."""
    if cfg.resume is True or requeued():
        found = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
        found = [p for p in found if p.exists()]
        if found:
            return str(max(found, key=lambda p: p.stat().st_mtime))
    if cfg.resume in (None, False, True):
        return None
    load(cfg.resume, what="resume")  # a one-line error unless it is a checkpoint
    return str(Path(str(cfg.resume)).expanduser())


def load_weights(module: L.LightningModule, ckpt: dict, path: str) -> None:
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise ConfigError(
            f"checkpoint {path} was trained with a different architecture than "
            f"model={module.net.__class__.__name__}({module.net.n_blocks} blocks): pass the "
            "model=... (and data=...) it was trained with"
        ) from None
