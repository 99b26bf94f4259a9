"""Models: sizes of the paper's networks, and the plan interface (fused forward == branches)."""

import pytest
import torch
import torchvision
from torch import nn

from src.models import (
    Plan,
    count_parameters,
    preact_resnet_cifar,
    preact_resnet_imagenet,
    torchvision_resnet,
    vgg15,
)


def weight_layers(net: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())


def test_resnet110_has_54_blocks_and_1_73M_parameters():
    net = preact_resnet_cifar()
    assert net.n_blocks == 54
    assert 1.72e6 < count_parameters(net) < 1.74e6
    # 110 layers = 1 stem conv + 2 convs x 54 blocks + 1 fc (+ 2 projection shortcuts, type B)
    assert weight_layers(net) == 110 + 2
    assert weight_layers(preact_resnet_cifar(shortcut="A")) == 110
    assert [b["downsampling"] for b in net.block_info()].count(True) == 2


def test_resnet200_has_66_bottleneck_blocks():
    net = preact_resnet_imagenet()
    assert net.n_blocks == 66
    assert 64e6 < count_parameters(net) < 65.5e6
    assert sum(b["downsampling"] for b in net.block_info()) == 4  # one projection per stage


def test_vgg15_has_15_weight_layers_of_128_channels():
    net = vgg15()
    assert weight_layers(net) == 15
    assert net.n_blocks == 13
    widths = {m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {128}


@pytest.mark.parametrize("arch,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_torchvision_adapter_keeps_the_model(arch, blocks):
    torch.manual_seed(0)
    net = torchvision_resnet(arch, num_classes=10).eval()
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(num_classes=10).eval()
    assert net.n_blocks == blocks
    assert count_parameters(net) == count_parameters(ref)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(net(x), ref(x), atol=1e-5)


def test_unknown_shortcut_and_bad_sizes_raise():
    with pytest.raises(ValueError, match="shortcut"):
        preact_resnet_cifar(blocks_per_stage=1, shortcut="C")
    with pytest.raises(ValueError, match="positive"):
        preact_resnet_cifar(blocks_per_stage=0)
    with pytest.raises(ValueError, match="arch"):
        torchvision_resnet("resnet19")


NETS = {
    "preact_B": lambda: preact_resnet_cifar(2, in_channels=1),
    "preact_A": lambda: preact_resnet_cifar(2, in_channels=1, shortcut="A"),
    "bottleneck": lambda: preact_resnet_imagenet((1, 2, 1, 1), width=8, in_channels=1),
    "torchvision": lambda: torchvision_resnet("resnet18", num_classes=10),
}


@pytest.mark.parametrize("name", NETS)
def test_fused_forward_equals_shortcut_plus_residual(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    x = torch.randn(3, 3 if name == "torchvision" else 1, 32, 32)
    # grad_scale=1 forces the branch-by-branch path: shortcut(x) and residual(x) merged
    assert torch.allclose(net(x), net(x, Plan(grad_scale=1.0)), atol=1e-5)
    cache = net.block_inputs(x)
    assert len(cache) == net.n_blocks + 1
    assert torch.allclose(net.head(cache[-1]), net(x), atol=1e-5)


def test_deleting_a_block_keeps_its_shortcut():
    torch.manual_seed(0)
    net = preact_resnet_cifar(2, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    for i in range(net.n_blocks):
        h = net.stem(x)
        for j, b in enumerate(net.blocks):
            h = b.shortcut(h) if j == i else b(h)
        assert torch.allclose(net(x, Plan(deleted=frozenset({i}))), net.head(h), atol=1e-6)


def test_plan_rejects_out_of_range_blocks():
    with pytest.raises(ValueError, match="out of range"):
        Plan(deleted=frozenset({9})).validate(9)


def test_grad_path_gates_the_backward_pass_only():
    torch.manual_seed(0)
    net = preact_resnet_cifar(1, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    out_all = net(x)
    out_path = net(x, Plan(grad_path=frozenset({0})))
    assert torch.allclose(out_all, out_path, atol=1e-6)  # same forward
    (g_all,) = torch.autograd.grad(out_all.sum(), x)
    (g_path,) = torch.autograd.grad(out_path.sum(), x)
    assert not torch.allclose(g_all, g_path)
    # lambda = 1 changes nothing, lambda = 0 leaves only the all-shortcut path
    (g_one,) = torch.autograd.grad(net(x, Plan(grad_scale=1.0)).sum(), x)
    (g_zero,) = torch.autograd.grad(net(x, Plan(grad_scale=0.0)).sum(), x)
    (g_empty,) = torch.autograd.grad(net(x, Plan(grad_path=frozenset())).sum(), x)
    assert torch.allclose(g_one, g_all, atol=1e-6)
    assert torch.allclose(g_zero, g_empty, atol=1e-6)


def test_compiled_blocks_serve_every_plan_without_recompiling():
    """`Network.compile_blocks`: the same outputs as eager, and a new plan (deletions, orders,
    scales, block subsets) adds no graph once each block type and shape has been compiled."""
    import random

    from torch._dynamo.utils import counters

    from src.models.network import Plan

    torch.manual_seed(0)
    net = preact_resnet_cifar(blocks_per_stage=3, in_channels=1).eval()
    x = torch.randn(4, 1, 8, 8)
    rng = random.Random(0)

    def plans(n):
        for _ in range(n):
            order = list(range(9))
            rng.shuffle(order[1:3])
            yield Plan(deleted=frozenset(rng.sample(range(9), 3)), order=tuple(order))
        yield Plan(residual_scale=0.5)

    first = list(plans(3))
    eager = [net(x, p) for p in first]
    net.compile_blocks(backend="eager")
    counters.clear()
    with torch.no_grad():
        assert all(torch.equal(net(x, p), e) for p, e in zip(first, eager))
        graphs = counters["stats"]["unique_graphs"]
        for p in plans(20):
            net(x, p)
    assert 0 < graphs == counters["stats"]["unique_graphs"]
