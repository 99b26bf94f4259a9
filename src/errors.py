"""User-facing errors: the error type, its one-line report, and the checks of a run's config that
run before any work (each message is one line that names the fix)."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """An invalid configuration value, caught before any work starts."""


class DataUnavailable(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message names the fix."""


def exit_with(err: BaseException, code: int = 2) -> None:
    """Print `error: <message>` as one line on stderr and exit non-zero."""
    message = " ".join(str(err).split())  # one line, whatever the message holds
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_device(cfg: DictConfig) -> None:
    import torch  # here: a config error is reported without loading torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer=gpu needs a CUDA GPU and none is visible here: run on the CPU with "
            "preset=quick (or trainer=cpu)"
        )


def validate(cfg: DictConfig) -> None:
    if not cfg.train and not cfg.ckpt_path and not cfg.model.get("path"):
        raise ConfigError(
            "train=false needs a checkpoint to analyse: add ckpt_path=<file.ckpt> (or, for a "
            "pretrained Hugging Face model, model=hf_causal_lm model.path=<its directory>)"
        )
    if cfg.train and cfg.model.get("device_map") is not None:
        raise ConfigError(
            "model.device_map spreads a model over devices for analysis only: add train=false "
            "(train on one device or with DDP, then analyse the checkpoint or model.path)"
        )
    check_device(cfg)


FIX = {
    "tokens": "a language model runs on text: use experiment=lm_lesions (data=text, "
    "module=src.lm.LanguageModel) with model=hf_causal_lm",
    "images": "an image classifier runs on image data: use an image model (e.g. model=resnet110, "
    "model=vit_digits or model=timm) with data=digits/fashion_mnist/cifar10/imagenet",
}


def check_pairing(net, datamodule, module_class) -> None:
    """The network, the data and the LightningModule take the same kind of input (images or
    tokens), else one line naming the fix (before any work: `model=hf_causal_lm preset=quick`
    would otherwise die inside the embedding)."""
    kinds = {
        "the model": getattr(net, "inputs", "images"),
        "the data": getattr(datamodule, "inputs", "images"),
        "the module": getattr(module_class, "inputs", "images"),
    }
    if len(set(kinds.values())) > 1:
        said = ", ".join(f"{k} takes {v}" for k, v in kinds.items())
        raise ConfigError(f"{said}: {FIX[kinds['the model']]}")


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


def close_key(root: DictConfig | None, key: str) -> str | None:
    """`key` with its first segment that is not in the config `root` replaced by the nearest
    one there (at the top level, the config groups count too); None when none is close."""
    node, parts = root, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        names = [str(k) for k in node.keys()]
        if part in names:
            node = node._get_node(part)
            continue
        if i == 0:
            names += [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
        match = difflib.get_close_matches(part, names, n=1)
        return ".".join([*parts[:i], match[0], *parts[i + 1 :]]) if match else None
    return None


def unknown_key(err: BaseException) -> ConfigError | None:
    """Hydra's refusal of an override whose key the config lacks (given without `+`), as one line
    naming the fix and the nearest key; None for any other error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    said = re.match(r"Could not override '([^']+)'\.", str(err))
    cause = err.__cause__
    if not said or not isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return None
    key = said.group(1)
    line = re.search(r"use \+(.+)$", str(err), re.MULTILINE)
    added = line.group(1) if line else f"{key}=..."
    parent = getattr(cause, "parent_node", None)
    close = close_key(parent._get_root() if parent is not None else None, key)
    hint = f" (did you mean {close}?)" if close and close != key else ""
    return ConfigError(
        f"{key} is not a config key{hint}: fix the spelling, or add it with +{added} if it is new"
    )
