"""Which k blocks to delete: the deletion sets of each pruning strategy (no I/O).

A *unit* is what a strategy deletes at once: one block (a sub-layer of a transformer), or a whole
layer (every block sharing a `layer` index). Strategies, each giving one set of units per k:

- `random`: `trials` sets of k units drawn from a seed (the paper's Fig. 5a);
- a score of src/engines/importance.py (`block_influence`, `relative_contribution`,
  `angular_distance`): the k units with the lowest score (a unit's score: the mean of its blocks');
- `angular_run`: the run of consecutive units, k long, across which the stream's angular distance
  is smallest (Gromov et al.);
- `greedy`: delete the unit whose deletion hurts least, re-measure, repeat (SLEB), measured on
  calibration batches apart from the test data, with the lesion engine's prefix reuse: each round
  evaluates every remaining unit on top of the set so far, one pass over the calibration batches.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from src.engines.importance import SCORES, Scores, column_means
from src.engines.lesion import lesion_errors, lesion_plan
from src.models.network import Network, Plan

SEARCHES = ("random", *SCORES, "angular_run", "greedy")


def units_of(net: Network, unit: str) -> list[tuple[int, ...]]:
    """The deletable units of `net`: one block each (`unit="block"`), or the blocks of each layer
    (`unit="layer"`; blocks without a layer index are units of their own)."""
    if unit == "block":
        return [(i,) for i in range(net.n_blocks)]
    layers: dict = {}
    for row in net.block_info():
        layers.setdefault(row.get("layer", ("block", row["block"])), []).append(row["block"])
    return [tuple(b) for b in layers.values()]


def blocks_of(units: Sequence[tuple[int, ...]], chosen: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(b for u in chosen for b in units[u]))


def by_score(scored: Scores, units: Sequence[tuple[int, ...]], score: str, k: int) -> list[int]:
    """The k units with the lowest mean `score` (units without a score last, by index)."""
    means = dict(zip(scored.blocks, column_means(scored.scores[score])))
    value = [np.nanmean([means.get(b, np.nan) for b in u] or [np.nan]) for u in units]
    order = sorted(range(len(units)), key=lambda u: (np.isnan(value[u]), value[u], u))
    return sorted(order[:k])


def best_run(scored: Scores, units: Sequence[tuple[int, ...]], k: int) -> list[int] | None:
    """The k consecutive units across whose blocks the stream's angular distance is smallest
    (runs that cover whole units only; None: no such run, e.g. across a downsampling block)."""
    where = {b: u for u, blocks in enumerate(units) for b in blocks}
    best, best_d = None, np.inf
    for (first, last, _m), d in scored.runs.items():
        u0, u1 = where[first], where[last]
        if u1 - u0 + 1 != k or units[u0][0] != first or units[u1][-1] != last:
            continue
        if d < best_d:
            best, best_d = list(range(u0, u1 + 1)), d
    return best


@dataclass
class Greedy:
    """SLEB's search: `order[j]` is the unit deleted in round j; `values[j]` the calibration
    metric after it; `plans` evaluated in all, `seconds` spent, and `block_runs` (blocks
    recomputed with prefix reuse) beside `naive_block_runs` (a fresh forward per plan)."""

    order: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    plans: int = 0
    seconds: float = 0.0
    block_runs: int = 0
    naive_block_runs: int = 0


def greedy(
    net: Network,
    units: Sequence[tuple[int, ...]],
    batches: Sequence[tuple[Tensor, Tensor]],
    base: Plan,
    k_max: int,
    metric: str = "error",
    reuse: bool = True,
    device=None,
    progress: bool = False,
    spread: Callable | None = None,
) -> Greedy:
    """Delete `k_max` units one at a time, each round the one whose deletion (on top of those
    before) gives the lowest `metric` on `batches` (ties: the lower index). `spread(plans, now,
    measure)`: how a round's plans get measured (e.g. split across DDP ranks), where
    `measure(some plans)` gives their values on top of `now` (None: all here, in order)."""
    out, chosen = Greedy(), []
    start = time.perf_counter()
    for r in range(k_max):
        left = [u for u in range(len(units)) if u not in chosen]
        # the round's own base, the deletions so far: each candidate restarts at its own unit
        now = lesion_plan(base, blocks_of(units, chosen))
        plans = [lesion_plan(now, units[u]) for u in left]

        def measure(some: Sequence[Plan], now=now, r=r) -> list[float]:
            return lesion_errors(
                net,
                some,
                batches,
                base=now,
                reuse=reuse,
                device=device,
                metric=metric,
                progress=progress,
                description=f"greedy search, round {r + 1}/{k_max}",
            )[1]

        values = measure(plans) if spread is None else spread(plans, now, measure)
        j = int(np.argmin(values))  # the first of equal values: the lowest index
        chosen.append(left[j])
        out.order.append(left[j])
        out.values.append(float(values[j]))
        out.plans += len(plans)
        n = len(base.sequence(net.n_blocks))
        for plan in plans:
            first = net.restart(now, plan)
            out.block_runs += n - (first if first is not None and reuse else 0)
        out.naive_block_runs += n * len(plans)
    out.seconds = time.perf_counter() - start
    return out


def random_sets(n_units: int, ks: Sequence[int], trials: int, seed: int) -> list[tuple]:
    """(k, trial, sorted units) for every k and trial, reproducible from `seed`."""
    rng = random.Random(seed)
    return [(k, t, sorted(rng.sample(range(n_units), k))) for k in ks for t in range(trials)]
