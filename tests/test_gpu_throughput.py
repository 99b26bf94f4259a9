"""benchmarks/gpu_throughput.py runs end to end (on CPU, tiny) and its projection is consistent;
every benchmark starts from a bare checkout (no `pip install -e .`): `python benchmarks/<x>.py`."""

from __future__ import annotations

import importlib.util
import json
import site
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


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


# Run in one bare interpreter (torch is imported once): each benchmark as `python <it> --help` would
# run it, with the bare sys.path and no `src` module loaded; prints name, exit code, last error.
BARE_RUN = """
import io, contextlib, runpy, sys, traceback
bare = list(sys.path)
for script in SCRIPTS:
    sys.path[:] = [str(HERE), *bare[1:]]  # what `python <script>` puts first on sys.path
    for mod in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[mod]
    sys.argv, out, code, err = [script, "--help"], io.StringIO(), None, ""
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        code, err = 1, traceback.format_exc().strip().splitlines()[-1]
    print(script.rsplit("/", 1)[-1], code, out.getvalue().startswith("usage:"), err, sep="|")
"""


def bare_python(cwd, code: str) -> subprocess.CompletedProcess:
    """`python -c <code>` as in a fresh clone whose project is not pip-installed: `-S` skips
    site-packages' .pth files (the editable install's finder for `src`), then the site-packages
    directories themselves go back on sys.path (torch etc.); PYTHONPATH is unset, cwd is `cwd`."""
    code = f"import sys; sys.path.extend({site.getsitepackages()!r})\n{code}"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_every_benchmark_starts_from_a_bare_checkout(tmp_path):
    probe = bare_python(tmp_path, "import torch, src")  # the harness really lacks `src`
    assert probe.returncode != 0 and "No module named 'src'" in probe.stderr, probe.stderr[-2000:]
    scripts = [str(REPO / "benchmarks" / name) for name in BENCHMARKS]
    setup = f"HERE = {str(REPO / 'benchmarks')!r}; SCRIPTS = {scripts!r}"
    res = bare_python(tmp_path, f"{setup}\n{BARE_RUN}")
    assert res.returncode == 0, res.stderr[-2000:]
    ran = [line.split("|") for line in res.stdout.strip().splitlines()]
    assert [r[0] for r in ran] == BENCHMARKS
    failed = [f"{name}: exit {code} {err}" for name, code, usage, err in ran if code != "0"]
    assert not failed and all(usage == "True" for *_, usage, _ in ran), failed
