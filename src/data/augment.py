"""CIFAR augmentation (pad 4, random 32x32 crop, horizontal flip) on whole batches as tensor ops.

Works on uint8 or float batches on any device, so the data can live on the GPU and the crop never
goes through PIL one image at a time (see benchmarks/augment.py for the ratio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(
    x: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Zero-pad every image by `padding`, crop back to its size at a random offset per image,
    and mirror a random half of the images. x: (N, C, H, W), any dtype and device.

    Two gathers do it all: rows at each image's offset, then columns at its offset, read in
    reverse for the mirrored images."""
    n, c, h, w = x.shape
    dev = x.device
    p = max(int(padding), 0)

    def draw(high: int) -> Tensor:  # on the generator's device: no copy when it is the batch's
        where = dev if generator is None else generator.device
        return torch.randint(0, high, (n,), generator=generator, device=where).to(dev)

    oy, ox = draw(2 * p + 1), draw(2 * p + 1)
    mirror = draw(2).bool() if flip else torch.zeros(n, dtype=torch.bool, device=dev)
    if p > 0:
        x = F.pad(x, (p, p, p, p))
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        x = x.gather(2, rows.expand(n, c, h, w + 2 * p))
    ar = torch.arange(w, device=dev)
    cols = ox[:, None] + torch.where(mirror[:, None], w - 1 - ar, ar)
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def normalize(x: Tensor, mean: Tensor, std: Tensor, scale: float) -> Tensor:
    """uint8/float batch -> float32 normalised with per-channel mean/std (in [0, 1] units).
    `mean`/`std` already on the batch's device cost no copy (see `Normalizer`)."""
    std = std.to(x.device)[None, :, None, None]
    bias = -mean.to(x.device)[None, :, None, None] / std
    return torch.addcmul(bias, x.float(), 1.0 / (scale * std))


class Normalizer:
    """`normalize` with the per-channel statistics kept on each device they were used on, so a
    training step on a GPU makes no host-to-device copy for them."""

    def __init__(self, mean, std, scale: float):
        self.mean, self.std, self.scale = tuple(mean), tuple(std), float(scale)
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if x.device not in self._on:
            self._on[x.device] = (
                torch.tensor(self.mean, device=x.device),
                torch.tensor(self.std, device=x.device),
            )
        return normalize(x, *self._on[x.device], self.scale)
