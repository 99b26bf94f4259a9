"""Analytic statistics of the unraveled view (paper Sec. 3, 5, 6; Figs 6a and 7).

A network of n residual blocks has 2^n paths, one per binary code b in {0,1}^n; a path's length
is the number of residual branches it enters, so C(n, x) paths have length x (Binomial(n, 1/2)).
Deleting d blocks keeps the C(n-d, x) paths that avoid them: Eq. 8's fraction C(n-d, x)/C(n, x).
Training k of n blocks per mini-batch (Sec. 5) exposes paths of length Binomial(k, 1/2).

Counts are exact Python integers (2^54 does not fit a float mantissa); fractions are exact
`Fraction`s until they are written. `path_lengths` and `remaining_paths` are the `task:` targets
of `experiment=path_lengths` / `experiment=remaining_paths` (no trained network needed).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from fractions import Fraction
from math import comb
from pathlib import Path

import pandas as pd

from src import figures, results
from src.errors import ConfigError


def check_blocks(n: int) -> int:
    if int(n) != n or n < 1:
        raise ConfigError(f"n_blocks={n}: a network needs at least 1 block (pass n_blocks=54)")
    return int(n)


def check_share(share: float) -> float:
    if not 0 < share <= 1:
        raise ConfigError(f"share={share} must lie in (0, 1], e.g. share=0.9")
    return float(share)


def length_counts(n: int) -> list[int]:
    """Exact number of paths of each length 0..n: C(n, x). They sum to 2^n."""
    n = check_blocks(n)
    return [comb(n, x) for x in range(n + 1)]


def length_fractions(n: int) -> list[Fraction]:
    """Binomial(n, 1/2) probabilities of path length 0..n, exact."""
    return [Fraction(c, 2**n) for c in length_counts(n)]


def fraction_remaining(n: int, deleted: int, length: int) -> Fraction:
    """Eq. 8: share of the length-`length` paths still valid after deleting `deleted` blocks."""
    n = check_blocks(n)
    if not 0 <= deleted <= n:
        raise ConfigError(f"deleted={deleted} is outside 0..{n} for a network of {n} blocks")
    if not 0 <= length <= n:
        raise ConfigError(f"path length {length} is outside 0..{n}")
    return Fraction(comb(n - deleted, length), comb(n, length))


def training_length_counts(n: int, k: int) -> list[int]:
    """Paths one mini-batch trains when k of n blocks run (Sec. 5): C(k, x) of length x, 0..n."""
    n = check_blocks(n)
    if not 1 <= k <= n:
        raise ConfigError(f"k={k} is outside 1..{n}: pass a number of trained blocks in 1..{n}")
    return [comb(k, x) if x <= k else 0 for x in range(n + 1)]


def shortest_window(weights: Sequence[float | int | Fraction], share: float) -> tuple[int, int]:
    """Shortest index range [lo, hi] whose weights sum to at least `share` of the total.

    Ties go to the range with the larger sum, then the lower start. Exact for int/Fraction input.
    """
    share = check_share(share)
    total = sum(weights)
    if total <= 0:
        raise ValueError("shortest_window needs positive total weight")
    need = Fraction(share) * total if not isinstance(total, float) else share * total
    best = None  # (width, -sum, lo, hi)
    lo, acc = 0, 0
    for hi, w in enumerate(weights):
        acc += w
        while lo < hi and acc - weights[lo] >= need:
            acc -= weights[lo]
            lo += 1
        if acc >= need:
            cand = (hi - lo, -acc, lo, hi)
            best = cand if best is None or cand < best else best
    return best[2], best[3]


def share_between(n: int, lo: int, hi: int) -> Fraction:
    """Exact share of all 2^n paths with length in lo..hi."""
    counts = length_counts(n)
    return Fraction(sum(counts[lo : hi + 1]), 2**n)


# --- tasks (experiment=path_lengths / experiment=remaining_paths) -------------------------------


def path_lengths(output_dir: str, n_blocks: int = 54, share: float = 0.95, k: int | None = 23):
    """Fig 6a: `analysis/path_lengths.csv` (length,count,fraction), the plot and summary.json."""
    n, share = check_blocks(n_blocks), check_share(share)
    counts = length_counts(n)
    rows = [
        {"length": x, "count": c, "fraction": float(Fraction(c, 2**n))}
        for x, c in enumerate(counts)
    ]
    lo, hi = shortest_window(counts, share)
    summary = {
        "n_blocks": n,
        "total_paths": str(2**n),
        "counts_sum_to_2^n": sum(counts) == 2**n,
        "mean_length": n / 2,
        "central_window_share": share,
        "central_window": [lo, hi],
        "central_window_actual_share": float(share_between(n, lo, hi)),
    }
    if k is not None:
        training_length_counts(n, k)  # checks k
        summary["trained_k"] = int(k)
        summary["trained_mean_length"] = k / 2
    # counts reach 2^54: exact as text in the table, and a float beside it
    table = pd.DataFrame(rows).astype({"count": "string"})
    table.insert(2, "count_float", [float(c) for c in counts])
    fig = figures.path_lengths(table, (lo, hi), share, k)
    meta = {"n_blocks": n, "k": k}
    results.record(
        Path(output_dir) / "analysis",
        "path_lengths",
        results.tidy("path_lengths", table, meta),
        summary,
        fig,
    )
    return summary


def remaining_paths(output_dir: str, n_blocks: int = 54, deleted: Sequence[int] = (1, 10, 20)):
    """Fig 7 / Eq. 8: `analysis/remaining_paths.csv` (deleted,length,fraction_remaining) + plot."""
    n = check_blocks(n_blocks)
    ds = [int(d) for d in deleted]
    if not ds:
        raise ConfigError("deleted=[] is empty: pass e.g. deleted=[1,10,20]")
    rows = [
        {"deleted": d, "length": x, "fraction_remaining": float(fraction_remaining(n, d, x))}
        for d in ds
        for x in range(n + 1)
    ]
    summary = {
        "n_blocks": n,
        "deleted": ds,
        "all_paths_remaining": {str(d): float(Fraction(2 ** (n - d), 2**n)) for d in ds},
    }
    table = pd.DataFrame(rows)
    results.record(
        Path(output_dir) / "analysis",
        "remaining_paths",
        results.tidy("remaining_paths", table, {"n_blocks": n}),
        summary,
        figures.remaining_paths(table),
    )
    return rows


def _one_line_errors(fn):
    """The `task:` form of `fn`: a ConfigError becomes `error: ...` on stderr and exit status 2
    (Hydra's `instantiate` would otherwise wrap it into a multi-line traceback)."""

    @functools.wraps(fn)
    def task(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return task


path_lengths_task = _one_line_errors(path_lengths)
remaining_paths_task = _one_line_errors(remaining_paths)
