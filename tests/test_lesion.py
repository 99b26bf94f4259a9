"""The lesion engine (paper Sec. 4): exact against hand-built lesioned networks and against naive
evaluation; the studies' samplers and their one-line errors for bad input."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from src.analysis.delete_many import DeleteMany, sample_deletions
from src.analysis.delete_single import DeleteSingle
from src.analysis.reorder import Reorder, compatible_pairs, swapped_order, tau
from src.engines.lesion import lesion_errors, lesion_logits, lesion_plan, rebatch
from src.errors import ConfigError
from src.models import FULL, Network, Plan, preact_resnet_cifar, vgg15
from src.stats import delete_single_headline

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: one intra-op thread avoids oversubscribing a shared CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so eval-mode BN matters."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return net.eval()


@pytest.fixture(scope="module", params=["A", "B"])
def resnet(request):
    torch.manual_seed(0)
    return _randomise_bn(
        preact_resnet_cifar(blocks_per_stage=3, in_channels=1, shortcut=request.param)
    )


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return _randomise_bn(vgg15(width=16, stage_layers=(2, 2, 3), in_channels=1))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)


def _engine(net, x, plans, base=None, reuse=True):
    with torch.inference_mode():
        return list(lesion_logits(net, x, plans, base, reuse))


def _hand_built(net: Network, replace: dict[int, nn.Module], order=None) -> nn.Module:
    """A plain nn.Sequential of the network's modules, with some blocks replaced/reordered."""
    blocks = [replace.get(i, net.blocks[i]) for i in (order or range(net.n_blocks))]
    return nn.Sequential(net.stem, *blocks, net.head).eval()


class _Shortcut(nn.Module):
    """What is left of a residual block with its residual branch removed, written out."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        if not b.downsampling:
            return x
        if b.proj is not None:
            return b.proj(b.pre(x))
        x = x[:, :, :: b.stride, :: b.stride]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, b.cout - b.cin))


def test_deletion_equals_network_built_without_that_residual_branch(resnet, data):
    x, _ = data
    assert any(b.downsampling for b in resnet.blocks)
    plans = [lesion_plan(None, [i]) for i in range(resnet.n_blocks)]
    got = _engine(resnet, x, plans)[1:]
    for i, logits in enumerate(got):
        with torch.inference_mode():
            want = _hand_built(resnet, {i: _Shortcut(resnet.blocks[i])})(x)
        assert (logits - want).abs().max() <= TOL, f"block {i}"
        assert (logits - _engine(resnet, x, [])[0]).abs().max() > TOL  # deletion changes output


def test_vgg_deletion_equals_identity_replacement(vgg, data):
    x, _ = data
    plans = [lesion_plan(None, [i]) for i in range(vgg.n_blocks)]
    for i, logits in enumerate(_engine(vgg, x, plans)[1:]):
        with torch.inference_mode():
            want = _hand_built(vgg, {i: copy.deepcopy(vgg.blocks[i].pool)})(x)
        assert (logits - want).abs().max() <= TOL, f"layer {i}"
    assert sum(b.downsampling for b in vgg.blocks) == 2  # deleting those keeps their pool


def test_reorder_with_tau_one_equals_baseline_and_swaps_equal_hand_built(resnet, data):
    x, _ = data
    pairs = compatible_pairs(resnet)
    ident = swapped_order(range(resnet.n_blocks), [])
    assert tau(ident, range(resnet.n_blocks)) == 1.0
    with torch.inference_mode():
        unlesioned = _hand_built(resnet, {})(x)
    for reuse in (True, False):  # the cached baseline, and a fresh forward under the order
        base, same = _engine(resnet, x, [lesion_plan(None, order=ident)], reuse=reuse)
        assert (base - unlesioned).abs().max() <= TOL and (same - unlesioned).abs().max() <= TOL
    order = swapped_order(range(resnet.n_blocks), [pairs[0], pairs[-1]])
    assert tau(order, range(resnet.n_blocks)) < 1.0
    (got,) = _engine(resnet, x, [lesion_plan(None, order=order)])[1:]
    with torch.inference_mode():
        want = _hand_built(resnet, {}, order=list(order))(x)
    assert (got - want).abs().max() <= TOL


def _mixed_plans(net: Network, base: Plan | None) -> list[Plan]:
    n, pairs = net.n_blocks, compatible_pairs(net)
    return (
        [lesion_plan(base, [i]) for i in range(n)]
        + [lesion_plan(base, d) for _, _, d in sample_deletions(n, [0, 2, 5], 3, seed=1)]
        + [lesion_plan(base, order=swapped_order(range(n), pairs[k : k + 2])) for k in (0, 3)]
    )


@pytest.mark.parametrize("base", [None, Plan(residual_scale=0.7), Plan(deleted=frozenset({4}))])
def test_engine_equals_naive(resnet, data, base):
    x, y = data
    plans = _mixed_plans(resnet, base)
    fast, naive = _engine(resnet, x, plans, base), _engine(resnet, x, plans, base, reuse=False)
    assert len(fast) == len(naive) == len(plans) + 1
    for a, b in zip(fast, naive):
        assert (a - b).abs().max() <= TOL
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    e_fast = lesion_errors(resnet, plans, batches, base, reuse=True, batch_size=7)
    e_naive = lesion_errors(resnet, plans, batches, base, reuse=False)
    assert e_fast == e_naive


def test_engine_restarts_after_the_prefix_it_can_reuse():
    net = preact_resnet_cifar(blocks_per_stage=2)  # 6 blocks
    n = net.n_blocks
    assert net.restart(FULL, lesion_plan(None, [3])) == 3
    assert net.restart(FULL, lesion_plan(None, [4, 1])) == 1
    assert net.restart(FULL, lesion_plan(None, order=[0, 1, 4, 3, 2, 5])) == 2
    assert net.restart(FULL, lesion_plan(None, order=range(n))) is None
    assert net.restart(FULL, Plan(residual_scale=0.5)) == 0
    base = Plan(deleted=frozenset({2}))
    assert net.restart(base, lesion_plan(base, [2])) is None
    assert net.restart(base, lesion_plan(base, [5])) == 5


def test_bn_in_eval_mode_and_training_flag_restored(resnet, data):
    x, y = data
    resnet.train()
    try:
        a = lesion_errors(resnet, [lesion_plan(None, [1])], [(x, y)])
        b = lesion_errors(resnet, [lesion_plan(None, [1])], [(x, y)], batch_size=3)
        assert a == b  # per-example results: batch statistics were not used
        assert resnet.training
    finally:
        resnet.eval()


def test_rebatch_keeps_every_example_in_order():
    x = torch.arange(23.0)
    parts = list(rebatch([(x[:10], x[:10]), (x[10:13], x[10:13]), (x[13:], x[13:])], 4))
    assert [len(p[0]) for p in parts] == [4, 4, 4, 4, 4, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)


def test_samplers_are_seeded_and_valid():
    a = sample_deletions(54, [0, 3, 20], trials=4, seed=0)
    assert a == sample_deletions(54, [0, 3, 20], trials=4, seed=0)
    assert a != sample_deletions(54, [0, 3, 20], trials=4, seed=1)
    assert all(len(d) == k == len(set(d)) and all(0 <= i < 54 for i in d) for k, _, d in a)


def test_compatible_pairs_of_resnet110_skip_downsampling_and_cross_stage():
    net = preact_resnet_cifar(blocks_per_stage=18, in_channels=1)
    pairs = compatible_pairs(net)
    assert len(pairs) == 18 * 17 // 2 + 2 * (17 * 16 // 2)  # stages of 18, 17, 17 blocks
    info = net.block_info()
    for a, b in pairs:
        assert info[a]["stage"] == info[b]["stage"]
        assert not info[a]["downsampling"] and not info[b]["downsampling"]


def test_headline_uses_non_downsampling_blocks():
    rows = [
        {"block": 0, "stage": 0, "downsampling": False, "error": 0.10},
        {"block": 1, "stage": 1, "downsampling": True, "error": 0.50},
        {"block": 2, "stage": 1, "downsampling": False, "error": 0.14},
    ]
    h = delete_single_headline(pd.DataFrame(rows), baseline=0.08)
    assert h["median_increase_nondownsampling"] == pytest.approx(0.04)
    assert h["mean_increase_nondownsampling"] == pytest.approx(0.04)
    assert h["worst_block"] == 1 and h["downsampling_errors"] == [0.50]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DeleteMany(ks=[0, 55]), "at most 54"),
        (lambda: DeleteMany(ks=[-1]), "ks >= 0"),
        (lambda: Reorder(swaps=[426]), "at most 425"),
        (lambda: DeleteSingle(blocks=[3, 54]), "0..53"),
        (lambda: DeleteSingle(batch_size=0), "batch_size"),
        (lambda: DeleteSingle(device="cuda:99"), "device='cuda:99' is not available"),
        (lambda: DeleteMany(device="gpu"), "device='gpu' is not available"),
    ],
)
def test_bad_input_is_a_one_line_config_error_at_setup(make, match):
    """`setup` runs before fit (and before test on a checkpoint): nothing is trained in vain."""
    module = SimpleNamespace(net=preact_resnet_cifar(blocks_per_stage=18, in_channels=1))
    with pytest.raises(ConfigError, match=match) as err:
        make().setup(None, module, "fit")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_sweep_on_another_device_under_inference_mode_keeps_ordinary_parameters(resnet, data):
    """Lightning runs on_test_end under inference mode; a move made there would come back as
    inference tensors that no later analysis can differentiate through."""
    x, y = data
    net = copy.deepcopy(resnet).cuda()
    with torch.inference_mode():
        lesion_errors(net, [lesion_plan(None, [1])], [(x, y)], device="cpu")
    assert all(p.is_cuda and not p.is_inference() for p in net.parameters())
    torch.nn.functional.cross_entropy(net(x.cuda()), y.cuda()).backward()


def test_out_of_range_plan_is_a_config_error(resnet, data):
    x, y = data
    with pytest.raises(ConfigError, match="out of range"):
        lesion_errors(resnet, [lesion_plan(None, [99])], [(x, y)])


def _recalibrated_by_hand(model: nn.Module, train: list) -> nn.Module:
    """A copy of `model` (a plain nn.Sequential) whose BatchNorm running statistics are the
    cumulative average over `train`, computed in train mode: the definition, written out."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    trained = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in train:
            model(x)
    for m, (mean, var) in zip(bns, trained):  # a layer the lesion never runs keeps its own
        if int(m.num_batches_tracked) == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return model.eval()


def test_recalibrated_lesions_equal_hand_built_networks_with_fresh_statistics(resnet, data):
    """bn=recalibrate: each lesion is tested with BN statistics re-estimated under it; the
    network's own weights and statistics are untouched afterwards."""
    from src.engines.lesion import recalibrated_errors

    x, y = data
    g = torch.Generator().manual_seed(5)
    train = [(torch.randn(16, 1, 8, 8, generator=g), torch.zeros(16, dtype=torch.long))] * 2
    before = copy.deepcopy(resnet.state_dict())
    deleted = [1, 4]  # a plain block and the first downsampling block
    plans = [lesion_plan(None, [i]) for i in deleted]
    base, errors = recalibrated_errors(resnet, plans, [(x[:25], y[:25]), (x[25:], y[25:])], train)

    def error(model):
        with torch.no_grad():
            return float((model(x).argmax(1) != y).double().mean())

    assert base == error(_recalibrated_by_hand(_hand_built(resnet, {}), train))
    for i, got in zip(deleted, errors):
        lesioned = _hand_built(resnet, {i: _Shortcut(resnet.blocks[i])})
        assert got == error(_recalibrated_by_hand(lesioned, train)), i
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not resnet.training
    # the trained (here: random) statistics give other errors: re-estimation changed something
    assert (base, errors) != lesion_errors(resnet, plans, [(x, y)])


def test_duplicating_a_block_equals_the_network_with_that_block_twice(resnet, data):
    """A duplication is a plan (the order runs block i twice), equal to a hand-built network
    holding the same module twice; the engine's prefix reuse gives the same logits."""
    from src.analysis.duplicate import Duplicate, duplicated_order

    x, _ = data
    study = Duplicate(progress=False)
    eligible = study.eligible(resnet)
    down = [b["block"] for b in resnet.block_info() if b["downsampling"]]
    assert down and not set(down) & set(eligible) and len(eligible) == resnet.n_blocks - len(down)
    plans = [lesion_plan(None, order=duplicated_order(range(resnet.n_blocks), i)) for i in eligible]
    got = _engine(resnet, x, plans)[1:]
    for i, logits in zip(eligible, got):
        order = duplicated_order(range(resnet.n_blocks), i)
        assert order.count(i) == 2 and len(order) == resnet.n_blocks + 1
        with torch.inference_mode():
            want = _hand_built(resnet, {}, order=list(order))(x)
        assert torch.allclose(logits, want, atol=TOL), i
    with pytest.raises(ConfigError, match="downsampling") as err:
        Duplicate(blocks=[down[0]]).check(resnet)
    assert "\n" not in str(err.value)


def test_memory_budget_splits_batches_and_keeps_the_values(resnet, data, monkeypatch):
    """A budget that fits 3 examples' cache: every cache the engine builds (after its one-example
    probe) holds at most 3 examples; errors (counts) equal the unbudgeted ones exactly, losses up
    to float32 rounding (a convolution's arithmetic depends on the batch size)."""
    import src.engines.lesion as engine

    x, y = data
    with torch.inference_mode():
        one = sum(h.element_size() * h.numel() for h in engine.plan_inputs(resnet, x[:1], FULL))
    budget = 2 * one * 3 + one  # room for 3 examples (cache + one lesion's recomputation), not 4
    with torch.inference_mode():
        assert engine.micro_batch(resnet, x, FULL, budget) == 3
        monkeypatch.setattr(engine, "CPU_ACTIVATION_BYTES", None)
        assert engine.micro_batch(resnet, x, FULL, None) is None
    sizes = []
    real = engine.plan_inputs
    monkeypatch.setattr(
        engine, "plan_inputs", lambda net, x, base: sizes.append(len(x)) or real(net, x, base)
    )
    plans = [lesion_plan(None, [i]) for i in range(resnet.n_blocks)]
    plans += [lesion_plan(None, [0, 4]), lesion_plan(None, order=[0, 2, 1, *range(3, 9)])]
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    for metric in ("error", "loss"):
        sizes.clear()
        budgeted = lesion_errors(resnet, plans, batches, memory=budget, metric=metric)
        assert sizes[0] == 1 and max(sizes[1:]) == 3 and sum(sizes[1:]) == 40
        whole = lesion_errors(resnet, plans, batches, metric=metric)
        if metric == "error":
            assert budgeted == whole
        else:
            assert budgeted[0] == pytest.approx(whole[0], rel=1e-6)
            assert budgeted[1] == pytest.approx(whole[1], rel=1e-6)


def test_cpu_activation_cap_splits_batches_and_keeps_the_values(resnet, data, monkeypatch):
    """On a CPU a test batch is split so that its largest block input stays within
    CPU_ACTIVATION_BYTES, in the plain and the BN-re-estimated sweeps; the values equal those of
    whole batches (cap off): error counts exactly, losses up to float32 rounding."""
    import src.engines.lesion as engine

    x, y = data
    with torch.inference_mode():
        largest = max(h.element_size() * h[:1].numel() for h in engine.plan_inputs(resnet, x, FULL))
        assert engine.micro_batch(resnet, x, FULL, None) == engine.CPU_ACTIVATION_BYTES // largest
    plans = [lesion_plan(None, [i]) for i in range(resnet.n_blocks)] + [lesion_plan(None, [0, 4])]
    batches, train = [(x[:32], y[:32]), (x[32:], y[32:])], [(x[:20], y[:20]), (x[20:], y[20:])]
    seen = []
    real = resnet.forward
    monkeypatch.setattr(
        resnet, "forward", lambda x, plan=None: seen.append(len(x)) or real(x, plan)
    )
    runs = {}
    for cap in (largest * 5 + 1, None):
        monkeypatch.setattr(engine, "CPU_ACTIVATION_BYTES", cap)
        for metric in ("error", "loss"):
            seen.clear()
            plain = lesion_errors(resnet, plans, batches, metric=metric, reuse=False)
            recal = engine.recalibrated_errors(resnet, plans, batches, train, metric=metric)
            runs[cap, metric] = plain, recal, sorted(set(seen))
    small = largest * 5 + 1
    assert runs[small, "error"][2] == [2, 3, 5, 20]  # 32 = 6 x 5 + 2, 8 = 5 + 3; BN's batches
    assert runs[None, "error"][2] == [8, 20, 32]
    assert runs[small, "error"][:2] == runs[None, "error"][:2]
    for got, want in zip(runs[small, "loss"][:2], runs[None, "loss"][:2]):
        assert got[0] == pytest.approx(want[0], rel=1e-6)
        assert got[1] == pytest.approx(want[1], rel=1e-6)


def test_memory_budget_forms():
    from src.engines.lesion import parse_memory

    assert parse_memory("512MB") == 512 * 2**20 and parse_memory("4gb") == 4 * 2**30
    assert parse_memory(1000) == 1000 and parse_memory("1.5K") == 1536
    assert parse_memory("auto") == "auto" and parse_memory(None) is None
    for bad in ("lots", "-1GB", 0, "4 GiB"):
        with pytest.raises(ConfigError, match="memory=512MB") as err:
            parse_memory(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="memory=512MB"):
        DeleteSingle(memory="plenty")
