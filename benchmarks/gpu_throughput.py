"""ResNet-110 training throughput on CIFAR-shaped data held on the device, and the projected time
of the paper's full recipe (164 epochs = 64k iterations at batch 128).

    python benchmarks/gpu_throughput.py                       # CUDA: bf16, channels_last
    python benchmarks/gpu_throughput.py --compile             # + torch.compile
    python benchmarks/gpu_throughput.py --device cpu --steps 3 --batch 8 --images 256  # smoke test

The training step is the recipe's own (SGD momentum 0.9, weight decay 1e-4, cross-entropy) on
uint8 images that live on the device: each batch is gathered by random indices, padded-cropped and
flipped with src.data.augment.random_crop_flip, normalised, then run under bf16 autocast in
channels_last. The data are random (throughput does not depend on pixel values); Lightning's loop
overhead is not included. Prints images/s and the projected recipe time; `--json` writes both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data.augment import normalize, random_crop_flip  # noqa: E402
from src.models import preact_resnet_cifar  # noqa: E402

RECIPE_STEPS, RECIPE_BATCH = 64_000, 128  # ~164 epochs of CIFAR-10's 50k training images
MEAN, STD = torch.tensor((0.4914, 0.4822, 0.4465)), torch.tensor((0.2470, 0.2435, 0.2616))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200, help="timed training steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (and compilation)")
    p.add_argument("--batch", type=int, default=RECIPE_BATCH)
    p.add_argument("--images", type=int, default=50_000, help="images held on the device")
    p.add_argument("--blocks-per-stage", type=int, default=18, help="18: ResNet-110")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="default: bf16 autocast on CUDA, fp32 on CPU (CPU bf16 convolutions are slow)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.images,), device=device)

    net = preact_resnet_cifar(blocks_per_stage=args.blocks_per_stage).to(device)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        net.parameters(),
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    model = torch.compile(net) if args.compile else net

    def step() -> None:
        idx = torch.randint(0, args.images, (args.batch,), device=device)
        x = random_crop_flip(images[idx])
        x = normalize(x, MEAN, STD, 255.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    ips = args.steps * args.batch / seconds
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "blocks_per_stage": args.blocks_per_stage,
        "batch": args.batch,
        "steps": args.steps,
        "bf16": bf16,
        "compile": args.compile,
        "ms_per_step": 1000 * seconds / args.steps,
        "images_per_s": ips,
        "recipe_minutes": RECIPE_STEPS * RECIPE_BATCH / ips / 60,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(
        f"{result['device']}: ResNet-{6 * args.blocks_per_stage + 2}, batch {args.batch}, "
        f"bf16={result['bf16']}, compile={args.compile}: {result['images_per_s']:.0f} images/s "
        f"({result['ms_per_step']:.1f} ms/step); the 164-epoch recipe ({RECIPE_STEPS} x "
        f"{RECIPE_BATCH}) would take {result['recipe_minutes']:.1f} min"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
