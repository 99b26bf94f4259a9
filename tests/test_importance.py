"""Importance scores and pruning search: scores equal a hand computation (sequential, projection
and parallel blocks), the pass checks itself, the deletions equal the lesion engine, the rank
correlation and its bootstrap behave on known cases, and each pruning strategy picks what it
should."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from src.analysis.importance import Importance
from src.analysis.prune import Prune
from src.engines import prune as search
from src.engines.importance import block_scores, scored_pass, spearman, spearman_ci
from src.engines.lesion import lesion_errors, lesion_plan
from src.errors import ConfigError
from src.models import FULL, Plan, preact_resnet_cifar
from src.models.adapt import adapt
from tests.conftest import own_columns
from tests.test_hf_parallel import tiny, tokens
from tests.test_lesion import _randomise_bn
from tests.test_studies import lm_run


def _net():
    torch.manual_seed(0)
    return _randomise_bn(preact_resnet_cifar(blocks_per_stage=2, in_channels=1)).eval()


def _by_hand(s, o, r, dim):
    cos = F.cosine_similarity(s, o, dim=dim, eps=1e-12).clamp(-1, 1)
    bi = (1 - cos).flatten(1).mean(1)
    ang = (torch.arccos(cos) / math.pi).flatten(1).mean(1)
    rel = (r.norm(dim=dim) / s.norm(dim=dim)).flatten(1).mean(1)
    return bi, rel, ang


def test_scores_equal_a_hand_computation_with_projection_shortcuts():
    net = _net()
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        _, scores, runs = scored_pass(net, x, FULL, max_run=3)
        cache = net.block_inputs(x)
        for i, block in enumerate(net.blocks):
            h = cache[i]
            s, r = block.shortcut(h), block.residual(h)
            bi, rel, ang = _by_hand(s, block(h), r, 1)
            assert torch.allclose(scores[i]["block_influence"], bi.double(), atol=1e-6), i
            assert torch.allclose(scores[i]["relative_contribution"], rel.double(), atol=1e-5)
            assert torch.allclose(scores[i]["angular_distance"], ang.double(), atol=1e-6)
        # the stream's runs: shapes that differ (a downsampling block inside) have no distance
        for (a, m), d in runs.items():
            u, v = cache[a], cache[a + m]
            cos = F.cosine_similarity(u, v, dim=1).clamp(-1, 1)
            assert torch.allclose(d, (torch.arccos(cos) / math.pi).flatten(1).mean(1).double())
        down = [i for i, b in enumerate(net.blocks) if b.downsampling]
        assert down and all((a, m) not in runs for a in range(down[0]) for m in (down[0] - a + 1,))


def test_parallel_branches_are_scored_alone_on_the_layer_input():
    model = tiny("gpt_neox")
    net = adapt(model)
    ids = tokens()
    with torch.inference_mode():
        _, scores, _ = scored_pass(net, ids, FULL, max_run=2)
        cache = net.block_inputs(ids)
        for i in range(net.n_blocks):
            h = cache[i]  # the layer's input, for both of its branches
            r = net.blocks[i].residual(h)
            bi, rel, _ = _by_hand(h, h + r, r, -1)
            assert torch.allclose(scores[i]["block_influence"], bi.double(), atol=1e-6), i
            assert torch.allclose(scores[i]["relative_contribution"], rel.double(), atol=1e-5)


def test_deletions_equal_the_lesion_engine_and_a_wrong_block_is_refused():
    net = _net()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    scored = block_scores(net, data, metric="error")
    base, want = lesion_errors(net, [lesion_plan(None, [i]) for i in range(net.n_blocks)], data)
    assert scored.base.mean() == base
    assert scored.deleted.mean(0).tolist() == want  # per-example errors, exactly
    assert scored.scores["block_influence"].shape == (12, net.n_blocks)
    # under a base plan that deletes a block: no score for it, the others on the lesioned stream
    partial = block_scores(net, data, Plan(deleted=frozenset({1})), deletions=False)
    assert 1 not in partial.blocks and len(partial.blocks) == net.n_blocks - 1

    block = net.blocks[2]
    block.merge = lambda s, r: s - r  # a merge that is not the block's own forward
    with pytest.raises(ValueError, match="differs from its own forward"):
        block_scores(net, data, deletions=False)


def test_spearman_and_its_bootstrap_interval_on_known_rankings():
    rng = np.random.default_rng(0)
    damage = rng.random((200, 8)) + np.arange(8)  # blocks ordered by damage
    same = spearman_ci(damage.copy(), damage, resamples=200)
    assert same["rho"] == 1.0 and same["low"] == same["high"] == 1.0
    assert spearman_ci(-damage, damage, resamples=50)["rho"] == -1.0
    noisy = spearman_ci(rng.random((200, 8)), damage, resamples=300, seed=1)
    assert noisy["low"] < noisy["rho"] < noisy["high"]  # a random score: a wide interval
    assert noisy["high"] - noisy["low"] > 0.3
    scores = damage.copy()
    scores[:, 3] = np.nan  # a block without a score is left out
    assert spearman(scores, damage) == 1.0 and spearman_ci(scores, damage, 10)["blocks"] == 7


def test_importance_on_a_language_model_writes_its_tables(tmp_path):
    trainer, module, data = lm_run(tmp_path)
    Importance(progress=False, resamples=50).analyse(trainer, module)
    rows = pd.read_csv(tmp_path / "analysis" / "importance.csv")
    assert own_columns(rows.iloc[0].to_dict()) == [
        *("block", "stage", "downsampling", "layer", "kind"),
        *("block_influence", "relative_contribution", "angular_distance"),
        *("loss", "rise", "perplexity", "baseline", "baseline_perplexity", "bn"),
    ]
    base, want = lesion_errors(
        module.net, [lesion_plan(None, [i]) for i in range(4)], data, metric="loss"
    )
    assert rows.loss.tolist() == pytest.approx(want, rel=1e-6)
    corr = pd.read_csv(tmp_path / "analysis" / "importance_correlation.csv")
    assert corr.score.tolist() == ["block_influence", "relative_contribution", "angular_distance"]
    runs = pd.read_csv(tmp_path / "analysis" / "angular_distance.csv")
    assert set(runs.m) == {1, 2} and (tmp_path / "analysis" / "angular_distance.png").exists()


def test_bad_importance_and_prune_values_are_one_line():
    with pytest.raises(ConfigError, match="bn=eval"):
        Importance(bn="recalibrate")
    with pytest.raises(ConfigError, match="resamples"):
        Importance(resamples=0)
    with pytest.raises(ConfigError, match="choose from random"):
        Prune(strategies=["best"])
    with pytest.raises(ConfigError, match="block or layer"):
        Prune(unit="head")
    with pytest.raises(ConfigError, match="max_k <= 5"):
        Prune(max_k=6).check(_net())
    with pytest.raises(ConfigError, match="heal_ks"):
        Prune(max_k=2, heal_ks=[3]).check(_net())


# --- which k to delete ---


def test_strategies_pick_what_they_should():
    net = _net()
    x = torch.randn(16, 1, 8, 8)
    y = net(x).argmax(-1)  # labels the network gets right: deletion damage is visible
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    units = search.units_of(net, "block")
    scored = block_scores(net, data, max_run=net.n_blocks, deletions=False)
    bi = scored.scores["block_influence"].mean(0)
    assert search.by_score(scored, units, "block_influence", 2) == sorted(np.argsort(bi)[:2])
    run = search.best_run(scored, units, 2)
    fits = {
        (a, b): d for (a, b, m), d in scored.runs.items() if b - a == 1
    }  # two consecutive blocks
    assert tuple(run) == min(fits, key=fits.get)

    found = search.greedy(net, units, data, FULL, 3, metric="loss")
    _, single = lesion_errors(net, [lesion_plan(None, [i]) for i in range(6)], data, metric="loss")
    assert found.order[0] == int(np.argmin(single))
    _, second = lesion_errors(
        net,
        [lesion_plan(None, [found.order[0], i]) for i in range(6) if i != found.order[0]],
        data,
        metric="loss",
    )
    assert found.values[:2] == [min(single), min(second)]
    assert found.plans == 6 + 5 + 4 and found.block_runs < found.naive_block_runs
    sets = search.random_sets(6, [0, 2], 3, seed=0)
    assert sets == search.random_sets(6, [0, 2], 3, seed=0) and len(sets) == 6


def test_layer_units_group_a_transformers_sublayers():
    net = adapt(tiny("gpt_neox"))
    assert search.units_of(net, "layer") == [(0, 1), (2, 3)]
    assert search.units_of(net, "block") == [(0,), (1,), (2,), (3,)]


def test_prune_on_a_language_model_writes_every_strategy(tmp_path, monkeypatch):
    trainer, module, _ = lm_run(tmp_path, n_layer=3)
    study = Prune(progress=False, max_k=2, trials=2, calibration_batches=1)
    study.check(module.net)
    calibration = list(trainer.datamodule.test_dataloader())[:1]  # the stand-in has no train split
    monkeypatch.setattr("src.bn.training_batches", lambda *a, **k: iter(calibration))
    study.analyse(trainer, module)
    rows = pd.read_csv(tmp_path / "analysis" / "prune.csv")
    assert set(rows.strategy) == set(search.SEARCHES)
    assert (rows.groupby("strategy").k.max() == 2).all()
    assert rows[rows.k == 0].loss.nunique() == 1  # nothing deleted: the baseline
    greedy = rows[rows.strategy == "greedy"].sort_values("k")
    assert greedy.deleted_names.iloc[1].split()[0] in {
        f"{i}.{k}" for i in range(3) for k in ("attn", "mlp")
    }
    assert greedy.loss.iloc[1] <= rows[(rows.k == 1) & (rows.strategy == "random")].loss.max()


@pytest.mark.parametrize("deletions", [True, False])
def test_importance_shards_merge_into_the_whole_runs_tables(deletions):
    """Three shards (test batches round robin), their per-example rows merged by the report's
    `merge`, give the tables one process writes, bit for bit; an overlap is refused."""
    from src.analysis import importance as study
    from src.distributed import Part, Shard
    from src.engines.importance import batch_scores, combine, run_key

    net = _net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10) for n in (6, 6, 6, 4)]
    how = study.Settings("error", deletions, 50, 0.9, 3)
    info = dict(enumerate(net.block_info()))
    scored = combine(net, FULL, batch_scores(net, data, deletions=deletions))
    whole, _ = study.tables_of(info, scored, how)
    assert set(whole) == {"importance", "angular_distance"} | (
        {"importance_correlation"} if deletions else set()
    )
    shards = []
    for i in range(3):
        owned = Part(Shard(i, 3)).owns
        pieces = batch_scores(net, data, deletions=deletions, owned=owned)
        assert sorted(pieces) == [b for b in range(4) if b % 3 == i]
        shards.append(study.shard_tables(net.block_info(), pieces, run_key(net, FULL), how))
    meta = {"run_dir": "r", "model": "m", "study": "importance"}
    rows = {
        name: pd.concat([s[name].assign(**meta) for s in shards[::-1]], ignore_index=True)
        for name in shards[0]
    }
    assert len(rows["importance"]) == 22 * net.n_blocks  # one row per example and block
    merged = study.merge(rows)
    for name, t in whole.items():
        got = merged[name]
        assert (got.study == name).all() and (got.model == "m").all()
        pd.testing.assert_frame_equal(got[list(t.columns)], t, check_exact=True, obj=name)
    twice = dict(rows, importance=pd.concat([rows["importance"], shards[0]["importance"]]))
    with pytest.raises(ConfigError, match="overlap"):
        study.merge(twice)
