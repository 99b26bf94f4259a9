"""Stochastic depth that skips compute vs computing every branch (Huang et al.'s saving).

    python benchmarks/stochastic_depth.py [--blocks 18] [--batch 64] [--steps 8] [--repeats 3]

One SGD training step (forward, backward, update) of pre-act ResNet-110 (`--blocks` per stage)
on CIFAR-shaped synthetic batches, survival decaying linearly to 0.5: the drawn plan the training
mode uses (`StochasticDepth.train_plan`: a dropped branch does not run) against the reference that
computes every branch and zeroes the dropped ones (`Plan(drop_prob=...)`,
torchvision.ops.stochastic_depth). Runs are interleaved; the median per-step times are compared:
ratio = drawn / every branch (goal <= 0.8; about a quarter of the residual compute is dropped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models import Plan, preact_resnet_cifar  # noqa: E402
from src.training import StochasticDepth  # noqa: E402


def step_time(net, opt, x, y, plan_of, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(net(x, plan_of()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=18, help="blocks per stage (18: ResNet-110)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    net = preact_resnet_cifar(args.blocks).to(args.device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    mode = StochasticDepth(final_survival=0.5)
    n = net.n_blocks
    variants = {
        "every branch": lambda: Plan(drop_prob=mode.drop_probs(n)),
        "drawn plan": lambda: mode.train_plan(n),
    }
    results = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, plan_of in variants.items():
            results[name].append(step_time(net, opt, x, y, plan_of, args.steps))
            print(f"repeat {r}: {name:>12}: {results[name][-1] * 1e3:8.1f} ms/step", flush=True)
    every, drawn = (statistics.median(results[k]) for k in ("every branch", "drawn plan"))
    print(
        f"{n} blocks, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads: "
        f"every branch {every * 1e3:.1f} ms/step, drawn plan {drawn * 1e3:.1f} ms/step, "
        f"ratio {drawn / every:.3f} (goal <= 0.8)"
    )


if __name__ == "__main__":
    main()
