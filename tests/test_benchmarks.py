"""Every benchmark script still runs after a refactor: each at tiny sizes on the CPU, in a
subprocess as benchmarks/README.md runs it; the GPU session script parses and calls only scripts
that exist."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

BENCH = REPO / "benchmarks"
SMOKE = {  # script -> tiny arguments (CPU, one thread)
    "augment.py": ["--images", "64", "--batch", "16", "--repeats", "1"],
    "cpu_chunks.py": "--n-test 8 --depths 8 --lesions 1 --repeats 1 --threads 1".split()
    + ["--cap", str(3 * 16 * 28 * 28 * 4)],  # 3 examples of the 16x28x28 fp32 stage-1 input
    "distributed.py": "--n-test 8 --blocks-per-stage 2 --trials 1 --repeats 1".split(),
    "gpu_throughput.py": "--device cpu --steps 2 --warmup 1 --batch 4 --images 16".split()
    + ["--blocks-per-stage", "1"],
    "gradient_paths.py": "--batch 1 --samples 1 --straight 2 --device cpu".split(),
    "lesion_engine.py": "--n-test 2 --batch-size 2 --repeats 1 --device cpu --threads 1".split(),
    "preset_training.py": "--presets quick --seeds 0 model=resnet20 trainer.max_steps=2".split(),
    "precision.py": "--depths 8 --shapes 8x2 --steps 1 --warmup 1 --repeats 1 --threads 1".split(),
    "stochastic_depth.py": "--blocks 1 --batch 2 --steps 2 --repeats 1 --device cpu".split(),
    "training_step.py": "--blocks 1 --steps 3 --warmup 1 --repeats 1 --batch 4 --threads 1".split(),
}


def test_every_benchmark_script_has_a_smoke_run():
    assert sorted(SMOKE) == sorted(p.name for p in BENCH.glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_tiny_sizes(script):
    res = subprocess.run(
        [sys.executable, str(BENCH / script), *SMOKE[script]],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), res.stderr[-2000:]
    if script in CHECKS:
        CHECKS[script](res.stdout)


def cpu_chunks_output(out: str) -> None:
    """The cap arm ran the 8 images in micro-batches of 3, the other arm whole; both arms were
    timed and gave the same errors (the script asserts both, and prints them)."""
    assert "threads=1" in out and "micro-batches of 3 (3 per batch)" in out, out
    largest = dict(re.findall(r"^\s+(whole|capped)\s+wall\s.*largest batch\s+(\d+)", out, re.M))
    assert largest == {"whole": "8", "capped": "3"}, out
    assert re.search(r"ratio capped/whole: wall \d+\.\d+", out), out
    assert "errors identical in both arms" in out, out


CHECKS = {"cpu_chunks.py": cpu_chunks_output}  # script -> what its smoke run's output must show


def test_gpu_session_script_parses_and_calls_existing_scripts():
    script = BENCH / "gpu_session.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    called = re.findall(r"\b((?:benchmarks|tests)/[\w/]+\.py)\b", script.read_text())
    assert called and all((REPO / path).is_file() for path in called), called
