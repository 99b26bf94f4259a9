"""benchmarks/gpu_throughput.py runs end to end (on CPU, tiny) and its projection is consistent."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_run_reports_throughput_and_recipe_time(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "result.json"
    args = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--batch", "8"]
    result = bench.main([*args, "--images", "32", "--blocks-per-stage", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["device"] == "cpu" and result["bf16"] is False and result["steps"] == 3
    assert result["images_per_s"] > 0
    assert result["images_per_s"] == pytest.approx(8 * 1000 / result["ms_per_step"])
    assert result["recipe_minutes"] == pytest.approx(64_000 * 128 / result["images_per_s"] / 60)
    assert "images/s" in capsys.readouterr().out
