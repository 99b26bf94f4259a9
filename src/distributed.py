"""One study, many workers: the work items of an analysis split across DDP ranks and across
shards (separate jobs), balanced by their cost known in advance, and gathered back in order.

A study lists its independent work items (a lesion study: its plans; gradient paths: chunks of
sampled paths per batch; importance: test batches), each with a cost (a deletion of block 0
recomputes more than one of block 53: the lesion engine restarts at the first changed position),
and evaluates only the items of its `Part`. Items go to shards first (`shard=i/n`, the config key
every analysis takes, one job each), then to the DDP ranks of a job, by greedy longest-first
assignment (`assign`): each item to the least loaded worker. What a worker computes for an item
does not depend on which other items it computes (the engines guarantee it per item), so the
gathered results are bit for bit those of one process, for any number of ranks and shards.

Ranks meet in `gather` (torch.distributed's `all_gather_object`; a no-op in one process). Shards
never meet: each job writes its rows with a `shard` and an `item` column, and the sweep's report
merges them (`merge_shards`), refusing a missing shard or shards that disagree.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Sequence

import pandas as pd

from src.errors import ConfigError

# what a shard's table carries beyond the unsharded one: the shard, and the item's position
SHARD_COLUMNS = ("shard", "item")
# the facts every shard of one study must share (src/results.py META columns), else refused
AGREE = (
    "model",
    "data",
    "training",
    "seed",
    "n_blocks",
    "blocks_per_step",
    "metric",
    "bn",
    "baseline",
    "step",
)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based), as written `index/count`."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def whole(self) -> bool:
        return self.count == 1


def parse_shard(value, name: str = "analysis") -> Shard:
    """`i/n` (0 <= i < n) or None (the whole study) as a Shard; a ConfigError names the form."""
    if value is None:
        return Shard()
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if m is None or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(
            f"{name}.shard={value!r}: write shard=i/n with 0 <= i < n (e.g. shard=0/4 ... 3/4, "
            "one job each), or leave it null for the whole study"
        )
    return Shard(int(m.group(1)), int(m.group(2)))


def assign(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Item indices per worker: longest first, each to the least loaded worker (ties: the lower
    index), each worker's items in ascending order. Deterministic in `costs` and `workers`."""
    load = [(0.0, w) for w in range(workers)]
    out: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        total, w = heapq.heappop(load)
        out[w].append(i)
        heapq.heappush(load, (total + float(costs[i]), w))
    return [sorted(items) for items in out]


def world() -> tuple[int, int]:
    """(rank, world size) of the running torch.distributed group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclasses.dataclass(frozen=True)
class Part:
    """The share of a study's work that this process computes: its shard's items (of all
    `shard.count` shards), split again across the job's `ranks`."""

    shard: Shard = Shard()
    rank: int = 0
    ranks: int = 1

    @classmethod
    def here(cls, shard: Shard = Shard()) -> Part:
        rank, size = world()
        return cls(shard, rank, size)

    @property
    def split(self) -> bool:
        return self.ranks > 1 or not self.shard.whole

    def shard_items(self, costs: Sequence[float]) -> list[int]:
        """The items of this job's shard (all of them unsharded)."""
        return assign(costs, self.shard.count)[self.shard.index]

    def items(self, costs: Sequence[float]) -> list[int]:
        """The items this rank computes: its share of its shard's items."""
        mine = self.shard_items(costs)
        return [mine[j] for j in assign([costs[i] for i in mine], self.ranks)[self.rank]]

    def owns(self, item: int) -> bool:
        """Whether this rank computes `item` of a stream of equal-cost items whose number is
        not known in advance (test batches): round robin over the shards, then over the ranks."""
        count, index = self.shard.count, self.shard.index
        return item % count == index and (item // count) % self.ranks == self.rank


def gather(results: dict, ranks: int = 1) -> dict:
    """Every rank's {item: result} merged on every rank (one process: `results` as it is)."""
    if ranks == 1:
        return results
    import torch.distributed as dist

    parts: list = [None] * ranks
    dist.all_gather_object(parts, results)
    merged: dict = {}
    for part in parts:  # an item more than one rank computed (a shared baseline): rank 0's
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


def evaluate(part: Part, costs: Sequence[float], compute) -> dict:
    """What `compute(items)` ({key: result}, for the given item indices, in any order) returns
    for this shard's items, computed across the ranks: each rank calls it on its own items
    (also on none: a rank may have results every rank computes, such as a baseline, kept from
    rank 0) and every rank gets the union."""
    return gather(compute(part.items(costs)), part.ranks)


# --- the report's side: shards of one study merged into one table ------------------------


def _value(v: str) -> str:
    """An override's value as YAML reads it (False and false alike), written back."""
    import json

    import yaml

    try:
        value = yaml.safe_load(v)
    except yaml.YAMLError:
        return v
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _describe(key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in key) or "no overrides"


def merge_shards(runs: pd.DataFrame, tables: pd.DataFrame, merges=()) -> tuple:
    """(runs, tables) with every complete set of shards merged into one run, as the unsharded
    run would have written it: each table's rows in item order, no shard columns, the run_dir
    of shard 0 (the other shards' runs leave `runs`). The shards of one run are the runs whose
    overrides agree except for `*.shard` keys. Refuses (ConfigError, one line) a missing shard,
    a shard written twice, and shards that disagree on a fact in AGREE.
    `merges`: functions {study: rows} -> {study: rows} run on each set's tables first, for the
    tables that are not a union of item rows (src/studies.py `Study.merge`)."""
    if tables.empty or "shard" not in tables or tables.shard.isna().all():
        return runs, tables
    over = dict(zip(runs.run_dir, runs.overrides)) if "overrides" in runs else {}

    def key(run_dir: str) -> tuple:  # values as YAML reads them: a sweep writes train=False
        o = over.get(run_dir, {})
        return tuple(sorted((k, _value(v)) for k, v in o.items() if not k.endswith(".shard")))

    sharded = tables.shard.notna().to_numpy(dtype=bool)
    shard_of = dict(zip(tables.run_dir[sharded], tables.shard[sharded]))
    sets: dict[tuple, dict[int, str]] = {}
    for run_dir, shard in shard_of.items():
        index, count = (int(x) for x in str(shard).split("/"))
        at = sets.setdefault((count, key(run_dir)), {})
        if index in at:
            raise ConfigError(
                f"shard {index}/{count} was written twice ({at[index]} and {run_dir}): keep one"
            )
        at[index] = run_dir
    for (count, k), shards in sets.items():
        missing = sorted(set(range(count)) - set(shards))
        if not missing:
            continue
        others = [
            g
            for g, s in sets.items()
            if g[0] == count and g != (count, k) and set(s) & set(missing)
        ]
        if others:
            a, b = dict(k), dict(others[0][1])
            keys = sorted(x for x in a.keys() | b.keys() if a.get(x) != b.get(x))
            differ = ", ".join(f"{x} ({a.get(x, 'unset')} vs {b.get(x, 'unset')})" for x in keys)
            raise ConfigError(
                f"the shards of one study disagree about {differ}: rerun them with the same "
                "overrides but their shard (the same model, data and checkpoint)"
            )
        raise ConfigError(
            f"shard {missing[0]}/{count} ({_describe(k)}) is missing: run it (the same command "
            f"with shard={missing[0]}/{count}) before the report"
        )
    merged, dropped = [], set()
    in_sets = {d for shards in sets.values() for d in shards.values()}
    merged.append(tables[~tables.run_dir.isin(in_sets)])
    for (count, _), shards in sets.items():
        first = shards[0]
        dirs = [shards[i] for i in range(count)]
        dropped |= set(dirs) - {first}
        mine = tables[tables.run_dir.isin(dirs)]
        by_study = {}
        for study, t in mine.groupby("study", sort=False):
            t = t.dropna(axis=1, how="all")
            for fact in AGREE:
                if fact in t and t[fact].astype(str).nunique() > 1:
                    seen = t.groupby("run_dir")[fact].first().astype(str)
                    raise ConfigError(
                        f"the shards of {study} disagree about {fact}: "
                        + ", ".join(f"{v} ({d})" for d, v in seen.items())
                        + ": rerun them on the same model and data"
                    )
            if "item" in t:
                items = t.item.astype(int)
                if items.duplicated().any():
                    twice = items[items.duplicated()].iloc[0]
                    raise ConfigError(f"the shards of {study} overlap (row {twice} in two of them)")
                t = t.iloc[items.argsort(kind="stable").to_numpy()]
            by_study[study] = t.reset_index(drop=True).assign(run_dir=first)
        for merge in merges:
            by_study = merge(by_study)
        merged += [t.drop(columns=[c for c in SHARD_COLUMNS if c in t]) for t in by_study.values()]
    tables = pd.concat(merged, ignore_index=True)
    tables = tables.drop(columns=[c for c in SHARD_COLUMNS if c in tables])
    if "run_dir" in runs:
        runs = runs[~runs.run_dir.isin(dropped)].reset_index(drop=True)
        if "overrides" in runs:
            runs["overrides"] = [
                {k: v for k, v in o.items() if not k.endswith(".shard")} for o in runs.overrides
            ]
    return runs, tables
