"""The exact lesion engine behind paper Sec. 4 (Figs 3, 4, 5, 8): test error of a trained network
under many lesion plans (deleted blocks, reordered blocks), one pass over the test set.

What is measured is one explicit choice, `metric` (`METRICS`): "error", the classification error
(the paper's; top-1 over the last logit dimension, so for a language model the next-token error),
or "loss", the mean cross-entropy per target (for a language model with (B, T, V) logits and
(B, T) targets: the mean next-token loss in nats, whose exp is the perplexity).

Per test batch the unlesioned network runs once and keeps the input of every block (the cache of
`Network.block_inputs`). A lesion that first differs from the unlesioned sequence at position p
restarts from the cached input of position p: deleting block i recomputes only the blocks after
i; delete-many and reorder reuse the prefix before their first changed position. Every block
after p runs exactly as in a fresh forward, so results equal naive evaluation (`reuse=False`,
a fresh `net(x, plan)` per lesion: the reference for tests and benchmarks).

Memory: the cache holds n + 1 activations per example. With a `memory` budget (bytes, "512MB",
"4GB", or "auto": half of what the device has free) the engine measures one example's cache and
splits every test batch into micro-batches whose cache fits the budget; the sums are per example,
so the values are the same as with whole batches (tested).

On a CPU the engine also splits test batches so that one example-batch's largest block input
stays within `CPU_ACTIVATION_BYTES` (4 MiB): glibc serves larger allocations with fresh mmaps
and returns them to the kernel on free, so every layer of a large eval batch pays page faults
(sys time). A 1,000-image Fashion-MNIST batch through ResNet-110 ran 1.5x slower than the same
images in micro-batches of 83, 2 threads, idle (benchmarks/cpu_chunks.py; 2x at one thread).
Digits (4 KiB per example) and any batch already small enough are left whole; on a GPU nothing
changes. None disables the cap.

`recalibrated_errors` separates stale batch-norm statistics from lost paths (issue 9): every
plan, and the base, is tested with BN running statistics re-estimated under that plan on given
training batches (`src/bn.py`); the weights are never touched and the statistics are restored
after each plan. Each plan then runs a fresh forward (its statistics differ from the base's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from src.errors import ConfigError
from src.models.network import FULL, Network, Plan

METRICS = ("error", "loss")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(
            f"metric={metric!r}: choose error (classification error) or loss (mean "
            "cross-entropy per target, e.g. next-token loss of a language model)"
        )
    return metric


def metric_sum(metric: str, logits: Tensor, y: Tensor) -> Tensor:
    """Sum of `metric` over the targets of one batch (divide by `y.numel()` for the mean):
    wrong top-1 predictions (an integer count) or cross-entropy in nats (float64)."""
    if metric == "error":
        return (logits.argmax(-1) != y).sum()
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, y.reshape(-1), reduction="sum").double()


def lesion_plan(base: Plan | None, deleted: Iterable[int] = (), order: Sequence[int] | None = None):
    """`base` (the trained network's eval plan, or the full network) with a lesion on top."""
    base = FULL if base is None else base
    changes = {"deleted": base.deleted | frozenset(int(i) for i in deleted)}
    if order is not None:
        changes["order"] = tuple(int(i) for i in order)
    return dataclasses.replace(base, **changes)


def plan_inputs(net: Network, x: Tensor, base: Plan) -> list[Tensor]:
    """Input of every position of `base`'s sequence, then the trunk output."""
    return net.block_inputs(x, base)


def check_plans(net: Network, plans: Sequence[Plan]) -> None:
    for plan in plans:
        try:
            plan.validate(net.n_blocks)
        except ValueError as err:
            raise ConfigError(f"{err}; fix the lesion's block indices") from None


CPU_ACTIVATION_BYTES: int | None = 4 * 2**20
UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_memory(memory: int | float | str | None) -> int | str | None:
    """A memory budget in bytes from 1_000_000, "512MB", "4GB" (binary units); "auto" and None
    pass through. A ConfigError names the accepted forms."""
    if memory is None or memory == "auto":
        return memory
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?B?)\s*", str(memory).upper())
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(
            f"memory={memory!r}: give a positive number of bytes, e.g. memory=512MB or "
            "memory=4GB, memory=auto (half the free device memory), or memory=null (no limit)"
        )
    unit = m.group(2) if m.group(2).endswith("B") or not m.group(2) else m.group(2) + "B"
    return int(float(m.group(1)) * UNITS[unit])


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's own count, else the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:  # Linux; elsewhere: physical pages as an upper bound
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def micro_batch(net: Network, x: Tensor, base: Plan, memory: int | str | None) -> int | None:
    """Examples per micro-batch so that the block-input cache (and one lesion's recomputation,
    counted as much again) fits `memory`, and on a CPU so that the largest block input stays
    within `CPU_ACTIVATION_BYTES`; None: no limit. Call in eval mode on the device."""
    memory = parse_memory(memory)
    cap = CPU_ACTIVATION_BYTES if x.device.type == "cpu" else None
    if memory is None and cap is None:
        return None
    sizes = [h.element_size() * h[:1].numel() for h in plan_inputs(net, x[:1], base)]
    limits = [] if cap is None else [max(1, cap // max(sizes))]
    if memory is not None:
        if memory == "auto":
            memory = free_memory(x.device) // 2
        limits.append(max(1, int(memory // (2 * sum(sizes)))))
    return min(limits)


def rebatch(batches: Iterable[tuple[Tensor, Tensor]], size: int | None) -> Iterator:
    """Re-chunk (x, y) batches to `size` examples (None: as they come)."""
    if size is None:
        yield from batches
        return
    xs, ys, n = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        n += len(y)
        while n >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, n = [x_all[size:]], [y_all[size:]], n - size
    if n:
        yield torch.cat(xs), torch.cat(ys)


@contextlib.contextmanager
def eval_mode(net: Network, device: torch.device | str | None = None):
    """BN in eval mode (running statistics) and no autograd, for this block only; the network's
    training flag and device are restored on exit, even if the sweep is interrupted. The moves
    run outside inference mode (also when the caller is in it, e.g. Lightning's `on_test_end`):
    moved there, parameters would come back as inference tensors, unusable for autograd."""
    was_training = net.training
    old = next(net.parameters()).device
    device = old if device is None else torch.device(device)
    with torch.inference_mode(False):
        net.eval().to(device)
    try:
        with torch.inference_mode():
            yield device
    finally:
        with torch.inference_mode(False):
            net.train(was_training).to(old)


def lesion_logits(
    net: Network, x: Tensor, plans: Sequence[Plan], base: Plan | None = None, reuse: bool = True
) -> Iterator[Tensor]:
    """Logits of one batch: first under `base`, then under each plan (call in eval mode).

    reuse=True restarts each lesion from the cached block inputs of the `base` network at its
    first changed position; reuse=False runs a fresh forward per lesion (the naive reference).
    """
    base = FULL if base is None else base
    if not reuse:
        yield net(x, base)
        for plan in plans:
            yield net(x, plan)
        return
    cache = plan_inputs(net, x, base)
    base_logits = net.head(cache[-1])
    yield base_logits
    for plan in plans:
        start = net.restart(base, plan)  # the network interprets the plans
        if start is None:
            yield base_logits
        else:
            yield net.head(net.trunk(cache[start], plan, start=start))


def lesion_errors(
    net: Network,
    plans: Sequence[Plan],
    batches: Iterable[tuple[Tensor, Tensor]],
    base: Plan | None = None,
    reuse: bool = True,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    description: str = "lesions",
    metric: str = "error",
    memory: int | str | None = None,
) -> tuple[float, list[float]]:
    """`metric` of `net` under `base` and under each plan in `plans` (error: fractions in
    [0, 1]; loss: mean cross-entropy per target), in one pass over `batches`, with BN in eval
    mode on `device` (None: where the net is), the cache within `memory` (see the module doc)."""
    from src.progress import lesion_bar  # imports Lightning: only once a sweep runs

    check_metric(metric)
    parse_memory(memory)
    check_plans(net, [FULL if base is None else base, *plans])
    total, micro = 0, None
    with eval_mode(net, device) as dev, lesion_bar(progress) as bar:
        dtype = torch.long if metric == "error" else torch.float64  # error: exact counts
        sums = torch.zeros(len(plans) + 1, dtype=dtype, device=dev)  # first: the base
        task = bar.add_task(description, total=len(plans))
        for b, (x, y) in enumerate(rebatch(batches, batch_size)):
            bar.reset(task, description=f"{description} (test batch {b + 1})")
            x, y = x.to(dev), y.to(dev)
            if b == 0:
                micro = micro_batch(net, x, FULL if base is None else base, memory)
            parts = list(zip(x.split(micro or len(x)), y.split(micro or len(y)), strict=True))
            for i, (xm, ym) in enumerate(parts):
                for k, logits in enumerate(lesion_logits(net, xm, plans, base, reuse)):
                    sums[k] += metric_sum(metric, logits, ym)
                    bar.advance(task, advance=int(k > 0 and i == len(parts) - 1))
            total += y.numel()
    if total == 0:
        raise ConfigError("the test split is empty: nothing to evaluate lesions on")
    values = (sums.double() / total).tolist()
    return values[0], values[1:]


def recalibrated_errors(
    net: Network,
    plans: Sequence[Plan],
    batches: Iterable[tuple[Tensor, Tensor]],
    bn_batches: Sequence[tuple[Tensor, Tensor]],
    base: Plan | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "lesions (BN re-estimated)",
    metric: str = "error",
) -> tuple[float, list[float]]:
    """`metric` of `net` under `base` and each plan in `plans`, each with batch-norm statistics
    re-estimated under that plan on all of `bn_batches` ((x, y) training batches), then tested in
    eval mode on `batches`. Deterministic given the batches; `net` is left as it was."""
    from src.bn import recalibrated
    from src.progress import lesion_bar

    check_metric(metric)
    base = FULL if base is None else base
    check_plans(net, [base, *plans])
    if not bn_batches:
        raise ConfigError("bn=recalibrate needs training batches: set bn_batches >= 1")
    was_training = net.training
    old = next(net.parameters()).device
    dev = old if device is None else torch.device(device)
    with torch.inference_mode(False):
        net.to(dev)
    try:
        test = [(x.to(dev), y.to(dev)) for x, y in batches]
        train = [(x.to(dev), y.to(dev)) for x, y in bn_batches]
        total = sum(y.numel() for _, y in test)
        if total == 0:
            raise ConfigError("the test split is empty: nothing to evaluate lesions on")
        with eval_mode(net):
            micro = micro_batch(net, test[0][0], base, None)
        if micro is not None:  # eval-mode sums are per example: the same values, faster on CPU
            test = [p for x, y in test for p in zip(x.split(micro), y.split(micro), strict=True)]
        errors = []
        with lesion_bar(progress) as bar:
            task = bar.add_task(description, total=len(plans))
            for k, plan in enumerate([base, *plans]):
                with torch.inference_mode(False), recalibrated(net, plan, train, len(train)):
                    net.eval()
                    with torch.inference_mode():
                        summed = sum(metric_sum(metric, net(x, plan), y).item() for x, y in test)
                errors.append(summed / total)
                bar.advance(task, advance=int(k > 0))
    finally:
        with torch.inference_mode(False):
            net.train(was_training).to(old)
    return errors[0], errors[1:]
