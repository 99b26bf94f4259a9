"""Loggers the configs build (conf/logger/)."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _WandbLogger


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger without its `anonymous=None` init argument, which current W&B
    versions answer with a deprecation warning on every run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
