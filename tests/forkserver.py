"""A fork server for the tests' CLI runs: one process per pytest worker imports the heavy
third-party libraries once (torch, Lightning, torchvision, timm, transformers, ...: ~8 s of a
CLI run here), then forks a child per request that runs `python -m <module> <args>` exactly as a
fresh interpreter would from the request's working directory (its own `src`, which the server
never imports), with the request's environment, stdout and stderr in the given files, stdin
empty. The exit status is the child's. Used by tests/conftest.py's `run_cli` where the run's
environment is the server's own (what was imported read it); anything else runs in a plain
subprocess.

Started, it prints {"added": the environment variables its imports set}. Protocol over a Unix
socket, one JSON line each way: the request {"module", "args", "cwd", "env", "stdout", "stderr"};
the server answers {"pid"} once forked, then {"status"} (the exit code, or -signal) when the
child ends.

    python tests/forkserver.py <socket path>
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import socket
import sys
import weakref

PRELOAD = (
    "numpy",
    "pandas",
    "pyarrow.parquet",
    "scipy.stats",
    "sklearn.datasets",
    "matplotlib",
    "omegaconf",
    "hydra",
    "torch",
    "torchvision",
    "torchmetrics",
    "lightning.pytorch",
    "timm",
    "transformers",
)


def child(req: dict) -> int:
    """Become `python -m <module> <args>` run from req["cwd"]; returns its exit code."""
    import random
    import runpy
    import traceback

    import numpy as np

    # The server's own finalizers (W&B's media temp dir, made at import) are not the child's to
    # run at its exit: the first child would delete what every later one writes into.
    for f in list(weakref.finalize._registry):
        f.atexit = False
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, name in ((0, os.devnull), (1, req["stdout"]), (2, req["stderr"])):
        f = os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.path[0] = req["cwd"]  # what `python -m` puts first: the working directory
    sys.argv = ["-m", *req["args"]]
    random.seed()  # a fresh interpreter's generators are seeded from the OS, not shared
    np.random.seed()
    try:
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    return code


def serve(path: str) -> None:
    # A CLI run imports these after Hydra has configured logging: libraries that add their own
    # handler when the root logger has none (Lightning) must find one here too.
    root = logging.getLogger()
    stand_in = logging.NullHandler()
    root.addHandler(stand_in)
    before = dict(os.environ)
    # W&B makes per-process state at import (a media temp dir that its exit handler deletes):
    # it stays out of the server (timm's optional import of it sees it missing) and each run
    # imports its own.
    sys.modules["wandb"] = None
    for name in PRELOAD:
        __import__(name)
    del sys.modules["wandb"]
    root.removeHandler(stand_in)
    # what the imports set (scikit-learn's KMP_* defaults): a fresh run's imports set them too
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    assert not any(m == "src" or m.startswith(("src.", "wandb")) for m in sys.modules), "preloaded"
    gc.freeze()  # the imported objects stay out of the children's collections: no page copies
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    print(json.dumps({"added": added}), flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            req = json.loads(conn.makefile().readline())
            pid = os.fork()
            if pid == 0:  # the child: runs the exit handlers as python does, then leaves
                srv.close()  # without tearing down every module the server imported (seconds)
                conn.close()
                code = child({**req, "env": {**added, **req["env"]}})
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall((json.dumps({"status": code}) + "\n").encode())
            except OSError:  # the client gave up (a timeout) and closed its end
                pass


if __name__ == "__main__":
    serve(sys.argv[1])
