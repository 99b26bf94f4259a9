"""The tests' fork server (tests/forkserver.py) runs the CLI as a plain subprocess would."""

from __future__ import annotations

import re

from tests import conftest
from tests.conftest import run_cli


def test_a_forked_run_says_what_a_plain_run_says(monkeypatch):
    overrides = ("preset=quick", "data.batch_size=0")  # composes the config, then one-line error
    assert conftest.forkserver() is not None, "the run below would not be forked"
    forked = run_cli(*overrides, check=False)
    monkeypatch.setenv("CLI_FORKSERVER", "0")
    plain = run_cli(*overrides, check=False)
    assert forked.returncode == plain.returncode == 2
    same = [re.sub(r"\d", "0", r.stdout + r.stderr) for r in (forked, plain)]
    assert same[0] == same[1]
