"""Test-time rules of block-subset training (issue 9): batch-norm statistics re-estimated for a
plan (`src/bn.py`: exact, restored, weights untouched), the recalibrate and ensemble test modes,
and one checkpoint tested under several rules through the CLI."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from src import seeds
from src.bn import bn_layers, recalibrate, recalibrated, training_batches
from src.data import DigitsDataModule
from src.errors import ConfigError
from src.models import Plan, preact_resnet_cifar, vgg15
from src.module import Classifier
from src.training import BlockSubset
from tests.conftest import run_cli
from tests.test_training import quiet_trainer


def tiny_net(seed: int = 0):
    """6 blocks (2 per stage) with batch-norm statistics that are not the defaults."""
    torch.manual_seed(seed)
    net = preact_resnet_cifar(2, widths=(4, 8, 8), in_channels=1)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(16, 1, 8, 8) * 2 + 1)
    return net.eval()


def random_batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 8, 8, generator=g) * 0.5 - 0.3, torch.zeros(8, dtype=torch.long))
        for _ in range(n)
    ]


def state(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same(a: dict, b: dict, keys=None) -> None:
    for k in keys or a:
        assert torch.equal(a[k], b[k]), k


def test_recalibrated_restores_statistics_momenta_and_flags_exactly():
    net = tiny_net()
    net.blocks[3].train()  # a mixed train/eval state comes back as it was
    bn_layers(net)[0].momentum = 0.3
    before, flags = state(net), [m.training for m in net.modules()]
    momenta = [m.momentum for m in bn_layers(net)]
    params = {k for k, _ in net.named_parameters()}
    with recalibrated(net, Plan(deleted=frozenset({1})), random_batches(), 4):
        inside = state(net)
        assert_same(before, inside, params)  # weights untouched
        assert not torch.equal(
            inside["blocks.2.pre.0.running_mean"], before["blocks.2.pre.0.running_mean"]
        )
        assert [m.training for m in net.modules()] == flags
    assert_same(before, state(net))
    assert [m.momentum for m in bn_layers(net)] == momenta
    assert [m.training for m in net.modules()] == flags
    with pytest.raises(RuntimeError, match="interrupted"):
        with recalibrated(net, None, random_batches(), 4):
            raise RuntimeError("interrupted")
    assert_same(before, state(net))


def test_recalibrated_statistics_are_the_plan_mean_and_variance():
    """The BN of block 2 after deleting block 1: the mean over batches of its input's per-batch
    channel means and unbiased variances under that plan (computed here from hooked inputs);
    the layers of the deleted block never run and keep their statistics."""
    net, plan, batches = tiny_net(), Plan(deleted=frozenset({1})), random_batches()
    bn2, bn1 = net.blocks[2].pre[0], net.blocks[1].pre[0]
    seen = []
    probe = copy.deepcopy(net).train()  # train mode: batch statistics, as re-estimation runs
    hook = (
        probe.blocks[2]
        .pre[0]
        .register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    )
    with torch.no_grad():
        for x, _ in batches:
            probe(x, plan)
    hook.remove()
    mean = torch.stack([h.mean((0, 2, 3)) for h in seen]).mean(0)
    var = torch.stack([h.transpose(0, 1).flatten(1).var(1) for h in seen]).mean(0)  # unbiased
    old_bn1 = bn1.running_mean.clone()
    with recalibrated(net, plan, batches, len(batches)):
        assert torch.allclose(bn2.running_mean, mean, atol=1e-6)
        assert torch.allclose(bn2.running_var, var, atol=1e-5)
        assert int(bn2.num_batches_tracked) == len(batches)
        assert torch.equal(bn1.running_mean, old_bn1)  # block 1 is deleted: never ran
        first = (bn2.running_mean.clone(), bn2.running_var.clone())
    with recalibrated(net, None, batches, len(batches)):  # the full network: other inputs
        assert not torch.allclose(bn2.running_mean, first[0])
    with recalibrated(net, plan, batches, len(batches)):  # deterministic given the batches
        assert torch.equal(bn2.running_mean, first[0]) and torch.equal(bn2.running_var, first[1])
    with recalibrated(net, plan, iter(batches), 2):  # only the first n batches
        assert int(bn2.num_batches_tracked) == 2


def test_recalibrate_in_place_and_under_inference_mode():
    net, ref = tiny_net(), tiny_net()
    with torch.inference_mode():  # Lightning's test loop
        assert recalibrate(net, None, random_batches(), 10) == 4  # all that there were
    with recalibrated(ref, None, random_batches(), 4):
        assert_same(state(ref), state(net))
    assert not net.training
    kept = state(net)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(net, None, [], 3)
    assert_same(kept, state(net))  # a failed re-estimate leaves the statistics


def test_training_batches_are_seeded_and_not_augmented():
    dm = DigitsDataModule(batch_size=64, augment=True, padding=2)
    dm.setup()
    a = list(training_batches(dm, 3, seed=5))
    b = list(training_batches(dm, 3, seed=5))
    c = list(training_batches(dm, 3, seed=6))
    assert len(a) == 3 and all(x.shape == (64, 1, 8, 8) for x, _ in a)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    x, y = dm.splits["train"].tensors
    plain = dm.transform(x, train=False).flatten(1)  # every image as normalised, unaugmented
    for xb, yb in a:
        match = (xb.flatten(1)[:, None] == plain[None]).all(-1)
        assert match.any(1).all()
        assert all(bool((y[match[i]] == yb[i]).all()) for i in range(len(yb)))
    assert len(list(training_batches(dm, 1000, seed=5))) == len(x) // 64  # at most one pass


def ensemble_module(size: int, k: int = 3, net=None) -> Classifier:
    net = net or preact_resnet_cifar(2, widths=(4, 8, 8), in_channels=1)
    return Classifier(net, mode=BlockSubset(k=k, test_mode="ensemble", ensemble_size=size))


def test_an_ensemble_of_one_is_its_single_subset():
    torch.manual_seed(0)
    module = ensemble_module(1).eval()
    module.seed = 7
    [plan] = module.ensemble_plans()
    keep = torch.randperm(6, generator=seeds.generator(7, "ensemble", 0))[:3].tolist()
    assert plan == Plan(deleted=frozenset(range(6)) - frozenset(keep))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module(x), F.log_softmax(module.net(x, plan), 1), atol=1e-5)
    # the first members do not depend on the ensemble's size
    bigger = BlockSubset(k=3, test_mode="ensemble", ensemble_size=8).ensemble_plans(6, 7)
    assert bigger[0] == plan and len({p.deleted for p in bigger}) > 1
    assert BlockSubset(test_mode="ensemble", ensemble_size=16).ensemble_sizes() == (1, 2, 4, 8, 16)
    assert BlockSubset(test_mode="ensemble", ensemble_size=5).ensemble_sizes() == (1, 2, 4, 5)


def test_ensemble_test_reports_error_against_members(tmp_path):
    """test/error_m<m> is the error of the first m members' averaged softmax (a hand loop)."""
    L.seed_everything(0)
    module = ensemble_module(5)
    dm = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(tmp_path, max_steps=15, limit_val_batches=0)
    trainer.fit(module, dm)
    [results] = trainer.test(module, dm, verbose=False)
    assert {f"test/error_m{m}" for m in (1, 2, 4, 5)} <= set(results)
    assert results["test/error"] == pytest.approx(results["test/error_m5"])
    x, y = dm.splits["test"].tensors
    x = dm.transform(x, train=False)
    net = module.net.eval()
    members = BlockSubset(k=3, test_mode="ensemble", ensemble_size=5).ensemble_plans(6, 0)
    with torch.no_grad():
        probs = [F.softmax(net(x, p), 1) for p in members]
    errors = {}
    for m in (1, 2, 4, 5):
        average = torch.stack(probs[:m]).mean(0)
        errors[m] = (average.argmax(1) != y).float().mean().item()
        assert results[f"test/error_m{m}"] == pytest.approx(errors[m], abs=1e-6), m
    with torch.no_grad():
        nll = F.nll_loss(torch.stack(probs).mean(0).log(), y).item()
    assert results["test/loss"] == pytest.approx(nll, rel=1e-4)
    assert len(set(errors.values())) > 1  # the members differ: not one network five times


def test_recalibrate_test_mode_sets_full_network_statistics(tmp_path):
    L.seed_everything(0)
    net = preact_resnet_cifar(2, widths=(4, 8, 8), in_channels=1)
    module = Classifier(net, mode=BlockSubset(k=3, test_mode="recalibrate", bn_batches=4))
    dm = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(tmp_path, max_steps=15, limit_val_batches=0)
    trainer.fit(module, dm)
    trained = state(net)
    reference = copy.deepcopy(net)
    recalibrate(reference, None, training_batches(dm, 4, seeds.derive(0, "bn")), 4)
    [results] = trainer.test(module, dm, verbose=False)
    after = state(net)
    buffers = [k for k in after if "running" in k]
    assert_same(after, state(reference))
    assert_same(after, trained, [k for k, _ in net.named_parameters()])
    assert any(not torch.equal(after[k], trained[k]) for k in buffers)
    assert all(int(m.num_batches_tracked) == 4 for m in bn_layers(net))
    x, y = dm.splits["test"].tensors
    with torch.no_grad():
        wrong = (reference.eval()(dm.transform(x, train=False)).argmax(1) != y).float().mean()
    assert results["test/error"] == pytest.approx(wrong.item(), abs=1e-6)


def test_test_mode_choices_and_what_each_model_takes(tmp_path):
    with pytest.raises(ConfigError, match="full, rescale, recalibrate, ensemble.*'sometimes'"):
        BlockSubset(test_mode="sometimes")
    with pytest.raises(ConfigError, match="ensemble_size"):
        BlockSubset(test_mode="ensemble", ensemble_size=0)
    assert BlockSubset(test_mode="recalibrate").eval_plan(54) is None
    with pytest.raises(ConfigError, match="test_mode=ensemble.*test_mode=full"):
        BlockSubset(test_mode="ensemble").eval_plan(54)
    assert BlockSubset(test_mode="ensemble").val_plan(54) is None  # validation: full network
    # a plain network: a left-out layer is the identity, so both rules apply (rescale does not)
    vgg = vgg15(width=8, stage_layers=(2, 1), in_channels=1)
    for mode in ("recalibrate", "ensemble"):
        Classifier(vgg, mode=BlockSubset(k=2, test_mode=mode))
    module = ensemble_module(3, k=2, net=vgg).eval()
    module.seed = 0
    with torch.no_grad():
        assert module(torch.randn(2, 1, 8, 8)).exp().sum(1).allclose(torch.ones(2))
    # a lesion study or gradient paths cannot start from an ensemble: refused before training
    from src.analysis.delete_single import DeleteSingle

    module = ensemble_module(2)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[DeleteSingle(progress=False)])
    with pytest.raises(ConfigError, match="test_mode=ensemble"):
        trainer.fit(module, DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0


def checkpoint_net(ckpt) -> tuple[torch.nn.Module, DigitsDataModule]:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = saved["state_dict"]
    net = preact_resnet_cifar(blocks_per_stage=3, in_channels=1, num_classes=10)
    net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items() if k[:4] == "net."})
    dm = DigitsDataModule(batch_size=saved["run_config"]["data"]["batch_size"])  # 64
    dm.setup()
    return net.eval(), dm


def error(net, dm, plan=None) -> float:
    x, y = dm.splits["test"].tensors
    with torch.no_grad():
        return (net.eval()(dm.transform(x, train=False), plan).argmax(1) != y).float().mean().item()


@pytest.mark.slow
def test_one_checkpoint_tested_under_each_rule_through_the_cli(tmp_path):
    """Train with test_mode=ensemble, then test the same checkpoint with train=false under
    full, recalibrate and a smaller ensemble; every number is recomputed here directly."""
    run = tmp_path / "ensemble"
    common = ("logger=csv",)
    run_cli(
        "preset=quick",
        "model=resnet20",
        "training=block_subset",
        "training.k=4",
        "training.test_mode=ensemble",
        "training.ensemble_size=4",
        "trainer.max_steps=20",
        f"hydra.run.dir={run}",
        *common,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test_error_m1", "test_error_m2", "test_error_m4"} <= set(metrics)
    assert metrics["test_error"] == pytest.approx(metrics["test_error_m4"])
    ckpt = run / "checkpoints" / "last.ckpt"
    net, dm = checkpoint_net(ckpt)
    members = BlockSubset(k=4, test_mode="ensemble", ensemble_size=4).ensemble_plans(9, 0)
    assert metrics["test_error_m1"] == pytest.approx(error(net, dm, members[0]), abs=1e-6)

    def test_as(name: str, *overrides: str) -> dict:
        out = tmp_path / name
        run_cli(
            "train=false",
            f"ckpt_path={ckpt}",
            "training=block_subset",  # the default, standard, has no test_mode key
            *overrides,
            f"hydra.run.dir={out}",
            *common,
        )
        return json.loads((out / "metrics.json").read_text())

    full = test_as("full", "training.test_mode=full")
    assert full["test_error"] == pytest.approx(error(net, dm), abs=1e-6)
    assert "test_error_m1" not in full
    small = test_as("small", "training.ensemble_size=2")  # the first members do not depend on M
    assert (small["test_error_m1"], small["test_error_m2"]) == pytest.approx(
        (metrics["test_error_m1"], metrics["test_error_m2"]), abs=1e-6
    )
    recal = test_as("recal", "training.test_mode=recalibrate", "training.bn_batches=5")
    recalibrate(net, None, training_batches(dm, 5, seeds.derive(0, "bn")), 5)
    assert recal["test_error"] == pytest.approx(error(net, dm), abs=1e-6)
