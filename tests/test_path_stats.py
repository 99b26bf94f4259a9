"""Analytic path statistics (paper Sec. 3, 5, 6; Figs 6a, 7): exact counts, Eq. 8, windows."""

from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction
from math import comb

import pytest
from scipy import stats

from src.analysis.path_stats import (
    fraction_remaining,
    length_counts,
    length_fractions,
    path_lengths,
    remaining_paths,
    share_between,
    shortest_window,
    training_length_counts,
)
from src.errors import ConfigError
from src.results import read_csv
from tests.conftest import own_columns, run_cli
from tests.plots import colour_pixels


@pytest.mark.parametrize("n", [1, 2, 3, 10, 54, 66, 110])
def test_counts_sum_to_two_to_the_n(n):
    counts = length_counts(n)
    assert len(counts) == n + 1 and sum(counts) == 2**n
    assert sum(length_fractions(n)) == 1


def test_counts_match_enumeration_of_binary_codes():
    n = 10
    seen = [0] * (n + 1)
    for code in itertools.product((0, 1), repeat=n):
        seen[sum(code)] += 1
    assert seen == length_counts(n)


def test_eq8_matches_enumeration():
    n, deleted = 9, {1, 4, 7}
    for x in range(n + 1):
        paths = [set(c) for c in itertools.combinations(range(n), x)]
        valid = sum(1 for p in paths if not p & deleted)
        assert fraction_remaining(n, len(deleted), x) == Fraction(valid, len(paths))


def test_training_k_of_n_lengths():
    counts = training_length_counts(54, 23)
    assert sum(counts) == 2**23 and counts[24:] == [0] * 31
    assert sum(x * c for x, c in enumerate(counts)) / 2**23 == 11.5


def test_shortest_window_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        w = [rng.randint(0, 20) for _ in range(rng.randint(1, 15))]
        if sum(w) == 0:
            continue
        share = rng.choice([0.1, 0.5, 0.9, 1.0])
        lo, hi = shortest_window(w, share)
        need = Fraction(share) * sum(w)
        feasible = [
            (b - a) for a in range(len(w)) for b in range(a, len(w)) if sum(w[a : b + 1]) >= need
        ]
        assert sum(w[lo : hi + 1]) >= need and hi - lo == min(feasible)


def test_paper_prose_numbers_recomputed():
    n = 54
    binom = stats.binom(n, 0.5)
    # "effective paths (5..17 modules) constitute only 0.45% of all paths"
    assert float(share_between(n, 5, 17)) == pytest.approx(binom.cdf(17) - binom.cdf(4), rel=1e-12)
    # "more than 95% of paths go through 19 to 35 modules"
    assert float(share_between(n, 19, 35)) > 0.95
    assert shortest_window(length_counts(n), 0.95) == (20, 34)


@pytest.mark.parametrize("bad", [dict(n_blocks=0), dict(share=0.0), dict(share=1.5), dict(k=55)])
def test_bad_input_raises(tmp_path, bad):
    with pytest.raises(ConfigError):
        path_lengths(str(tmp_path), **bad)


def check_path_lengths(out, n: int, k: int, share: float) -> None:
    """path_lengths.{csv,png} and its summary: n blocks, k trained per mini-batch, window share."""
    rows = read_csv(out / "path_lengths.csv")
    assert own_columns(rows[0]) == ["length", "count", "count_float", "fraction"]
    assert [int(r["count"]) for r in rows] == [comb(n, x) for x in range(n + 1)]
    assert [float(r["fraction"]) for r in rows] == pytest.approx(
        [comb(n, x) / 2**n for x in range(n + 1)]
    )
    summary = json.loads((out / "summary.json").read_text())["path_lengths"]
    assert summary["total_paths"] == str(2**n) and summary["trained_k"] == k
    lo, hi = shortest_window(length_counts(n), share)
    assert summary["central_window"] == [lo, hi]
    assert summary["central_window_actual_share"] == pytest.approx(float(share_between(n, lo, hi)))
    colours = {"all": "tab:blue", "trained": "tab:orange"}
    px = colour_pixels(out / "path_lengths.png", (5, 3.2), colours)
    assert px["all"] > 1000 and px["trained"] > 300  # the bars of every length, the k-curve


def test_tasks_write_csvs(tmp_path):
    path_lengths(str(tmp_path), n_blocks=12, share=0.9, k=5)
    check_path_lengths(tmp_path / "analysis", 12, 5, 0.9)
    remaining_paths(str(tmp_path), n_blocks=12, deleted=[0, 3])
    rows = read_csv(tmp_path / "analysis" / "remaining_paths.csv")
    assert len(rows) == 26 and own_columns(rows[0]) == ["deleted", "length", "fraction_remaining"]
    by = {(int(r["deleted"]), int(r["length"])): float(r["fraction_remaining"]) for r in rows}
    assert by[(0, 7)] == 1.0 and by[(3, 10)] == 0.0 and by[(3, 2)] == comb(9, 2) / comb(12, 2)
    colours = {"delete 0": "C0", "delete 3": "C1", "a third curve": "C2"}
    px = colour_pixels(tmp_path / "analysis" / "remaining_paths.png", (5, 3.2), colours)
    assert px["delete 0"] > 300 and px["delete 3"] > 300 and px["a third curve"] == 0
    with pytest.raises(ConfigError):
        remaining_paths(str(tmp_path), n_blocks=12, deleted=[13])


@pytest.mark.slow
def test_cli_task_and_one_line_error(tmp_path):
    run_cli(
        "experiment=path_lengths", "task.n_blocks=20", "task.k=5", f"hydra.run.dir={tmp_path / 'a'}"
    )
    check_path_lengths(tmp_path / "a" / "analysis", 20, 5, 0.95)  # the experiment's share
    res = run_cli(
        "experiment=remaining_paths", "task.deleted=[60]", f"hydra.run.dir={tmp_path}", check=False
    )
    assert res.returncode != 0
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1
