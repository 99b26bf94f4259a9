"""Seeds that make training a function of (seed, counters): resumable and the same on every rank.

Each random decision of a training step is drawn from a seed derived from the run's seed and
a counter that Lightning keeps in its checkpoints:

- the data order of epoch e: (seed, "order", e), skipping the batches already run after a
  mid-epoch restart (`src.data.sampler.EpochSampler`);
- batch augmentation at step t on rank r: (seed, "augment", t, r);
- the blocks a training mode runs at step t (block subset, stochastic depth): (seed, "blocks", t),
  the same on every DDP rank.

So a resumed run continues exactly as the uninterrupted one (no generator state to save), and two
training modes with one seed see the same data in the same order with the same augmentation.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import weakref
from contextlib import contextmanager

import torch

_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def derive(seed: int, *keys) -> int:
    """A 62-bit seed for the stream named by `keys` (ints and strings) within run `seed`."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def generator(seed: int, *keys, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `derive(seed, *keys)`. Seeding a GPU generator is
    host-side bookkeeping (no copy, no sync); its draws differ from a CPU generator's."""
    return torch.Generator(device=device).manual_seed(derive(seed, *keys))


def run_seed(trainer=None) -> int:
    """The run's seed: `seed=` (Lightning's seed_everything exports it as PL_GLOBAL_SEED). With
    `seed=null` a random one, drawn by rank 0 and sent to the other DDP ranks on the first call
    for a trainer (Lightning's `setup` hooks, which every rank runs), then remembered."""
    if os.environ.get("PL_GLOBAL_SEED") is not None:
        return int(os.environ["PL_GLOBAL_SEED"])
    if trainer is None:
        return secrets.randbits(32)
    if trainer not in _SHARED:
        _SHARED[trainer] = int(trainer.strategy.broadcast(secrets.randbits(32)))
    return _SHARED[trainer]


@contextmanager
def seeded(seed: int, device: torch.device):
    """Within the block, torch's global generator (the CPU one, and `device`'s if it is a GPU)
    draws from `seed`; on exit it is back where it was. For draws made by code that takes no
    generator, such as `torchvision.ops.stochastic_depth`."""
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield
