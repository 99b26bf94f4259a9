"""Pretrained Hugging Face files from a local directory or, by name, from the Hub.

A value that names an existing directory (or starts like a path: `/`, `.`, `~`) is read from disk
with `local_files_only`, nothing downloaded. Any other value is a Hub id (`gpt2`,
`org/name`): downloaded where the machine has network (then cached by Hugging Face), and a
one-line ConfigError naming the fix where it has not (`HF_HUB_OFFLINE=1` answers at once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.errors import ConfigError


def from_pretrained(load: Callable[..., Any], value: str, key: str, **kwargs) -> Any:
    """`load(<directory or Hub id>, **kwargs)` (a `from_pretrained`); `key` names the config
    key in errors, e.g. `model.path`."""
    local = Path(str(value)).expanduser()
    if local.is_dir():
        try:
            return load(local, local_files_only=True, **kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{key}={value} holds nothing {load.__self__.__name__} can read "
                f"({_reason(err)}): pass a directory written by save_pretrained"
            ) from None
    if str(value).startswith(("/", ".", "~")) or local.exists():
        raise ConfigError(
            f"{key}={value} is not a directory: pass {key}=<a local directory written by "
            "save_pretrained> or a Hugging Face Hub id"
        )
    try:
        return load(str(value), **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{key}={value} is not a local directory and the Hugging Face Hub did not provide it "
            f"({_reason(err)}): pass {key}=<a local directory written by save_pretrained>, or "
            "run where the Hub is reachable"
        ) from None


def _reason(err: BaseException) -> str:
    """The error's first sentence, on one line."""
    return " ".join(str(err).split()).split(". ")[0][:200]
