"""Batched tensor CIFAR augmentation vs torchvision's per-image transforms, side by side.

    python benchmarks/augment.py [--images 10000] [--repeats 3]

Both produce augmented float batches from CIFAR-shaped uint8 images (pad 4, random 32x32 crop,
horizontal flip): per image through PIL (what torchvision's CIFAR dataset does), per image on
uint8 tensors (transforms.v2), and whole batches with src.data.augment.random_crop_flip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data.augment import normalize, random_crop_flip  # noqa: E402

MEAN, STD = torch.tensor((0.4914, 0.4822, 0.4465)), torch.tensor((0.2470, 0.2435, 0.2616))


def per_image_pil(images: np.ndarray, batch: int) -> None:
    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN.tolist(), STD.tolist()),
        ]
    )
    for s in range(0, len(images), batch):
        torch.stack([tf(Image.fromarray(im)) for im in images[s : s + batch]])


def per_image_tensor(images: torch.Tensor, batch: int) -> None:
    tf = T2.Compose(
        [
            T2.RandomCrop(32, padding=4),
            T2.RandomHorizontalFlip(),
            T2.ToDtype(torch.float32, scale=True),
            T2.Normalize(MEAN.tolist(), STD.tolist()),
        ]
    )
    for s in range(0, len(images), batch):
        torch.stack([tf(im) for im in images[s : s + batch]])


def batched(images: torch.Tensor, batch: int) -> None:
    for s in range(0, len(images), batch):
        normalize(random_crop_flip(images[s : s + batch], 4), MEAN, STD, 255.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: like one data-loader worker; avoids oversubscription)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    runs = {
        "per-image PIL (torchvision CIFAR pipeline)": lambda: per_image_pil(hwc, args.batch),
        "per-image tensor (transforms.v2)": lambda: per_image_tensor(chw, args.batch),
        "batched tensor ops (ours)": lambda: batched(chw, args.batch),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rate = {k: args.images / statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images")
    for k, r in rate.items():
        print(f"{k:45s} {r:12,.0f} images/s")
    ours = rate["batched tensor ops (ours)"]
    pil = rate["per-image PIL (torchvision CIFAR pipeline)"]
    print(f"ratio vs per-image PIL:    {ours / pil:.1f}x")
    print(f"ratio vs per-image tensor: {ours / rate['per-image tensor (transforms.v2)']:.1f}x")


if __name__ == "__main__":
    main()
