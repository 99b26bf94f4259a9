"""Gradient-path engine benchmark (paper Sec. 5, Fig 6b): samples/s of the fast engine (one
shared forward, trie-shared batched VJPs) vs the straightforward method (a forward + backward
under `Plan(grad_path=...)` per sample), on ResNet-110's 54 blocks with CIFAR-shaped synthetic
data, from one run. Workload as in the experiment: `--samples` random paths for every length
k = 1..54 on one batch; the straightforward rate is timed on an evenly spread subset of them.

    .venv/bin/python benchmarks/gradient_paths.py [--batch 8] [--samples 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.engines.paths import fast_path_grads, sample_paths, straightforward_path_grads  # noqa: E402
from src.models.preact_resnet import preact_resnet_cifar  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="images per batch (CIFAR-shaped)")
    ap.add_argument("--samples", type=int, default=4, help="paths per length k = 1..54")
    ap.add_argument("--straight", type=int, default=18, help="paths timed straightforwardly")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--batched", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    batched = None if args.batched == "auto" else args.batched == "yes"

    torch.manual_seed(0)
    net = preact_resnet_cifar(18).to(dev).eval()
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    n = net.n_blocks
    paths = [p for _, p in sample_paths(n, range(1, n + 1), args.samples, torch.Generator())]
    subset = paths[:: max(1, len(paths) // args.straight)][: args.straight]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    straightforward_path_grads(net, x, y, subset[:1])  # warm-up
    fast_path_grads(net, x, y, subset[:2], chunk=args.chunk, batched=batched)
    sync()
    t = time.perf_counter()
    fast = fast_path_grads(net, x, y, paths, chunk=args.chunk, batched=batched)
    sync()
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    ref = straightforward_path_grads(net, x, y, subset)
    sync()
    t_ref = time.perf_counter() - t

    index = {id(p): j for j, p in enumerate(paths)}
    picked = fast[[index[id(p)] for p in subset]]
    err = float((picked - ref).abs().max() / ref.abs().max())
    result = {
        "blocks": n,
        "batch": args.batch,
        "paths": len(paths),
        "mean_path_length": sum(map(len, paths)) / len(paths),
        "fast_samples_per_s": len(paths) / t_fast,
        "straightforward_samples_per_s": len(subset) / t_ref,
        "ratio": (len(paths) / t_fast) / (len(subset) / t_ref),
        "max_rel_diff": err,
        "device": args.device if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "batched_vjp": batched if batched is not None else dev.type != "cpu",
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
