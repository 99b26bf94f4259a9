"""Gradient per path length (paper Sec. 5, Figs 6b/6c): the fast engine equals the straightforward
autograd method, paths sum to the full gradient, the trained network's eval plan is what gets
measured, summaries, bad input, and end to end."""

from __future__ import annotations

import copy
import itertools
import json
import math
from math import comb

import pytest
import torch

from src.analysis.base import AnalysisCallback
from src.analysis.delete_single import DeleteSingle
from src.analysis.gradient_paths import GradientPaths
from src.data import SyntheticDataModule, batches
from src.engines.decomposition import propagate
from src.engines.paths import (
    BlockVJPs,
    fast_path_grads,
    gated_grad,
    path_counts,
    path_grad_norms,
    prepared,
    sample_paths,
    straightforward_path_grads,
)
from src.errors import ConfigError
from src.models import FULL, Plan
from src.models.preact_resnet import preact_resnet_cifar
from src.models.torchvision_resnet import torchvision_resnet
from src.models.vgg import vgg15
from src.module import Classifier
from src.results import read_csv
from src.stats import fit_decay, length_stats, total_gradient
from src.training import BlockSubset
from tests.conftest import run_cli
from tests.test_training import quiet_trainer


def _randomise_bn(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def tiny(shortcut="B"):
    torch.manual_seed(0)
    return _randomise_bn(preact_resnet_cifar(2, widths=(4, 8, 8), shortcut=shortcut)).eval()


def batch(n=3, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize(
    "shortcut,wrt,batched", [("A", "input", False), ("B", "input", True), ("B", "stem", False)]
)
def test_fast_equals_straightforward(shortcut, wrt, batched):
    net, (x, y) = tiny(shortcut), batch()
    paths = [p for _, p in sample_paths(6, range(1, 7), 3, torch.Generator().manual_seed(0))]
    paths.append(frozenset())
    fast = fast_path_grads(net, x, y, paths, wrt, chunk=7, batched=batched)
    ref = straightforward_path_grads(net, x, y, paths, wrt)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-8)
    assert ref.abs().max() > 0


def test_train_mode_batchnorm_matches_and_leaves_stats_untouched():
    net, (x, y) = tiny(), batch(4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    measured = prepared(net, "train")
    paths = [frozenset({0, 3}), frozenset({1, 2, 5}), frozenset(range(6))]
    fast = fast_path_grads(measured, x, y, paths)
    ref = straightforward_path_grads(measured, x, y, paths)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-8)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training


def test_post_activation_torchvision_blocks():
    torch.manual_seed(0)
    net = _randomise_bn(torchvision_resnet("resnet18", num_classes=10)).eval()
    x, y = batch(2, (3, 16, 16))
    paths = [frozenset({0, 2, 7}), frozenset({1, 4}), frozenset(), frozenset(range(8))]
    torch.testing.assert_close(
        fast_path_grads(net, x, y, paths), straightforward_path_grads(net, x, y, paths)
    )


def test_all_paths_sum_to_the_full_gradient():
    """The unraveled view: the gradient is the sum of the gradients of all 2^n paths."""
    net, (x, y) = tiny(), batch()
    paths = [
        frozenset(i for i, b in enumerate(bits) if b)
        for bits in itertools.product((0, 1), repeat=6)
    ]
    total = fast_path_grads(net, x, y, paths, chunk=64).sum(0)
    x = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(total, x.grad, rtol=1e-4, atol=1e-7)


def test_norms_in_path_order_and_engines_agree():
    net, (x, y) = tiny(), batch()
    paths = [frozenset({5}), frozenset({0, 1, 2, 3, 4}), frozenset({2})]
    fast = path_grad_norms(net, x, y, paths, engine="fast", chunk=2)
    slow = path_grad_norms(net, x, y, paths, engine="straightforward")
    torch.testing.assert_close(fast, slow)
    assert BlockVJPs(net, x, y).bypass[1] is None and BlockVJPs(net, x, y).bypass[2] is not None


def rescaled_by_hand(net, scale: float):
    """What `Plan(residual_scale=scale)` runs, written out as weights: a copy whose residual
    branches end in their (bias-free) last convolution times `scale`."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for block in net.blocks:
            block.layers[-1].weight.mul_(scale)
    return net


RESCALE = BlockSubset(k=3, test_mode="rescale")  # tested with residual branches x 3/6


@pytest.mark.parametrize("engine", ["fast", "straightforward"])
def test_path_gradients_are_those_of_the_rescaled_network(engine):
    net, (x, y) = tiny(), batch()
    plan = RESCALE.eval_plan(net.n_blocks)
    paths = [frozenset({5}), frozenset({0, 2, 3}), frozenset(range(6)), frozenset()]
    got = path_grad_norms(net, x, y, paths, engine=engine, plan=plan)
    want = path_grad_norms(rescaled_by_hand(net, 0.5), x, y, paths, engine="straightforward")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    full = path_grad_norms(net, x, y, paths, engine=engine)
    assert (got[:3] < 0.6 * full[:3]).all()  # entering a branch scaled by 0.5 shrinks a path


def test_fast_equals_straightforward_under_deletions_and_reordering():
    net, (x, y) = tiny(), batch()
    assert [b.downsampling for b in net.blocks] == [False, False, True, False, True, False]
    plan = Plan(order=(1, 0, 2, 3, 4, 5), deleted=frozenset({4}), residual_scale=0.7)
    paths = [frozenset({1}), frozenset({2, 4, 5}), frozenset({4}), frozenset(), frozenset(range(6))]
    fast = fast_path_grads(net, x, y, paths, chunk=3, plan=plan)
    torch.testing.assert_close(fast, straightforward_path_grads(net, x, y, paths, plan=plan))
    # block 4 is deleted (its projection shortcut kept): a path cannot enter its residual branch
    torch.testing.assert_close(fast[2], fast[3])
    assert not torch.allclose(fast, fast_path_grads(net, x, y, paths, chunk=3))


def test_a_plan_running_a_block_twice_is_refused_by_every_gradient_engine():
    """A path is a set of blocks: with block 0 run twice (a duplicate lesion) the set {0} would
    stand for three paths, so gradient plans may run each block once only."""
    from src.engines.decomposition import decompose, enumerate_paths

    net, (x, y) = tiny(), batch()
    plan = Plan(order=(0, 0, 1, 2, 3, 4, 5))
    for measure in (
        lambda: fast_path_grads(net, x, y, [frozenset({0})], plan=plan),
        lambda: straightforward_path_grads(net, x, y, [frozenset({0})], plan=plan),
        lambda: decompose(net, x, y, plan=plan),
        lambda: enumerate_paths(net, x, y, plan=plan),
    ):
        with pytest.raises(ConfigError, match="more than once"):
            measure()


def test_sampled_paths_have_the_requested_lengths():
    sampled = sample_paths(54, [1, 23, 54], 5, torch.Generator().manual_seed(0))
    assert [len(p) for _, p in sampled] == [k for k, _ in sampled] == [1] * 5 + [23] * 5 + [54] * 5
    assert all(max(p) < 54 for _, p in sampled)


def test_summaries_recover_a_known_decay():
    lengths = [k for k in range(1, 11) for _ in range(3)]
    norms = [math.exp(-1.0 - 0.3 * k) * f for k in range(1, 11) for f in (0.9, 1.0, 1.1)]
    rows = length_stats(lengths, norms)
    assert rows.samples.tolist() == [3] * 10
    fit = fit_decay(rows.length, rows.grad_norm_mean)
    assert fit["decay_rate"] == pytest.approx(-0.3) and fit["factor_per_block"] < 1
    # the means of 0.9, 1.0, 1.1 times the line lie exactly on it: no residual, no error
    assert fit["decay_rate_se"] == pytest.approx(0.0, abs=1e-6)
    noisy = fit_decay(lengths, norms)  # every sample: the spread gives a standard error
    assert noisy["decay_rate"] == pytest.approx(-0.3, abs=0.01) and noisy["decay_rate_se"] > 1e-3
    totals = total_gradient(path_counts(54), rows.length, rows.grad_norm_mean)
    exact = [comb(54, int(k)) * g for k, g in zip(rows.length, rows.grad_norm_mean)]
    assert totals.share.tolist() == pytest.approx([e / sum(exact) for e in exact])


@pytest.mark.parametrize(
    "bad",
    [
        dict(samples=0),
        dict(lengths=[0, 3]),
        dict(lengths=[55]),
        dict(share=0.0),
        dict(share=1.5),
        dict(bn="batch"),
        dict(engine="nope"),
        dict(dtype="float16"),
    ],
)
def test_bad_settings_rejected(bad):
    with pytest.raises(ConfigError):
        GradientPaths(**bad).validate(54)


def test_good_settings_accepted():
    assert GradientPaths(lengths=[54, 1]).validate(54) == [1, 54]
    assert GradientPaths(share=1.0).validate(3) == [1, 2, 3]


def test_plain_network_is_refused_at_setup():
    """Checked in `setup`, which Lightning runs before fit (and before test with train=false)."""
    module = Classifier(vgg15(width=8, stage_layers=(1, 1, 1), in_channels=3))
    with pytest.raises(ConfigError, match="need residual blocks.*model=resnet110") as err:
        GradientPaths(lengths=[1]).setup(None, module, "fit")
    assert "\n" not in str(err.value)


def tiny_data() -> SyntheticDataModule:
    return SyntheticDataModule(shape=(3, 8, 8), n_train=8, n_test=8, batch_size=4)


def test_callback_measures_the_network_that_was_tested(tmp_path):
    """training.test_mode=rescale: paths, exact G_k and the full gradient of the rescaled net."""
    module, dm = Classifier(tiny(), mode=RESCALE), tiny_data()
    callback = GradientPaths(samples=2, lengths=[1, 3, 6], batches=1, split="test")
    quiet_trainer(tmp_path, callbacks=[callback]).test(module, dm, verbose=False)
    out = tmp_path / "analysis"

    hand = rescaled_by_hand(module.net, 0.5).double()
    x, y = next(batches(dm, "test", seed=0))  # the callback's batch: drawn from its seed
    x = x.double()
    sampled = sample_paths(6, [1, 3, 6], 2, torch.Generator().manual_seed(0))  # the callback's
    norms = path_grad_norms(hand, x, y, [p for _, p in sampled], engine="straightforward")
    want = length_stats([k for k, _ in sampled], norms.tolist())
    rows = read_csv(out / "gradient_paths.csv")
    assert [float(r["grad_norm_mean"]) for r in rows] == pytest.approx(
        want.grad_norm_mean.tolist(), rel=1e-9
    )
    exact = [float(r["grad_norm_exact"]) for r in read_csv(out / "path_decomposition.csv")]
    assert exact == pytest.approx([float(g.norm()) for g in propagate(hand, x, y)], rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())["gradient_paths"]
    assert summary["residual_scale"] == 0.5
    full = float(gated_grad(hand, x, y, FULL).norm())
    assert summary["exact_full_grad_norm"] == pytest.approx(full, rel=1e-9)
    untested = float(gated_grad(module.net.double(), x, y, FULL).norm())
    assert abs(untested - full) > 0.05 * full


class DeviceRoundTrip(AnalysisCallback):
    """Moves the network away and back inside `on_test_end`, as a lesion study with
    `device=<another device>` does (`net.to(device)`, then back); a CPU-only machine has no other
    device, so a float64 round trip stands in for it (the same module conversion)."""

    def analyse(self, trainer, pl_module) -> None:
        pl_module.net.to(torch.float64).to(torch.float32)


def test_autograd_analysis_after_a_lesion_study_that_moved_the_network(tmp_path):
    """Lightning runs on_test_end under inference mode: a conversion there made every parameter
    an inference tensor, and float32 gradient paths then failed ("Inference tensors cannot be
    saved for backward")."""
    module, dm = Classifier(tiny()), tiny_data()
    callbacks = [
        DeleteSingle(blocks=[0], device="cpu", progress=False),
        DeviceRoundTrip(),
        GradientPaths(samples=1, lengths=[1, 6], batches=1, split="test", dtype="float32"),
    ]
    quiet_trainer(tmp_path, callbacks=callbacks).test(module, dm, verbose=False)
    assert not any(p.is_inference() for p in module.parameters())
    rows = read_csv(tmp_path / "analysis" / "gradient_paths.csv")
    assert [r["length"] for r in rows] == ["1", "6"] and all(
        float(r["grad_norm_mean"]) > 0 for r in rows
    )
    assert len(read_csv(tmp_path / "analysis" / "delete_single.csv")) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=resnet20", "callbacks.gradient_paths.lengths=[10]"], "error: lengths=[10]"),
        (["model=vgg15"], "error: gradient paths need residual blocks"),
    ],
)
def test_cli_bad_input_is_one_line_error_before_training(overrides, message, tmp_path):
    res = run_cli(
        "experiment=gradient_paths",
        "preset=quick",
        *overrides,
        "trainer.max_steps=2",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(message), res.stderr[-2000:]
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
