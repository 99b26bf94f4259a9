"""One lesion study across ranks (issue 22): plans per second with N ranks x 1 thread against
1 rank x 1 thread, on the same plans, side by side in one run.

    python benchmarks/distributed.py [--ranks 2] [--n-test 256] [--repeats 3] [--device cpu]
    python benchmarks/distributed.py --device cuda --ranks 8     # one GPU per rank (NCCL)

The study is Fig. 3 + Fig. 5a on a 54-block ResNet-110 (random weights: the cost does not
depend on them) on CIFAR-shaped synthetic data: every single deletion and `--trials` random
sets for each k = 1..10, split over the ranks by the project's own code (src/distributed.py:
each plan's cost from its restart position, longest first to the least loaded rank) and
evaluated by the reusing lesion engine. Each arm is a fresh group of processes
(torch.distributed, gloo on the CPU, NCCL on GPUs), timed from a barrier after setup to the end
of the gather; the arms alternate `--repeats` times and the fastest of each is kept. The errors
of every arm must be identical (checked). On a 2-core CPU the goal is >= 1.8x with 2 ranks.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.analysis.delete_many import DeleteMany  # noqa: E402
from src.analysis.delete_single import DeleteSingle  # noqa: E402
from src.data import SyntheticDataModule, batches  # noqa: E402
from src.distributed import Part, evaluate  # noqa: E402
from src.engines.lesion import lesion_errors  # noqa: E402
from src.models import preact_resnet_cifar  # noqa: E402
from src.models.network import FULL  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, ranks: int, port: int, args, out) -> None:
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=ranks)
    torch.manual_seed(0)
    net = preact_resnet_cifar(blocks_per_stage=args.blocks_per_stage).to(device).eval()
    dm = SyntheticDataModule(shape=(3, 32, 32), n_train=1, n_test=args.n_test, eval_batch_size=128)
    data = list(batches(dm, "test", device=device))
    single = DeleteSingle(progress=False)
    many = DeleteMany(ks=range(1, min(10, net.n_blocks) + 1), trials=args.trials, progress=False)
    plans = [p for s in (single, many) for _, p in s.lesions(net, FULL)]
    costs = [single.cost(net, FULL, p) for p in plans]

    def compute(items):
        base, values = lesion_errors(net, [plans[i] for i in items], data, device=device)
        return {"baseline": base, **dict(zip(items, values, strict=True))}

    part = Part.here()
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    got = evaluate(part, costs, compute)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        out.put((seconds, len(plans), [got[i] for i in range(len(plans))]))
    dist.destroy_process_group()


def arm(ranks: int, args) -> tuple[float, int, list[float]]:
    method = "spawn" if args.device == "cuda" else "fork"  # CUDA cannot fork; the CPU starts fast
    out = mp.get_context(method).Queue()
    mp.start_processes(worker, (ranks, free_port(), args, out), nprocs=ranks, start_method=method)
    return out.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--blocks-per-stage", type=int, default=18)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        found = torch.cuda.device_count()
        sys.exit(
            f"error: --ranks {args.ranks} needs as many GPUs, found {found}: use --ranks {found}"
        )
    best: dict[int, float] = {}
    values: dict[int, list[float]] = {}
    for r in range(args.repeats):
        for ranks in (1, args.ranks):
            seconds, n_plans, got = arm(ranks, args)
            best[ranks] = min(best.get(ranks, float("inf")), seconds)
            values.setdefault(ranks, got)
            if got != values[1]:
                sys.exit(f"error: {ranks} ranks gave other errors than 1 rank (repeat {r})")
            print(f"repeat {r}: {ranks} rank(s): {seconds:.2f} s ({n_plans / seconds:.1f} plans/s)")
    n = args.ranks
    print(
        f"{n_plans} plans ({args.device}, 1 thread per rank): 1 rank {n_plans / best[1]:.1f} "
        f"plans/s, {n} ranks {n_plans / best[n]:.1f} plans/s: speed-up {best[1] / best[n]:.2f}x "
        "(identical errors)"
    )


if __name__ == "__main__":
    main()
