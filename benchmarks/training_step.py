"""The LightningModule's training step vs a plain PyTorch loop: same model, same batches.

    python benchmarks/training_step.py [--blocks 3] [--steps 30] [--repeats 3]

Both run the Classifier's recipe (SGD momentum, weight decay, the step lr schedule) on identical
CIFAR-shaped synthetic batches of `--batch` (128); the first `--warmup` steps of each run are not
timed. Runs are interleaved and the median per-step time is compared: ratio = Lightning
throughput / plain throughput (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models import preact_resnet_cifar  # noqa: E402
from src.module import Classifier, Recipe, StepSchedule  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.elapsed = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.warmup


def lightning_step_time(net, data: TensorDataset, steps: int, warmup: int, batch: int) -> float:
    module = Classifier(copy.deepcopy(net), warmup_steps=0)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch, shuffle=False))
    return timer.elapsed / timer.steps


def plain_step_time(net, data: TensorDataset, steps: int, warmup: int, batch: int) -> float:
    model = copy.deepcopy(net).train()
    recipe = Recipe(warmup_steps=0)  # the Classifier's optimiser + schedule, no Lightning loop
    opt = recipe.make_optimizer(model)
    schedule = StepSchedule(
        recipe.lr, recipe.milestones, recipe.gamma, recipe.warmup_steps, recipe.warmup_lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step, (x, y) in enumerate(DataLoader(data, batch_size=batch, shuffle=False)):
        if step == warmup:
            start = time.perf_counter()
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=3, help="blocks per stage (3: ResNet-20)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 1)
    data = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    net = preact_resnet_cifar(args.blocks)
    times: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(args.repeats):
        for name, timed in (("plain", plain_step_time), ("lightning", lightning_step_time)):
            times[name].append(timed(net, data, args.steps, args.warmup, args.batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"pre-act ResNet, {net.n_blocks} blocks, batch {args.batch}, {args.threads} threads, "
        f"{args.steps - args.warmup} timed steps x {args.repeats} interleaved repeats"
    )
    for k, t in med.items():
        print(f"{k:10s} {t * 1e3:8.1f} ms/step  {args.batch / t:8.1f} images/s")
    print(f"ratio (Lightning / plain throughput): {med['plain'] / med['lightning']:.3f}")


if __name__ == "__main__":
    main()
