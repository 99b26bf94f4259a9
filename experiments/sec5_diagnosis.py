"""Why testing a block-subset network (k of n blocks per mini-batch, paper Sec. 5) with all its
blocks fails: the residual stream's scale, and each block's first BatchNorm input as a multiple of
the running variance it learned, under the full network, one random k-subset and `rescale`.

    python experiments/sec5_diagnosis.py <last.ckpt of a training=block_subset run>

The network, its data set and k come from the checkpoint's own run description (digits,
Fashion-MNIST, ...); the first test batch is used.

Prints the test error of the three and, at some blocks, batch variance / running variance
(mean over channels) and the standard deviation of the residual stream. Numbers in
experiments/paths.md (Sec. 5).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402

from src import checkpoint  # noqa: E402
from src.data import batches  # noqa: E402
from src.models.network import Plan  # noqa: E402


def main(ckpt: str) -> None:
    saved = checkpoint.load(ckpt)
    run = saved[checkpoint.KEY]  # the run that wrote it: model, data, training
    data = instantiate(run["data"], _convert_="all")
    net = instantiate(
        run["model"], _convert_="all", in_channels=data.channels, num_classes=data.num_classes
    )
    net.load_state_dict({n[4:]: v for n, v in saved["state_dict"].items() if n.startswith("net.")})
    net.eval()
    k = run["training"]["k"]
    x, y = next(batches(data, "test"))
    bns = [b.pre[0] for b in net.blocks]  # each pre-activation block's first BatchNorm
    n = net.n_blocks
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].tolist()
    plans = {
        "full": None,
        f"{k}-subset": Plan(deleted=frozenset(range(n)) - frozenset(keep)),
        "rescale": Plan(residual_scale=k / n),
    }
    ratio, stream = {}, {}
    for name, plan in plans.items():
        seen = {}
        hooks = [
            bn.register_forward_hook(lambda m, i, o, j=j, seen=seen: seen.__setitem__(j, i[0]))
            for j, bn in enumerate(bns)
        ]
        with torch.no_grad():
            error = float((net(x, plan).argmax(1) != y).float().mean())
            h, stds = net.stem(x), {}
            for i in range(n):
                h = net.run_block(i, h, plan or Plan())
                stds[i] = float(h.std())
        for hook in hooks:
            hook.remove()
        ratio[name] = {
            j: float((v.var(dim=(0, 2, 3)) / bns[j].running_var).mean()) for j, v in seen.items()
        }
        stream[name] = stds
        print(f"{name}: test error {error:.3f}")
    print("block | " + " | ".join(f"{p}: var/running_var, stream std" for p in plans))
    for j in (1, 10, 17, 19, 30, 37, 45, 53):
        cells = [f"{ratio[p].get(j, float('nan')):9.2f}, {stream[p][j]:8.2f}" for p in plans]
        print(f"{j:5d} | " + " | ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/sec5_diagnosis.py <last.ckpt of a block_subset run>")
    main(sys.argv[1])
