"""half_strength (CONTRIBUTING.md's worked example): one block's residual branch at half
strength equals a hand-scaled network, the engine restarts at that block, and the study's table
follows its metric."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

from src.analysis.half_strength import HalfStrength, scaled_plan
from src.engines.lesion import lesion_errors, lesion_logits
from src.errors import ConfigError
from src.models import FULL, Plan, preact_resnet_cifar, vgg15
from src.models.network import Block
from src.studies import registry
from tests.conftest import own_columns
from tests.test_lesion import _randomise_bn
from tests.test_studies import lm_run


class _Halved(nn.Module):
    """A block whose residual branch is multiplied by `factor`, written out."""

    def __init__(self, block: Block, factor: float):
        super().__init__()
        self.block, self.factor = block, factor

    def forward(self, x):
        return self.block.merge(self.block.shortcut(x), self.factor * self.block.residual(x))


def test_half_strength_equals_a_hand_scaled_network_and_restarts_at_its_block():
    torch.manual_seed(0)
    net = _randomise_bn(preact_resnet_cifar(blocks_per_stage=2, in_channels=1))
    x = torch.randn(6, 1, 8, 8)
    plans = [scaled_plan(FULL, net.n_blocks, i, 0.5) for i in range(net.n_blocks)]
    assert [net.restart(FULL, p) for p in plans] == list(range(net.n_blocks))
    with torch.inference_mode():
        got = list(lesion_logits(net, x, plans))[1:]
        for i, logits in enumerate(got):
            blocks = [_Halved(b, 0.5) if j == i else b for j, b in enumerate(net.blocks)]
            want = nn.Sequential(net.stem, *blocks, net.head)(x)
            assert torch.allclose(logits, want, atol=1e-5), i
    # on top of the eval plan's own scales
    base = Plan(branch_scale=(2.0,) * net.n_blocks)
    assert scaled_plan(base, net.n_blocks, 1, 0.5).branch_scale == (2.0, 1.0, *(2.0,) * 4)


def test_half_strength_on_a_language_model_writes_loss_rows(tmp_path):
    trainer, module, data = lm_run(tmp_path)
    HalfStrength(progress=False, blocks=[0, 3]).analyse(trainer, module)
    rows = pd.read_csv(tmp_path / "analysis" / "half_strength.csv")
    assert own_columns(rows.iloc[0].to_dict()) == [
        *("block", "stage", "downsampling", "layer", "kind"),
        *("loss", "perplexity", "baseline", "baseline_perplexity", "bn"),
    ]
    assert own_columns(rows.iloc[0].to_dict())[:3] == list(registry()["half_strength"].columns)
    assert rows.block.tolist() == [0, 3] and rows.kind.tolist() == ["attn", "mlp"]
    plans = [scaled_plan(FULL, 4, i, 0.5) for i in (0, 3)]
    _, want = lesion_errors(module.net, plans, data, metric="loss", reuse=False)
    assert rows.loss.tolist() == pytest.approx(want, rel=1e-6)
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["half_strength"]["factor"] == 0.5
    assert (tmp_path / "analysis" / "half_strength.png").stat().st_size > 0


@pytest.mark.parametrize(
    "net, study, match",
    [
        (vgg15(width=8, stage_layers=(1, 1, 1), in_channels=1), HalfStrength(), "plain layers"),
        (preact_resnet_cifar(blocks_per_stage=2), HalfStrength(blocks=[6]), "0..5"),
    ],
)
def test_half_strength_refuses_what_it_cannot_scale(net, study, match):
    with pytest.raises(ConfigError, match=match) as err:
        study.check(net)
    assert "\n" not in str(err.value)
