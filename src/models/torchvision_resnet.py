"""torchvision's resnet18 ... resnet152 seen through the block interface (paper Fig. 4 on any
ImageNet ResNet the user has weights for).

torchvision blocks are post-activation: y = relu(shortcut(x) + residual(x)). Deleting a block
keeps relu(shortcut(x)) (its `downsample` projection where it has one).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from src.models.adapt import adapt, register
from src.models.network import Block, Network

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class TorchvisionBlock(Block):
    """Adapter around a torchvision BasicBlock/Bottleneck; owns the wrapped block's modules."""

    def __init__(self, block: nn.Module, stage: int):
        super().__init__()
        self.block = block
        self.stage = stage
        self.downsampling = block.downsample is not None
        convs = [n for n, _ in block.named_children() if n.startswith("conv")]
        self._names = [(f"conv{i}", f"bn{i}") for i in range(1, len(convs) + 1)]

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.block.downsample is None else self.block.downsample(x)

    def residual(self, x: Tensor) -> Tensor:
        out = x
        for j, (conv, bn) in enumerate(self._names):
            out = getattr(self.block, bn)(getattr(self.block, conv)(out))
            if j < len(self._names) - 1:
                out = self.block.relu(out)
        return out

    def merge(self, s: Tensor, r: Tensor) -> Tensor:
        return torch.relu(s + r)

    def skip(self, x: Tensor) -> Tensor:
        return torch.relu(self.shortcut(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


@register(
    "torchvision ResNet",
    "torchvision",
    ("ResNet",),
    "one block per BasicBlock / Bottleneck (post-activation: deleting keeps relu(shortcut))",
)
def resnet_network(tv: torchvision.models.ResNet) -> Network:
    """A torchvision ResNet as a `Network` sharing its modules."""
    stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
    blocks = [
        TorchvisionBlock(b, stage)
        for stage, layer in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4))
        for b in layer
    ]
    return Network(stem, blocks, nn.Sequential(tv.avgpool, nn.Flatten(), tv.fc))


def torchvision_resnet(
    arch: str = "resnet50",
    num_classes: int = 1000,
    weights: str | None = None,
    in_channels: int = 3,
) -> Network:
    """Build `arch` and optionally load a local state-dict file (no download happens here).
    `in_channels` other than 3 gets a fresh first convolution (e.g. 1-channel digits)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision arch {arch!r}: choose one of {', '.join(ARCHS)}")
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file {path} not found: pass model.weights=<path to a {arch} state dict>"
            )
        tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if in_channels != 3:
        tv.conv1 = nn.Conv2d(in_channels, tv.conv1.out_channels, 7, 2, 3, bias=False)
    return adapt(tv)
