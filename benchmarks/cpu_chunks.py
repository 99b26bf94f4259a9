"""CPU lesion evaluation of one large test batch, whole vs split by the engine's activation cap
(`CPU_ACTIVATION_BYTES` in src/engines/lesion.py), in one run.

    python benchmarks/cpu_chunks.py [--n-test 1000] [--depths 110] [--lesions 2] [--repeats 3] \
        [--threads N] [--cap BYTES]

Pre-act ResNet-110 (`--depths 110,20` adds ResNet-20) on 1x28x28 random images (Fashion-MNIST's
shape) with random labels: `lesion_errors` over the unlesioned network and `--lesions` single
deletions (blocks spread evenly over the network) on all `--n-test` images given as one batch,
once with the cap off (`CPU_ACTIVATION_BYTES = None`: one batch of N) and once with the cap
(default: the engine's 4 MiB, so micro-batches of 4 MiB // the largest block input per example).
On large eval batches glibc serves every activation with a fresh mmap and unmaps it on free, so
each layer pays page faults: sys time close to user time. The two arms alternate within each
repeat (the order rotates) and the fastest of `--repeats` is kept for each; per arm the wall
time, this process's CPU user and sys time and minor page faults (`resource.getrusage`) of that
repeat, the largest batch the engine ran through the network (checked: N whole, at most the
micro-batch capped), and the ratios capped / whole. Both arms must give identical errors (the
counts are per example); the script checks it on every repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import src.engines.lesion as engine  # noqa: E402
from src.data import SyntheticDataModule, batches  # noqa: E402
from src.models import preact_resnet_cifar  # noqa: E402
from src.models.network import FULL  # noqa: E402

ARMS = ("whole", "capped")
DEFAULT_CAP = engine.CPU_ACTIVATION_BYTES


@contextlib.contextmanager
def activation_cap(cap: int | None):
    """The engine's CPU_ACTIVATION_BYTES set to `cap` (None: off) for this block only."""
    old, engine.CPU_ACTIVATION_BYTES = engine.CPU_ACTIVATION_BYTES, cap
    try:
        yield
    finally:
        engine.CPU_ACTIVATION_BYTES = old


def evaluate(net, plans, batch, cap: int | None) -> tuple[tuple, dict[str, float]]:
    """(errors, {wall, user, sys, minflt, largest}) of one `lesion_errors` call with the cap at
    `cap`; largest: the most examples the engine ran through the network at once."""
    seen, real = [], engine.plan_inputs

    def counted(net, x, base):
        seen.append(len(x))
        return real(net, x, base)

    engine.plan_inputs = counted
    try:
        with activation_cap(cap):
            r0, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            base, errors = engine.lesion_errors(net, plans, [batch])
            wall, r1 = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        engine.plan_inputs = real
    return (base, errors), {
        "wall": wall,
        "user": r1.ru_utime - r0.ru_utime,
        "sys": r1.ru_stime - r0.ru_stime,
        "minflt": r1.ru_minflt - r0.ru_minflt,
        "largest": max(seen),
    }


def bench(depth: int, batch, args) -> None:
    torch.manual_seed(0)
    net = preact_resnet_cifar((depth - 2) // 6, in_channels=1).eval()
    n = net.n_blocks
    plans = [
        engine.lesion_plan(None, [n * (k + 1) // (args.lesions + 1)]) for k in range(args.lesions)
    ]
    caps = {"whole": None, "capped": args.cap}
    with engine.eval_mode(net):
        with activation_cap(caps["capped"]):
            micro = engine.micro_batch(net, batch[0], FULL, None)
        with activation_cap(caps["whole"]):
            assert engine.micro_batch(net, batch[0], FULL, None) is None, "cap off still splits"
    parts = -(-len(batch[1]) // (micro or len(batch[1])))
    print(
        f"ResNet-{depth} ({n} blocks), {len(batch[1])} images 1x28x28 in one batch, "
        f"{len(plans)} lesion(s) (blocks {', '.join(str(min(p.deleted)) for p in plans) or '-'}) "
        f"+ the unlesioned network; capped: micro-batches of {micro or len(batch[1])} "
        f"({parts} per batch), cap {args.cap} bytes",
        flush=True,
    )
    for arm in ARMS:  # warm-up (kernels, allocator), untimed
        evaluate(net, plans[:1], batch, caps[arm])
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        results = {}
        for arm in ARMS[r % 2 :] + ARMS[: r % 2]:  # alternate, so load changes hit both alike
            results[arm], t = evaluate(net, plans, batch, caps[arm])
            runs[arm].append(t)
        assert results["whole"] == results["capped"], f"errors differ: {results}"
        assert runs["whole"][-1]["largest"] == len(batch[1]), "the whole arm split the batch"
        assert runs["capped"][-1]["largest"] <= (micro or len(batch[1])), "the cap was ignored"
    best = {arm: min(runs[arm], key=lambda t: t["wall"]) for arm in ARMS}
    for arm in ARMS:
        b = best[arm]
        walls = ", ".join(f"{t['wall']:.2f}" for t in runs[arm])
        print(
            f"  {arm:6s} wall {b['wall']:7.2f} s  user {b['user']:7.2f} s  sys {b['sys']:7.2f} s"
            f"  minor faults {b['minflt']:9,d}  largest batch {b['largest']:5d}"
            f"  (wall per repeat: {walls})",
            flush=True,
        )
    ratios = "  ".join(
        f"{k} {best['capped'][k] / best['whole'][k]:.3f}" if best["whole"][k] else f"{k} -"
        for k in ("wall", "user", "sys")
    )
    speedup = best["whole"]["wall"] / best["capped"]["wall"]
    print(f"  ratio capped/whole: {ratios}  (speed-up {speedup:.2f}x)")
    base, errors = results["whole"]
    print(
        f"  errors identical in both arms, every repeat: base {base:.4f}, lesions "
        f"{', '.join(f'{e:.4f}' for e in errors) or '-'}",
        flush=True,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-test", type=int, default=1000, help="test images, evaluated as one batch")
    p.add_argument("--depths", default="110", help="ResNet depths (6n+2), comma-separated")
    p.add_argument("--lesions", type=int, default=2, help="single deletions besides the base")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--cap", type=int, default=DEFAULT_CAP, help="bytes per block input (capped arm)"
    )
    args = p.parse_args(argv)
    if args.cap < 1:
        p.error("--cap: a positive number of bytes (the whole arm is the cap off)")
    if args.repeats < 1 or args.lesions < 0:
        p.error("--repeats >= 1 and --lesions >= 0")
    torch.set_num_threads(args.threads)
    dm = SyntheticDataModule(
        shape=(1, 28, 28), n_train=1, n_test=args.n_test, eval_batch_size=args.n_test
    )
    (batch,) = list(batches(dm, "test"))
    print(
        f"CPU {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}; fastest of {args.repeats} alternating repeats; "
        f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        flush=True,
    )
    for depth in (int(d) for d in args.depths.split(",")):
        bench(depth, batch, args)


if __name__ == "__main__":
    main()
