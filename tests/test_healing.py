"""Healing (issue 20, Sec. 4): `heal` fine-tunes a copy of a network under one fixed plan, so the
deleted blocks never run and keep their parameters while the training loss falls, deterministic
under a seed; `training=pruned` is that plan as a training mode (train, validation and test),
its config passes the schema, and bad block ids are refused in one line."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from src import schema
from src.errors import ConfigError
from src.healing import heal, loss
from src.models import Plan, preact_resnet_cifar
from src.module import Classifier
from src.training import Pruned
from tests.conftest import run_cli
from tests.test_schema import CONF
from tests.test_training import fit_synthetic

DELETED = frozenset({1, 3})  # identity-shortcut blocks; 2 and 4 downsample


def toy():
    """A 6-block pre-act ResNet on 8x8 images and four fixed batches of random labels."""
    torch.manual_seed(0)
    net = preact_resnet_cifar(2, widths=(8, 16, 32), in_channels=1, num_classes=4)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
        for _ in range(4)
    ]
    return net, batches


def mean_loss(net, plan, batches) -> float:
    with torch.no_grad():
        net.eval()
        return sum(float(loss(net(x, plan), y)) for x, y in batches) / len(batches)


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_heal_lowers_the_loss_and_never_touches_the_deleted_blocks():
    net, batches = toy()
    plan = Plan(deleted=DELETED | {4})
    before, original = mean_loss(net, plan, batches), params(net)
    healed = heal(net, plan, batches, steps=40, lr=0.05)
    assert mean_loss(healed, plan, batches) < 0.7 * before
    for i in DELETED:  # never ran: weights and batch-norm statistics as they were
        block = f"blocks.{i}."
        assert all(
            torch.equal(v, original[k])
            for k, v in healed.state_dict().items()
            if k.startswith(block)
        )
    # block 4 downsamples: its skip (pre-activation + projection) runs and learns, its residual
    # convolutions do not
    after = healed.state_dict()
    assert all(
        torch.equal(after[k], original[k]) for k in original if k.startswith("blocks.4.layers")
    )
    assert not torch.equal(after["blocks.4.proj.weight"], original["blocks.4.proj.weight"])
    assert not torch.equal(after["blocks.0.layers.0.weight"], original["blocks.0.layers.0.weight"])
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())  # a copy


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_heal_is_deterministic_under_a_seed(optimizer):
    net, batches = toy()
    lr = 0.05 if optimizer == "sgd" else 1e-3
    # a random draw in the forward pass (dropout), which the seed decides
    net.blocks[0].layers[0].register_forward_hook(lambda m, i, o: torch.nn.functional.dropout(o))
    one, two = (
        heal(net, Plan(deleted=DELETED), batches, 5, lr=lr, optimizer=optimizer, seed=3)
        for _ in range(2)
    )
    three = heal(net, Plan(deleted=DELETED), batches, 5, lr=lr, optimizer=optimizer, seed=4)
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
    assert not all(torch.equal(v, three.state_dict()[k]) for k, v in one.state_dict().items())
    assert heal(net.eval(), Plan(), batches, 1).training is False  # in the given network's mode


def test_heal_takes_a_generator_or_a_data_module():
    from src.data import DigitsDataModule

    net, batches = toy()
    plan = Plan(deleted=DELETED)
    from_list = heal(net, plan, batches, 6, lr=0.05)
    from_generator = heal(net, plan, (b for b in batches), 6, lr=0.05)  # replayed after 4
    assert all(
        torch.equal(v, from_list.state_dict()[k]) for k, v in from_generator.state_dict().items()
    )
    digits = preact_resnet_cifar(1, widths=(4, 8, 16), in_channels=1)
    healed = heal(digits, Plan(deleted={1}), DigitsDataModule(batch_size=32), 2, lr=0.05)
    assert not torch.equal(healed.blocks[0].layers[0].weight, digits.blocks[0].layers[0].weight)


def test_heal_refuses_bad_input_in_one_line():
    net, batches = toy()
    cases = {
        "heal: block index 9 out of range: this network has blocks 0..5": (
            Plan(deleted=frozenset({9})),
            batches,
            1,
        ),
        "heal: no training batches given": (Plan(), [], 1),
        "heal: steps must be >= 0, got -1": (Plan(), batches, -1),
    }
    for said, (plan, data, steps) in cases.items():
        with pytest.raises(ConfigError) as err:
            heal(net, plan, data, steps)
        assert str(err.value) == said


def test_the_pruned_mode_runs_one_fixed_plan(tmp_path):
    mode = Pruned(deleted=[1])
    assert mode.train_plan(3) == mode.val_plan(3) == mode.eval_plan(3) == Plan(deleted={1})
    assert mode.blocks_per_step(3) == 2
    _, steps = fit_synthetic(mode, tmp_path)
    assert steps == [{0, 2}] * 12  # block 1 never gets a gradient


def test_the_pruned_mode_refuses_bad_blocks_in_one_line():
    with pytest.raises(ConfigError) as err:
        Classifier(preact_resnet_cifar(1), mode=Pruned(deleted=[0, 3]))
    assert str(err.value) == (
        "training.deleted: block 3 is out of range: this model has blocks 0..2"
    )
    for bad in ("abc", 3, [1.5], [True]):
        with pytest.raises(ConfigError, match="^training.deleted must be a list of block ids"):
            Pruned(deleted=bad)


def test_training_pruned_passes_the_schema_and_refuses_wrong_values():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=["training=pruned", "training.deleted=[1,4]", "preset=quick"]
        )
    schema.check(cfg)
    assert cfg.ddp_strategy == "ddp_find_unused_parameters_true"
    for value, said in (("abc", "a list"), ([-1], "an integer >= 0"), ([1.5], "a fraction")):
        bad = copy.deepcopy(cfg)
        with open_dict(bad):
            OmegaConf.update(bad, "training.deleted", value, merge=False)
        with pytest.raises(ConfigError) as err:
            schema.check(bad)
        line = str(err.value)
        assert line.startswith(f"training.deleted={value!r}") and said in line, line


@pytest.mark.slow
def test_cli_trains_without_the_deleted_blocks_and_refuses_a_bad_one(tmp_path):
    import json

    args = ["preset=quick", "model=resnet20", "training=pruned", "logger=csv"]
    run_cli(
        *args,
        "training.deleted=[1,4]",
        "trainer.max_steps=4",
        "optim.warmup_steps=1",
        "optim.milestones=[2,3]",
        f"hydra.run.dir={tmp_path}/ok",
    )
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["training"] == "pruned" and metrics["k"] == 7
    res = run_cli(*args, "training.deleted=[9]", f"hydra.run.dir={tmp_path}/bad", check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: training.deleted: block 9 is out of range: this model has blocks 0..8"
    )
