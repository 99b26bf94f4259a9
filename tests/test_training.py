"""Training modes: block subset runs exactly k blocks (counted), stochastic depth schedule,
the paper's lr schedule, and one real training step through the LightningModule."""

import lightning as L
import pytest
import torch

from src.errors import ConfigError
from src.models import Plan, preact_resnet_cifar
from src.module import Classifier, StepSchedule
from src.training import BlockSubset, Standard, StochasticDepth


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
    assert BlockSubset(k=23).eval_plan(54) is None
    assert BlockSubset(k=23, test_mode="rescale").eval_plan(54).residual_scale == pytest.approx(
        23 / 54
    )
    for k in (0, 55):
        with pytest.raises(ConfigError, match="outside 1..54"):
            BlockSubset(k=k).check(54)
    with pytest.raises(ConfigError):
        BlockSubset(test_mode="sometimes")


def test_stochastic_depth_linear_decay_and_eval_is_full_network():
    mode = StochasticDepth(final_survival=0.5)
    probs = mode.drop_probs(54)
    assert probs[0] == pytest.approx(0.5 / 54) and probs[-1] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(probs, probs[1:]))
    torch.manual_seed(0)
    net = preact_resnet_cifar(3, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(net(x, mode.train_plan(net.n_blocks)), net(x), atol=1e-6)
    # training: a dropped block contributes its shortcut only (all dropped == all deleted)
    net.train()
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


@pytest.mark.parametrize("mode", [Standard(), StochasticDepth(), BlockSubset(k=2)])
def test_a_training_step_through_lightning_lowers_the_loss(mode, tmp_path):
    L.seed_everything(0)
    from src.data import SyntheticDataModule

    dm = SyntheticDataModule(shape=(1, 8, 8), n_train=64, n_test=32, batch_size=32)
    module = Classifier(preact_resnet_cifar(1, in_channels=1), mode=mode, warmup_steps=0, lr=0.05)
    trainer = quiet_trainer(tmp_path, max_steps=12)
    trainer.fit(module, dm)
    assert trainer.global_step == 12
    assert trainer.callback_metrics["train/loss"] < 2.3  # ln(10): better than chance


def test_same_seed_same_weights(tmp_path):
    from src.data import DigitsDataModule

    def fit_once():
        L.seed_everything(0, workers=True)
        module = Classifier(preact_resnet_cifar(1, in_channels=1), mode=BlockSubset(k=2))
        trainer = quiet_trainer(tmp_path, max_steps=5, limit_val_batches=0)
        trainer.fit(module, DigitsDataModule(batch_size=32))
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    first, second = fit_once(), fit_once()
    assert torch.equal(first, second)
