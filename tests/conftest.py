"""Shared test helpers: run the real CLI in a subprocess, copy the repository the way a user
clones it, and train small digits networks once per session (shared by pytest-xdist workers) so
that analysis tests can load their checkpoints (`train=false ckpt_path=...`)."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on a small CPU: one thread each
    import torch

    torch.set_num_threads(1)
# The README's quick-start command (also checked against the README in tests/test_docs.py).
QUICKSTART = "python -m src.run experiment=delete_single preset=quick"


def cli_env(env: dict | None = None) -> dict:
    """The environment of a CLI run: W&B offline and quiet, one intra-op thread per process
    (tests run side by side on a small CPU; oversubscribed threads make them crawl)."""
    base = {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return {**os.environ, **base, **(env or {})}


def same_run_aside(rows: list[dict]) -> list[dict]:
    """Rows of a results CSV without the `run_id` column: two runs measuring the same thing."""
    return [{k: v for k, v in r.items() if k != "run_id"} for r in rows]


def own_columns(row: dict) -> list[str]:
    """The columns of a results CSV row after the run's metadata columns (src.results.META)."""
    from src.results import META

    cols = list(row)
    assert cols[: len(META)] == list(META), cols
    return cols[len(META) :]


def run_cli(
    *overrides: str,
    check: bool = True,
    timeout: float = 900,
    module: str = "src.run",
    env: dict | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """`python -m src.run <overrides>` from `cwd` (the repo root); raises with stderr on failure.
    Forked from this worker's fork server (tests/forkserver.py: the libraries already imported)
    where the run's environment is the server's; DDP runs and other environments run plainly."""
    args = [module, *overrides]
    server = None if env or any(DDP.search(o) for o in overrides) else forkserver()
    if server is None:
        res = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=cli_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    else:
        res = server.run(args, Path(cwd), timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


DDP = re.compile(r"ddp|devices=")  # runs that launch ranks: plain subprocesses, as users run them
_server: ForkServer | None = None


class ForkServer:
    """This process's fork server (tests/forkserver.py), started with `cli_env()`."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self.sock = self.dir / "sock"
        self.env = cli_env()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "forkserver.py"), str(self.sock)],
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")
        self.added = json.loads(line)["added"]  # set by the server's imports, as by a run's own
        atexit.register(self.close)

    def serves(self, env: dict) -> bool:
        """Whether a run in `env` can be forked: the server's environment but for what pytest
        sets per test and what the imports set (absent or, once imported here too, the same)."""
        if self.proc.poll() is not None:
            return False
        skip = {"PYTEST_CURRENT_TEST", *self.added}
        if any(env.get(k, v) != v for k, v in self.added.items()):
            return False
        return {k: v for k, v in env.items() if k not in skip} == {
            k: v for k, v in self.env.items() if k not in skip
        }

    def run(self, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        out, err = self.dir / "stdout", self.dir / "stderr"
        req = {"module": args[0], "args": args[1:], "cwd": str(cwd), "env": cli_env()}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.sock))
            s.sendall((json.dumps({**req, "stdout": str(out), "stderr": str(err)}) + "\n").encode())
            s.settimeout(timeout)
            lines = s.makefile()
            pid = json.loads(lines.readline())["pid"]
            try:
                status = json.loads(lines.readline())["status"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([sys.executable, "-m", *args], timeout) from None
        return subprocess.CompletedProcess(
            [sys.executable, "-m", *args], status, out.read_text(), err.read_text()
        )

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def forkserver() -> ForkServer | None:
    """This process's fork server, started at first use; None where os.environ has changed
    since (the server's imports read the environment it started with), where it has died, or
    with CLI_FORKSERVER=0."""
    global _server
    if os.environ.get("CLI_FORKSERVER") == "0":  # every run a plain subprocess
        return None
    if _server is None:
        _server = ForkServer()
    return _server if _server.serves(cli_env()) else None


def fresh_copy(dest: Path) -> Path:
    """The repository as a fresh clone has it: tracked files (and new, not ignored ones), no
    outputs/, data/ or .venv/. Commands run with it as working directory import its `src`."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def shared_tmp(tmp_path_factory) -> Path:
    """A temp dir shared by all pytest-xdist workers of this session (their common parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """Run `make(dir)` once per session across xdist workers; later callers get the same dir."""
    root = shared_tmp(tmp_path_factory) / "once"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            done.touch()
    return out


def newest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    assert found, f"nothing matches {root}/{pattern}"
    return found[-1]


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Path:
    """The README's quick-start command, as written, in a fresh copy of the repository: returns
    the copy (its results are in outputs/delete_single/multirun_*/). Under .ci/run, which has just
    run it verbatim (install included) in its clean clone, that run's results are used."""

    def make(copy: Path) -> None:
        fresh_copy(copy)
        done = os.environ.get("QUICKSTART_OUTPUTS")  # .ci/run ran it verbatim in its clone
        if done and list(Path(done).glob("delete_single/multirun_*/1/metrics.json")):
            shutil.copytree(Path(done) / "delete_single", copy / "outputs" / "delete_single")
        else:
            run_cli(*QUICKSTART.split()[3:], cwd=copy)

    return once(tmp_path_factory, "quickstart", make)


def quickstart_jobs(copy: Path) -> dict[str, Path]:
    """model name -> job dir of the quick-start sweep."""
    sweep = newest("outputs/delete_single/multirun_*", copy)
    jobs = [p for p in sweep.iterdir() if (p / "metrics.json").exists()]
    return {json.loads((p / "metrics.json").read_text())["model"]: p for p in jobs}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, quickstart):
    """trained("resnet110") -> run dir of `model=resnet110 preset=quick`, trained once per session.

    ResNet-110 and VGG-15 come from the README's quick-start sweep (the same trainings); other
    models, or extra overrides, train once per distinct call."""

    def get(model: str, *overrides: str) -> Path:
        if not overrides and model in ("resnet110", "vgg15"):
            return quickstart_jobs(quickstart)[model]
        name = "trained_" + "_".join([model, *overrides]).replace("/", "-").replace("=", "-")

        def make(out: Path) -> None:
            run_cli(
                f"model={model}", "preset=quick", "logger=csv", f"hydra.run.dir={out}", *overrides
            )

        return once(tmp_path_factory, name, make)

    return get
