"""Exact signed decomposition g(lam) = sum_k lam^k G_k: both methods equal brute-force
enumeration of all 2^n paths, the polynomial reproduces Plan(grad_scale=lam), and the trained
network's eval plan (rescaled or deleted residual branches) is what gets decomposed."""

from __future__ import annotations

import pytest
import torch

from src.engines.decomposition import (
    decompose,
    enumerate_paths,
    interpolate,
    propagate,
    scaled_grad,
)
from src.engines.paths import gated_grad
from src.errors import ConfigError
from src.models import Plan
from src.models.preact_resnet import preact_resnet_cifar
from src.models.torchvision_resnet import torchvision_resnet
from tests.test_gradient_paths import _randomise_bn, batch, rescaled_by_hand


def tiny64(shortcut="B"):
    torch.manual_seed(0)
    return (
        _randomise_bn(preact_resnet_cifar(2, widths=(4, 8, 8), shortcut=shortcut)).double().eval()
    )


@pytest.mark.parametrize("wrt,shortcut", [("input", "A"), ("input", "B"), ("stem", "B")])
def test_propagate_and_interpolate_equal_enumeration(wrt, shortcut):
    net = tiny64(shortcut)
    x, y = batch()
    x = x.double()
    brute = enumerate_paths(net, x, y, wrt)
    torch.testing.assert_close(propagate(net, x, y, wrt), brute, rtol=1e-10, atol=1e-14)
    coeffs, cond = interpolate(net, x, y, wrt)
    torch.testing.assert_close(coeffs, brute, rtol=1e-7, atol=1e-11)
    assert cond < 1e4
    assert brute[3].abs().max() > 0


def test_polynomial_reproduces_backward_scaling():
    net = tiny64()
    x, y = batch()
    g = propagate(net, x.double(), y)
    for lam in (0.0, 0.3, 1.0, 2.5, -1.0):
        poly = sum(lam**k * g[k] for k in range(len(g)))
        torch.testing.assert_close(
            poly, scaled_grad(net, x.double(), y, lam), rtol=1e-9, atol=1e-13
        )


def test_post_activation_blocks():
    torch.manual_seed(0)
    net = _randomise_bn(torchvision_resnet("resnet18", num_classes=10)).double().eval()
    x, y = batch(1, (3, 16, 16))
    x = x.double()  # 9 reference backward passes (interpolation) instead of 2^8 (enumeration)
    coeffs, _ = interpolate(net, x, y)
    torch.testing.assert_close(propagate(net, x, y), coeffs, rtol=1e-7, atol=1e-12)


def test_decompose_runs_on_a_float64_copy():
    torch.manual_seed(0)
    net = preact_resnet_cifar(1, widths=(4, 8, 8)).train()
    x, y = batch()
    g = decompose(net, x, y, method="propagate")
    assert g.dtype == torch.float64 and g.shape == (4, *x.shape)
    assert net.training and next(net.parameters()).dtype == torch.float32
    torch.testing.assert_close(g, decompose(net, x, y, method="interpolate"))
    with pytest.raises(ConfigError):
        decompose(net, x, y, method="vandermonde")


def test_decomposition_of_the_rescaled_eval_plan_is_that_of_the_rescaled_network():
    net, (x, y) = tiny64(), batch()
    x = x.double()
    plan = Plan(residual_scale=0.5)  # training=block_subset training.k=3 test_mode=rescale
    g = decompose(net, x, y, plan=plan)
    torch.testing.assert_close(g, propagate(rescaled_by_hand(net, 0.5), x, y), rtol=1e-10, atol=0)
    torch.testing.assert_close(g, decompose(net, x, y, method="interpolate", plan=plan))
    torch.testing.assert_close(g.sum(0), gated_grad(net, x, y, plan), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(g.sum(0), gated_grad(net, x, y, Plan()))


def test_deleted_blocks_carry_no_path_length():
    net, (x, y) = tiny64(), batch()
    x = x.double()
    plan = Plan(deleted=frozenset({1, 4}), residual_scale=0.7)
    g = propagate(net, x, y, plan=plan)
    assert g.shape[0] == 7 and not g[5:].any()  # 4 blocks keep their residual branch
    torch.testing.assert_close(g, enumerate_paths(net, x, y, plan=plan), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g.sum(0), gated_grad(net, x, y, plan), rtol=1e-10, atol=1e-14)
