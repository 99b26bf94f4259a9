"""Single-deletion sweep (paper Sec. 4.1) over a 54-block ResNet-110 on CIFAR-shaped synthetic
data: the reusing lesion engine vs naive evaluation (a fresh forward per lesion), in one run.

    python benchmarks/lesion_engine.py [--n-test 512] [--batch-size 256] [--repeats 3] \
        [--device cpu] [--threads 1]

Deleting block i with reuse recomputes only blocks i+1..n-1 from the cached input of block i, so
with equal-cost blocks an exact sweep costs (n + 1) / 2n of the naive one (0.51x for n = 54);
blocks that cost more early in the network (CIFAR stage 1 on a CPU) bring it below that.
Naive and reuse sweeps alternate batch by batch and the fastest of `--repeats` totals is kept
for each, so a shared machine's load hits both alike; CPU time of this process (with
`--threads 1`) is printed beside wall time as the load-independent measure on a shared CPU.
Both engines must give identical errors; the script checks it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data import SyntheticDataModule, batches  # noqa: E402
from src.engines.lesion import lesion_errors, lesion_plan  # noqa: E402
from src.models import preact_resnet_cifar  # noqa: E402


def sweep(net, batch, device, reuse: bool) -> tuple[float, list[float], float, float]:
    """(baseline error, errors, wall seconds, CPU seconds of this process) on one batch."""
    plans = [lesion_plan(None, [i]) for i in range(net.n_blocks)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    base, errors = lesion_errors(net, plans, [batch], reuse=reuse, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return base, errors, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = preact_resnet_cifar(blocks_per_stage=18).to(device).eval()  # 54 blocks, 1.7M params
    dm = SyntheticDataModule(
        shape=(3, 32, 32), n_train=1, n_test=args.n_test, eval_batch_size=args.batch_size
    )
    data = list(batches(dm, "test", device=device))
    sweep(net, data[0], device, reuse=True)  # warm-up (allocator, kernels)
    sweep(net, data[0], device, reuse=False)
    wall, cpu = {True: [], False: []}, {True: [], False: []}
    for _ in range(args.repeats):
        totals = {r: [0.0, 0.0] for r in (True, False)}
        for batch in data:  # alternate per batch, so load changes hit both engines alike
            results = {}
            for reuse in (False, True):
                base, errors, w, c = sweep(net, batch, device, reuse)
                totals[reuse][0] += w
                totals[reuse][1] += c
                results[reuse] = (base, errors)
            assert results[True] == results[False], "reuse and naive errors differ"
        for r in (True, False):
            wall[r].append(totals[r][0])
            cpu[r].append(totals[r][1])
    n = net.n_blocks
    print(
        f"device={device} threads={torch.get_num_threads()} blocks={n} lesions={n} "
        f"test images={args.n_test} batch={args.batch_size} repeats={args.repeats}"
    )
    for name, t in (("wall", wall), ("cpu", cpu)):
        runs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(t[False], t[True]))
        print(
            f"{name:4s} naive {min(t[False]):8.2f} s  reuse {min(t[True]):8.2f} s  "
            f"(naive/reuse per repeat: {runs})"
        )
    floor = (n + 1) / (2 * n)
    ratio = min(wall[True]) / min(wall[False])
    print(
        f"ratio reuse/naive = {ratio:.3f} wall, {min(cpu[True]) / min(cpu[False]):.3f} CPU time"
        f"  (uniform-cost exact floor (n+1)/2n = {floor:.3f})"
    )


if __name__ == "__main__":
    main()
