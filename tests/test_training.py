"""Training modes: block subset runs exactly k blocks (counted), stochastic depth schedule,
modes a network without shortcuts cannot take, the paper's lr schedule, and training through the
LightningModule: gradients reach exactly the blocks the mode trains, and modes share data and
augmentation."""

import copy

import lightning as L
import pytest
import torch

from src.data import DigitsDataModule, SyntheticDataModule
from src.errors import ConfigError
from src.models import Plan, preact_resnet_cifar, vgg15
from src.module import Classifier, Recipe, StepSchedule
from src.training import BlockSubset, Standard, StochasticDepth
from tests.conftest import run_cli


def count_block_runs(net):
    """Forward hooks on every block's residual branch: how many ran in the last call."""
    calls = []
    hooks = [
        b.layers.register_forward_hook(lambda *a, i=i: calls.append(i))
        for i, b in enumerate(net.blocks)
    ]
    return calls, hooks


def test_block_subset_runs_exactly_k_blocks_forward_and_backward():
    torch.manual_seed(0)
    net = preact_resnet_cifar(3, in_channels=1)  # 9 blocks
    mode = BlockSubset(k=4)
    calls, _ = count_block_runs(net)
    seen = set()
    for _ in range(20):
        calls.clear()
        net.zero_grad(set_to_none=True)
        plan = mode.train_plan(net.n_blocks)
        net(torch.randn(4, 1, 8, 8), plan).sum().backward()
        assert len(calls) == len(set(calls)) == 4
        assert set(calls) == set(range(9)) - plan.deleted
        for i, block in enumerate(net.blocks):  # skipped blocks get no gradient at all
            has_grad = block.layers[0].weight.grad is not None
            assert has_grad == (i in calls)
        seen.update(calls)
    assert seen == set(range(9))  # uniform choice reaches every block


def test_block_subset_test_modes():
    resnet110 = preact_resnet_cifar(18)  # 54 blocks
    assert BlockSubset(k=23).eval_plan(54) is None
    assert BlockSubset(k=23, test_mode="rescale").eval_plan(54).residual_scale == pytest.approx(
        23 / 54
    )
    for k in (0, 55):
        with pytest.raises(ConfigError, match="outside 1..54"):
            BlockSubset(k=k).check(resnet110)
    with pytest.raises(ConfigError):
        BlockSubset(test_mode="sometimes")


def test_stochastic_depth_linear_decay_and_eval_is_full_network():
    mode = StochasticDepth(final_survival=0.5)
    probs = mode.drop_probs(54)
    assert probs[0] == pytest.approx(0.5 / 54) and probs[-1] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(probs, probs[1:]))
    assert mode.eval_plan(54) is None  # test time: every block, unscaled
    # one draw per block per step, at the block's rate (4,000 draws: a few standard errors)
    torch.manual_seed(0)
    dropped = torch.zeros(54)
    for _ in range(4000):
        for i in mode.train_plan(54).deleted:
            dropped[i] += 1
    assert torch.allclose(dropped / 4000, torch.tensor(probs, dtype=torch.float32), atol=0.03)
    torch.manual_seed(0)
    net = preact_resnet_cifar(3, in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    # training: a dropped block contributes its shortcut only (all dropped == all deleted)
    n = net.n_blocks
    all_dropped = net(x, Plan(drop_prob=(1.0,) * n))
    assert torch.allclose(all_dropped, net(x, Plan(deleted=frozenset(range(n)))), atol=1e-6)
    # one decision per block per mini-batch: with p = 0.5 the output differs between calls
    torch.manual_seed(1)
    outs = {tuple(net(x, Plan(drop_prob=(0.5,) * n)).flatten().tolist()) for _ in range(6)}
    assert len(outs) > 1
    with pytest.raises(ConfigError):
        StochasticDepth(final_survival=0.0)


def test_paper_lr_schedule():
    s = StepSchedule(0.1, [32000, 48000], 0.1, warmup_steps=400, warmup_lr=0.01)
    assert 0.1 * s(0) == pytest.approx(0.01) and 0.1 * s(399) == pytest.approx(0.01)
    assert 0.1 * s(400) == pytest.approx(0.1)
    assert 0.1 * s(32000) == pytest.approx(0.01)
    assert 0.1 * s(48000) == pytest.approx(0.001)


def test_recipe_builds_the_optimizer_each_module_configures():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    kw = dict(weight_decay=0.1, momentum=0.9, nesterov=False, betas=(0.9, 0.95), milestones=[2])
    kw |= dict(gamma=0.1, warmup_steps=1, warmup_lr=0.01)
    sgd = Recipe("sgd", 0.1, **kw).make_optimizer(net)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 0.1
    adamw = Recipe("adamw", 0.1, **kw).make_optimizer(net)
    decayed, free = adamw.param_groups  # matrices decay; biases and norm weights do not
    assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert len(free["params"]) == 3 and free["weight_decay"] == 0.0
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    for bad in (dict(optimizer="adam"), dict(lr=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(ConfigError, match="optim"):
            Recipe(**{"optimizer": "sgd", "lr": 0.1, **kw, **bad})


def quiet_trainer(root, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or sanity checks."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        **kwargs,
    )


class BlocksWithGradient(L.Callback):
    """After each backward pass: the blocks whose residual branch got a non-zero gradient."""

    def __init__(self):
        self.steps: list[set[int]] = []

    def on_after_backward(self, trainer, pl_module):
        def trained(block):
            branch = block.layers if hasattr(block, "layers") else block.layer  # ResNet / VGG
            return any(p.grad is not None and bool(p.grad.any()) for p in branch.parameters())

        self.steps.append({i for i, b in enumerate(pl_module.net.blocks) if trained(b)})


def fit_synthetic(mode, root, net=None, steps=12) -> tuple[L.Trainer, list[set[int]]]:
    L.seed_everything(0)
    dm = SyntheticDataModule(shape=(1, 8, 8), n_train=64, n_test=32, batch_size=32)
    net = net or preact_resnet_cifar(1, in_channels=1)  # 3 blocks
    module = Classifier(net, mode=mode, warmup_steps=0, lr=0.05)
    seen = BlocksWithGradient()
    trainer = quiet_trainer(root, max_steps=steps, callbacks=[seen])
    trainer.fit(module, dm)
    assert trainer.global_step == steps
    return trainer, seen.steps


def test_standard_training_trains_every_block_and_lowers_the_loss(tmp_path):
    trainer, steps = fit_synthetic(Standard(), tmp_path)
    assert steps == [{0, 1, 2}] * 12
    assert trainer.callback_metrics["train/loss"] < 2.3  # ln(10): better than chance


def test_block_subset_training_trains_k_blocks_per_step(tmp_path):
    _, steps = fit_synthetic(BlockSubset(k=2), tmp_path)
    assert all(len(s) == 2 for s in steps)
    assert len({frozenset(s) for s in steps}) > 1  # a new subset each step


def test_stochastic_depth_training_drops_blocks(tmp_path):
    # survival 5/6, 4/6, 3/6: in 12 steps all three run in only (5/6 * 4/6 * 3/6)^12 ~ 2e-7
    _, steps = fit_synthetic(StochasticDepth(final_survival=0.5), tmp_path)
    assert any(len(s) < 3 for s in steps) and all(s <= {0, 1, 2} for s in steps)
    dropped = [sum(i not in s for s in steps) for i in range(3)]
    assert dropped[0] <= dropped[2]  # the last block is dropped most often (p = 1/2)


def test_block_subset_trains_k_layers_of_a_plain_network(tmp_path):
    """VGG: a layer left out is the identity (as when it is deleted at test time)."""
    net = vgg15(width=8, stage_layers=(2, 1), in_channels=1)
    _, steps = fit_synthetic(BlockSubset(k=2), tmp_path, net=net, steps=4)
    assert all(len(s) == 2 for s in steps)


def test_modes_that_need_shortcuts_refuse_a_plain_network():
    net = vgg15(width=8, stage_layers=(2, 1), in_channels=1)
    with pytest.raises(ConfigError, match="model=vgg15.*training=standard"):
        Classifier(net, mode=StochasticDepth())
    with pytest.raises(ConfigError, match="test_mode=full"):
        Classifier(net, mode=BlockSubset(k=2, test_mode="rescale"))


@pytest.mark.slow
def test_cli_refuses_stochastic_depth_on_vgg_before_any_work(tmp_path):
    res = run_cli(
        "preset=quick",
        "model=vgg15",
        "training=stochastic_depth",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training=stochastic_depth") and "model=vgg15" in line
    assert not (tmp_path / "checkpoints").exists()


def test_modes_with_one_seed_see_the_same_data_and_augmentation(tmp_path):
    """Block subset with k = n runs every block each step: with the same seed it must train
    exactly like standard training, so the two arms differ only in the blocks they run."""

    def fit_once(mode):
        L.seed_everything(0)
        module = Classifier(preact_resnet_cifar(1, in_channels=1), mode=mode, warmup_steps=0)
        trainer = quiet_trainer(tmp_path, max_steps=25, limit_val_batches=0)  # 1.3 epochs
        trainer.fit(module, DigitsDataModule(batch_size=64, augment=True, padding=1))
        return module.state_dict()

    standard, all_blocks = fit_once(Standard()), fit_once(BlockSubset(k=3))
    assert all(torch.equal(standard[k], all_blocks[k]) for k in standard)


def test_same_seed_same_weights(tmp_path):
    def fit_once():
        L.seed_everything(0, workers=True)
        module = Classifier(preact_resnet_cifar(1, in_channels=1), mode=BlockSubset(k=2))
        trainer = quiet_trainer(tmp_path, max_steps=5, limit_val_batches=0)
        trainer.fit(module, DigitsDataModule(batch_size=32))
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    first, second = fit_once(), fit_once()
    assert torch.equal(first, second)


def test_blocks_per_step_recorded_in_metrics():
    """metrics.json's `k`: every block (standard), k (block subset), varying (stochastic depth)."""
    from src.training import BlockSubset, Standard, StochasticDepth

    assert Standard().blocks_per_step(54) == 54
    assert BlockSubset(k=23).blocks_per_step(54) == 23
    assert StochasticDepth().blocks_per_step(54) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_drawn_stochastic_depth_plan_equals_computing_every_branch(seed):
    """For a fixed draw, skipping the dropped branches gives what computing every branch and
    zeroing the dropped ones (x 1/survival for the kept) gives, outputs and gradients alike; the
    skipped branches get no gradient and their BatchNorm statistics stay as they were."""
    mode = StochasticDepth(final_survival=0.5)
    torch.manual_seed(seed)
    net = preact_resnet_cifar(3, in_channels=1).train()
    reference = copy.deepcopy(net)
    x = torch.randn(4, 1, 8, 8)
    plan = mode.train_plan(net.n_blocks)
    assert plan.deleted and len(plan.deleted) < net.n_blocks, "draw another seed"
    survival = [1 - p for p in mode.drop_probs(net.n_blocks)]
    out = net(x, plan)
    h = reference.stem(x)
    for i, block in enumerate(reference.blocks):  # every branch computed, dropped ones zeroed
        noise = 0.0 if i in plan.deleted else 1.0 / survival[i]
        h = block.merge(block.shortcut(h), block.residual(h) * noise)
    want = reference.head(h)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if block in plan.deleted and p.grad is None:
            continue  # skipped: no gradient at all (the reference has zeros or the shortcut's)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    for i, block in enumerate(net.blocks):  # a skipped branch's BatchNorm saw no batch
        if not block.downsampling:  # (a downsampling shortcut shares the pre-activation BN)
            bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert {int(m.num_batches_tracked) for m in bns} == {0 if i in plan.deleted else 1}
