"""Pre-activation ResNets (He et al. 2016, "Identity Mappings"), the networks of paper Sec. 4.

- CIFAR: 3 stages of basic blocks (16/32/64 channels); ResNet-110 = 18 blocks per stage = 54.
- ImageNet: 4 stages of bottleneck blocks; ResNet-200 = 3/24/36/3 = 66 blocks.

Shortcut type "B" (default, as in fb.resnet.torch's pre-act models the paper used): a 1x1
projection fed by the block's shared pre-activation (BN-ReLU) where the shape changes, identity
elsewhere. Type "A": stride + zero channel padding of the raw input, no parameters.
Deleting a block keeps its shortcut (and, for type B, the pre-activation feeding it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from src.models.network import Block, Network
from src.schema import POSITIVE

Shortcut = Literal["A", "B"]  # B: 1x1 projection where the shape changes; A: stride + zero-pad


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _preact(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=False))


class PreActBlock(Block):
    """Pre-activation basic (two 3x3) or bottleneck (1x1-3x3-1x1) residual block."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        bottleneck: bool = False,
        shortcut: str = "B",
        stage: int = 0,
    ):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut type must be 'A' or 'B', got {shortcut!r}")
        self.stage = stage
        self.stride = stride
        self.cin, self.cout = cin, cout
        self.downsampling = stride != 1 or cin != cout
        self.shortcut_type = shortcut
        self.pre = _preact(cin)
        if bottleneck:
            mid = cout // 4
            self.layers = nn.Sequential(
                _conv(cin, mid, 1),
                *_preact(mid),
                _conv(mid, mid, 3, stride),
                *_preact(mid),
                _conv(mid, cout, 1),
            )
        else:
            self.layers = nn.Sequential(
                _conv(cin, cout, 3, stride), *_preact(cout), _conv(cout, cout, 3)
            )
        self.proj = _conv(cin, cout, 1, stride) if self.downsampling and shortcut == "B" else None

    def _pad_shortcut(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))

    def shortcut(self, x: Tensor) -> Tensor:
        if not self.downsampling:
            return x
        if self.proj is not None:
            return self.proj(self.pre(x))
        return self._pad_shortcut(x)

    def residual(self, x: Tensor) -> Tensor:
        return self.layers(self.pre(x))

    def forward(self, x: Tensor) -> Tensor:
        a = self.pre(x)
        if self.proj is not None:
            return self.proj(a) + self.layers(a)
        return self.shortcut(x) + self.layers(a)


def _head(c: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        *_preact(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)
    )


def _init(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stages(widths, depths, first_stride: int, bottleneck: bool, shortcut: str, cin: int):
    blocks = []
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for j in range(depth):
            stride = (first_stride if stage == 0 else 2) if j == 0 else 1
            blocks.append(PreActBlock(cin, width, stride, bottleneck, shortcut, stage))
            cin = width
    return blocks, cin


def _check_positive(**sizes) -> None:
    for name, value in sizes.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(int(v) < 1 for v in values):
            raise ValueError(f"{name} must be positive, got {value}")


def preact_resnet_cifar(
    blocks_per_stage: Annotated[int, POSITIVE] = 18,
    widths: Sequence[Annotated[int, POSITIVE]] = (16, 32, 64),
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: Shortcut = "B",
) -> Network:
    """Pre-act ResNet for 32x32 inputs: 6n+2 layers (n=18: ResNet-110, 54 blocks)."""
    _check_positive(
        blocks_per_stage=blocks_per_stage,
        widths=widths,
        in_channels=in_channels,
        num_classes=num_classes,
    )
    stem = _conv(in_channels, widths[0], 3)
    blocks, c = _stages(widths, [blocks_per_stage] * len(widths), 1, False, shortcut, widths[0])
    net = Network(stem, blocks, _head(c, num_classes))
    _init(net)
    return net


def preact_resnet_imagenet(
    blocks: Sequence[Annotated[int, POSITIVE]] = (3, 24, 36, 3),
    width: Annotated[int, POSITIVE] = 64,
    in_channels: int = 3,
    num_classes: int = 1000,
    shortcut: Shortcut = "B",
) -> Network:
    """Pre-act bottleneck ResNet for ImageNet (3/24/36/3: ResNet-200, 66 blocks)."""
    _check_positive(blocks=blocks, width=width, in_channels=in_channels, num_classes=num_classes)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        *_preact(width),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    widths = [width * 4 * 2**s for s in range(len(blocks))]
    body, c = _stages(widths, list(blocks), 1, True, shortcut, width)
    net = Network(stem, body, _head(c, num_classes))
    _init(net)
    return net
