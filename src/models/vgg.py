"""The paper's plain VGG (Sec. 4.1, Fig. 3): 15 weight layers, 128 channels in every conv layer,
so that any middle layer can be deleted. Layer 1 (stem conv) and layer 15 (classifier) stay; the
13 middle conv-BN-ReLU layers are the deletable blocks. A layer that ends a stage owns the 2x2
max-pool after it; deleting it keeps the pool (the plain counterpart of a downsampling shortcut).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from torch import Tensor, nn

from src.models.network import Block, Network
from src.schema import POSITIVE


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class PlainLayer(Block):
    """A VGG layer as a block with no shortcut: deleting it is the identity (keeping its pool)."""

    has_shortcut = False

    def __init__(self, width: int, pool: bool, stage: int):
        super().__init__()
        self.layer = _conv_bn_relu(width, width)
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if pool else nn.Identity()
        self.downsampling = pool
        self.stage = stage

    def residual(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def skip(self, x: Tensor) -> Tensor:
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layer(x))


def vgg15(
    width: Annotated[int, POSITIVE] = 128,
    stage_layers: Sequence[Annotated[int, POSITIVE]] = (4, 4, 5),
    in_channels: int = 3,
    num_classes: int = 10,
) -> Network:
    """Stem conv + sum(stage_layers) plain layers + linear classifier (default: 1+13+1 = 15)."""
    if width < 1 or in_channels < 1 or num_classes < 1 or any(n < 1 for n in stage_layers):
        raise ValueError(
            "vgg15 sizes (width, stage_layers, in_channels, num_classes) must be positive"
        )
    blocks = []
    for stage, n in enumerate(stage_layers):
        last_stage = stage == len(stage_layers) - 1
        for j in range(n):
            blocks.append(PlainLayer(width, pool=(j == n - 1 and not last_stage), stage=stage))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    net = Network(_conv_bn_relu(in_channels, width), blocks, head)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net
