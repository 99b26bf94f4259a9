"""Shared test helpers: run the real CLI in a subprocess, and train small digits networks once
per session so that analysis tests can load their checkpoints (`train=false ckpt_path=...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *overrides: str,
    check: bool = True,
    timeout: float = 900,
    module: str = "src.run",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`python -m src.run <overrides>` from the repo root; raises with stderr on failure."""
    full_env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", **(env or {})}
    res = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """trained("resnet110") -> run dir of `model=resnet110 preset=quick`, trained once per session.

    Extra overrides may be passed; each distinct call trains once."""
    cache: dict[tuple, Path] = {}

    def get(model: str, *overrides: str) -> Path:
        key = (model, *overrides)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"trained_{model}")
            run_cli(
                f"model={model}", "preset=quick", "logger=csv", f"hydra.run.dir={out}", *overrides
            )
            cache[key] = out
        return cache[key]

    return get
