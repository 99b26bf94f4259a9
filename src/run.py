"""Entry point: `python -m src.run [experiment=...] [preset=quick] [key=value ...]`.

Builds data, model, LightningModule, callbacks, loggers and trainer from the Hydra config, fits
(unless `train=false`), tests, and lets the analysis callbacks run at the end of testing. Every run
directory gets `metrics.json` (final test metrics, `test_error` as a fraction) and `checkpoints/`.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.analysis.io import write_json
from src.data import DataUnavailable
from src.errors import ConfigError
from src.module import Classifier

log = logging.getLogger("src.run")

# A per-process random suffix keeps run directories unique when many jobs start in one second.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def build(cfg: DictConfig, list_key: str) -> list:
    """Instantiate each entry of a dict of configs that has a `_target_` (null: switched off)."""
    return [
        instantiate(c)
        for c in (cfg.get(list_key) or {}).values()
        if c is not None and "_target_" in c
    ]


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume=true`: continue from this run dir's last.ckpt if any; `resume=<file>`: from it."""
    if cfg.resume in (None, False):
        return None
    if cfg.resume is True:
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
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
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, output_dir))
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg).get("test_error")
    except (ConfigError, DataUnavailable, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if "wandb" in sys.modules:
            import wandb

            wandb.finish()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
