"""Single-deletion sweep (paper Sec. 4.1) over a 54-block ResNet-110 on CIFAR-shaped synthetic
data: the reusing lesion engine vs naive evaluation (a fresh forward per lesion), in one run.

    python benchmarks/lesion_engine.py [--n-test 512] [--batch-size 256] [--repeats 3] \
        [--device cpu] [--threads 1]

Deleting block i with reuse recomputes only blocks i+1..n-1 from the cached input of block i, so
an exact sweep costs about (n + 1) / 2n of the naive one (0.51x for n = 54) plus one cache pass.
Naive and reuse runs are interleaved and the fastest of `--repeats` is kept for each, so a
shared machine's load hits both alike. Both must give identical errors; the script checks it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.analysis.lesion import lesion_errors, lesion_plan  # noqa: E402
from src.data import SyntheticDataModule, batches  # noqa: E402
from src.models import preact_resnet_cifar  # noqa: E402


def sweep(net, data, device, reuse: bool) -> tuple[float, list[float], float]:
    plans = [lesion_plan(None, [i]) for i in range(net.n_blocks)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    base, errors = lesion_errors(net, plans, data, reuse=reuse, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return base, errors, time.perf_counter() - start


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
    sweep(net, data[:1], device, reuse=True)  # warm-up (allocator, kernels)
    sweep(net, data[:1], device, reuse=False)
    times, results = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for reuse in (False, True):
            base, errors, t = sweep(net, data, device, reuse)
            times[reuse].append(t)
            results[reuse] = (base, errors)
        assert results[True] == results[False], "reuse and naive errors differ"
    naive, fast = min(times[False]), min(times[True])
    n = net.n_blocks
    print(
        f"device={device} threads={torch.get_num_threads()} blocks={n} lesions={n} "
        f"test images={args.n_test} batch={args.batch_size} repeats={args.repeats}"
    )
    print(f"naive  : {naive:8.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[False])})")
    print(f"reuse  : {fast:8.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[True])})")
    floor = (n + 1) / (2 * n)
    print(f"ratio reuse/naive = {fast / naive:.3f}  (exact-sweep floor (n+1)/2n = {floor:.3f})")


if __name__ == "__main__":
    main()
