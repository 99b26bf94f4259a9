"""One study, many workers (src/distributed.py): the work of every study split across DDP ranks
(2 CPU ranks over gloo) and across shards (separate jobs, merged by the sweep's report), each
giving the tables of one process bit for bit; the split is balanced by cost and really divides
the work; the report refuses a missing shard and shards that disagree, in one line."""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest
import torch.multiprocessing as mp

from src.distributed import Part, Shard, assign, evaluate, merge_shards, parse_shard
from src.errors import ConfigError
from tests.conftest import run_cli

# every study there is, small: one run measures them all (src/studies.py registry)
OF = {
    "delete_single": ("+lesion@callbacks.delete_single=delete_single",),
    "delete_many": (
        "+lesion@callbacks.delete_many=delete_many",
        "callbacks.delete_many.ks=[0,1,2,4]",
        "callbacks.delete_many.trials=3",
    ),
    "reorder": (
        "+lesion@callbacks.reorder=reorder",
        "callbacks.reorder.swaps=[0,1,4]",
        "callbacks.reorder.trials=2",
    ),
    "duplicate": ("+lesion@callbacks.duplicate=duplicate",),
    "half_strength": ("+lesion@callbacks.half_strength=half_strength",),
    "importance": (  # 3 test batches: a shard (a rank) of 2 gets 2 or 1 of them
        "+lesion@callbacks.importance=importance",
        "callbacks.importance.resamples=50",
        "data.eval_batch_size=128",
    ),
    "prune": (
        "+lesion@callbacks.prune=prune",
        "callbacks.prune.max_k=2",
        "callbacks.prune.trials=2",
    ),
    "gradient_paths": (
        "+paths_analysis@callbacks.gradient_paths=gradient_paths",
        "callbacks.gradient_paths.samples=20",
        "callbacks.gradient_paths.batches=3",
        "callbacks.gradient_paths.chunk=16",
    ),
}
QUIET = ("delete_single", "delete_many", "reorder", "duplicate", "half_strength", "importance")
OF = {s: (*o, f"callbacks.{s}.progress=false") if s in QUIET else o for s, o in OF.items()}
STUDIES = tuple(o for overrides in OF.values() for o in overrides)


def tables(run_dir) -> dict[str, pd.DataFrame]:
    """A run's analysis tables without the run id (two runs measuring the same thing)."""
    return {
        f.stem: pd.read_parquet(f).drop(columns=["run_id"])
        for f in sorted((run_dir / "analysis").glob("*.parquet"))
    }


def assert_same_tables(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        g = got[name][list(t.columns)].reset_index(drop=True)
        pd.testing.assert_frame_equal(g, t.reset_index(drop=True), check_dtype=False, obj=name)


# --- the split --------------------------------------------------------------------------------


def test_assign_is_balanced_deterministic_and_a_partition():
    costs = [55 - i for i in range(55)]  # a delete_single sweep: block 0 restarts earliest
    parts = assign(costs, 4)
    assert sorted(i for p in parts for i in p) == list(range(55))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs)  # greedy longest-first: within one item
    assert max(loads) / min(loads) < 1.05
    assert parts == assign(costs, 4)
    # a contiguous split would leave the first worker with the expensive half
    assert max(loads) < sum(costs[:14])


@pytest.mark.parametrize("n_items,shards,ranks", [(10, 1, 2), (54, 3, 2), (7, 4, 3), (1, 1, 2)])
def test_parts_of_shards_and_ranks_cover_every_item_once(n_items, shards, ranks):
    costs = [1 + (i * 7) % 5 for i in range(n_items)]
    seen = []
    for s in range(shards):
        shard = Part(Shard(s, shards)).shard_items(costs)
        mine = [Part(Shard(s, shards), r, ranks).items(costs) for r in range(ranks)]
        assert sorted(i for m in mine for i in m) == shard  # a shard's ranks split it exactly
        seen += shard
    assert sorted(seen) == list(range(n_items))


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/3", "0/0"])
def test_bad_shard_is_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match=r"shard=i/n with 0 <= i < n") as err:
        parse_shard(bad, "delete_single")
    assert "\n" not in str(err.value)
    assert parse_shard("3/4") == Shard(3, 4) and parse_shard(None).whole


def _rank(rank: int, ranks: int, port: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    computed = []

    def compute(items):
        computed.extend(items)
        return {"baseline": rank, **{i: i * i for i in items}}

    got = evaluate(Part(Shard(), rank, ranks), [10 - i for i in range(10)], compute)
    out.put((rank, computed, got))
    dist.destroy_process_group()


def test_ranks_compute_disjoint_parts_and_all_get_everything():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("fork").Queue()
    mp.start_processes(_rank, (2, port, out), nprocs=2, start_method="fork")
    got = dict((r, (c, g)) for r, c, g in (out.get() for _ in range(2)))
    (c0, g0), (c1, g1) = got[0], got[1]
    assert c0 and c1 and not set(c0) & set(c1)  # each rank computed a part, not everything
    assert sorted(c0 + c1) == list(range(10))
    assert g0 == g1 == {"baseline": 0, **{i: i * i for i in range(10)}}  # rank 0's baseline


# --- the report's merge -------------------------------------------------------------------


def shard_tables(drop: int | None = None, model_of_1: str = "resnet20"):
    rows, runs = [], []
    for s in range(3):
        if s == drop:
            continue
        mine = Part(Shard(s, 3)).shard_items([9 - i for i in range(9)])
        runs.append({"run_dir": str(s), "overrides": {"callbacks.delete_single.shard": f"{s}/3"}})
        for i in mine:
            model = model_of_1 if s == 1 else "resnet20"
            rows.append({"run_dir": str(s), "study": "delete_single", "model": model})
            rows[-1] |= {"shard": f"{s}/3", "item": i, "block": i, "error": i / 10}
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_merge_gives_one_run_with_rows_in_order():
    runs, t = merge_shards(*shard_tables())
    assert runs.run_dir.tolist() == ["0"] and runs.overrides[0] == {}
    assert t.block.tolist() == list(range(9)) and set(t.run_dir) == {"0"}
    assert "shard" not in t and "item" not in t


def test_missing_shard_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"shard 1/3 .* is missing: run it") as err:
        merge_shards(*shard_tables(drop=1))
    assert "\n" not in str(err.value)


def test_shards_that_disagree_about_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"shards of delete_single disagree about model"):
        merge_shards(*shard_tables(model_of_1="resnet110"))


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained("resnet20") / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run_cli("train=false", f"ckpt_path={checkpoint}", *STUDIES, f"hydra.run.dir={out}")
    return out


@pytest.mark.slow
@pytest.mark.ddp
def test_every_study_gives_the_same_tables_on_two_ranks(checkpoint, one_process, tmp_path):
    """train=false under trainer=ddp (2 CPU processes, gloo): every study splits its work over
    both ranks (prune: its greedy rounds and test evaluations) and rank 0 records tables equal
    to one process's."""
    out = tmp_path / "ddp"
    run_cli(
        "train=false",
        f"ckpt_path={checkpoint}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        *STUDIES,
        f"hydra.run.dir={out}",
    )
    want = tables(one_process)
    assert {"delete_single", "gradient_paths", "importance", "prune", "path_decomposition"} <= set(
        want
    )
    assert_same_tables(tables(out), want)


SHARDED = {  # study -> the tables its shards' rows merge into
    "delete_many": ["delete_many"],
    "gradient_paths": ["gradient_paths", "path_decomposition"],
    "importance": ["importance", "angular_distance", "importance_correlation"],
}


@pytest.mark.slow
def test_shards_merged_by_the_sweep_report_equal_the_whole_study(checkpoint, one_process, tmp_path):
    """`-m callbacks.<study>.shard=0/2,1/2` on the local launcher: two jobs, each writing its
    part; the sweep's report merges them into the unsharded tables. Without one shard, or with
    a shard run with other settings, the report refuses in one line."""
    want = tables(one_process)
    for study in SHARDED:
        sweep = tmp_path / study
        run_cli(
            "-m",
            "train=false",
            f"ckpt_path={checkpoint}",
            *OF[study],
            f"callbacks.{study}.shard=0/2,1/2",
            f"hydra.sweep.dir={sweep}",
        )
        part = pd.read_parquet(sweep / "1" / "analysis" / f"{study}.parquet")
        assert set(part.shard) == {"1/2"} and 0 < len(part)
        merged = pd.read_parquet(sweep / "report" / "tables.parquet")
        assert merged.run_dir.nunique() == 1
        for name in SHARDED[study]:
            got = merged[merged.study == name].dropna(axis=1, how="all").drop(columns="run_id")
            t = want[name].dropna(axis=1, how="all")
            g = got[list(t.columns)].reset_index(drop=True)
            pd.testing.assert_frame_equal(g, t, check_dtype=False, obj=name)
    # shard 0 beside a shard 1 run with other settings: refused as a disagreement
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "delete_many" / "0").rename(other / "0")
    run_cli(
        "train=false",
        f"ckpt_path={checkpoint}",
        *OF["delete_many"],
        "callbacks.delete_many.shard=1/2",
        "data.batch_size=32",
        f"hydra.run.dir={other}/1",
    )
    res = run_cli(str(other), check=False, module="src.report")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "disagree about data.batch_size (unset vs 32)" in line or "(32 vs unset)" in line
    # and without its shard 1 at all: a missing shard
    for f in (other / "1").rglob("*.parquet"):
        f.unlink()
    res = run_cli(str(other), check=False, module="src.report")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "shard 1/2" in line and "is missing: run it" in line


def test_a_sweeps_shard_and_a_single_runs_shard_are_one_set():
    """Hydra writes a sweep job's `train=false` as `train=False`: the same value."""
    runs, t = shard_tables(drop=2)
    t2 = t[t.run_dir == "0"].assign(run_dir="2", shard="2/3", item=[100 + i for i in range(3)])
    runs = pd.concat([runs, pd.DataFrame([{"run_dir": "2", "overrides": {}}])], ignore_index=True)
    runs["overrides"] = [
        {"train": "False" if i else "false", "callbacks.delete_single.shard": f"{i}/3"}
        for i in (0, 1, 2)
    ]
    runs, merged = merge_shards(runs, pd.concat([t, t2], ignore_index=True))
    assert runs.run_dir.tolist() == ["0"] and len(merged) == len(t) + 3
