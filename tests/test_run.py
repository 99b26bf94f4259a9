"""End to end through the real CLI (`python -m src.run`) in subprocesses."""

import json

import pytest

from tests.conftest import run_cli

TINY = ("preset=quick", "model=resnet20", "trainer.max_steps=30")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_quick_resnet110_reaches_3_percent_on_digits(trained):
    run = trained("resnet110")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 400
    assert metrics["test_error"] <= 0.03, metrics


@pytest.mark.slow
def test_quick_run_writes_metrics_checkpoints_and_wandb_files(tmp_path):
    run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["test_error"] <= 1 and metrics["global_step"] == 30
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "W&B offline run files missing"
    # train=false analyses the checkpoint without fitting, to the same test error
    again = tmp_path / "again"
    run_cli(
        *TINY,
        "train=false",
        f"ckpt_path={tmp_path}/checkpoints/last.ckpt",
        f"hydra.run.dir={again}",
        "logger=csv",
    )
    m2 = json.loads((again / "metrics.json").read_text())
    assert m2["test_error"] == pytest.approx(metrics["test_error"], abs=1e-6)


@pytest.mark.slow
def test_bad_input_gets_one_line_error_and_nonzero_exit(tmp_path):
    cases = {
        ("model=resnet111",): "choose one of",
        ("preset=quick", "training=block_subset", "training.k=0"): "training.k=0",
        ("preset=quick", "train=false"): "ckpt_path=",
        ("preset=quick", "train=false", "ckpt_path=nope.ckpt"): "no such file",
        ("preset=quick", "data.batch_size=0"): "batch_size",
    }
    for overrides, hint in cases.items():
        res = run_cli(*overrides, f"hydra.run.dir={tmp_path}/x", "logger=csv", check=False)
        assert res.returncode != 0, overrides
        line = last_line(res.stderr)
        assert line.startswith("error:") and hint in line, (overrides, res.stderr[-500:])
