"""One CPU training step in fp32, channels_last and bf16 autocast: what src/precision.py chooses.

    python benchmarks/precision.py [--depths 110,20] [--shapes 32x64,28x128,8x64] [--repeats 4]

One SGD step (forward and loss under `torch.autocast` for the bf16 arms, as Lightning's
`bf16-mixed`; backward; update of the fp32 weights) of pre-act ResNet-110 and ResNet-20 on
synthetic batches: `--shapes` lists side x batch (32x32 batch 64: CIFAR; 28x28 batch 128: the
medium preset's Fashion-MNIST; 8x8 batch 64: the quick preset's digits; 3 channels at 32, else
1). The channels_last arms convert the network only, as `src.run` does; the batch stays NCHW.
`--compile` adds `compile_blocks()` arms (the time of their first step, which compiles, is
printed apart). The arms alternate within each repeat (the order rotates); per arm the fastest
and the median repeat of the median step time, and their ratios to fp32 (goal <= 0.5 at 28 and 32
on a CPU with native bf16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src import precision  # noqa: E402
from src.models import preact_resnet_cifar  # noqa: E402

ARMS = {  # name -> (bf16 autocast, channels_last, compile_blocks)
    "fp32": (False, False, False),
    "fp32+channels_last": (False, True, False),
    "bf16": (True, False, False),
    "bf16+channels_last": (True, True, False),
}
COMPILED = {
    "fp32+compile": (False, False, True),
    "bf16+channels_last+compile": (True, True, True),
}


class Arm:
    def __init__(self, net, bf16: bool, channels_last: bool, compiled: bool):
        self.net, self.bf16 = copy.deepcopy(net).train(), bf16
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compiled:
            self.net.compile_blocks()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.first: float | None = None  # seconds of the first step (compiles, if compiled)

    def step(self, x, y) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            loss = F.cross_entropy(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start

    def timed(self, x, y, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            t = self.step(x, y)
            self.first = t if self.first is None else self.first
        return statistics.median(self.step(x, y) for _ in range(steps))


def bench(depth: int, side: int, batch: int, arms: dict, args) -> dict[str, list[float]]:
    torch.manual_seed(0)
    channels = 3 if side == 32 else 1
    net = preact_resnet_cifar((depth - 2) // 6, in_channels=channels)
    x, y = torch.randn(batch, channels, side, side), torch.randint(0, 10, (batch,))
    built = {name: Arm(net, *spec) for name, spec in arms.items()}
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(built[name].timed(x, y, args.steps, args.warmup if r == 0 else 1))
    for name, arm in built.items():
        if arms[name][2]:
            print(f"  {name}: first step (compiles) {arm.first:.1f} s", flush=True)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="110,20", help="ResNet depths (6n+2)")
    p.add_argument("--shapes", default="32x64,28x128,8x64", help="side x batch, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm and repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first repeat")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated; fp32 always runs")
    p.add_argument("--compile", action="store_true", help="add the compile_blocks() arms")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["fp32", *(a for a in args.arms.split(",") if a != "fp32")]
    if set(names) - set(ARMS):
        p.error(f"--arms: choose from {', '.join(ARMS)}")
    arms = {name: ARMS[name] for name in names} | (COMPILED if args.compile else {})
    native = precision.native_bf16()
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{native or 'no'}; torch {torch.__version__}, {args.threads} threads; "
        f"median of {args.steps} steps, {args.repeats} interleaved repeats"
    )
    for depth in (int(d) for d in args.depths.split(",")):
        for shape in args.shapes.split(","):
            side, batch = (int(v) for v in shape.split("x"))
            print(f"ResNet-{depth}, {side}x{side}, batch {batch}", flush=True)
            times = bench(depth, side, batch, arms, args)
            best, mid = min(times["fp32"]), statistics.median(times["fp32"])
            for name, ts in times.items():
                print(
                    f"  {name:28s} fastest {min(ts) * 1e3:8.1f} ms  ratio {min(ts) / best:5.2f}"
                    f"   median {statistics.median(ts) * 1e3:8.1f} ms"
                    f"  ratio {statistics.median(ts) / mid:5.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
