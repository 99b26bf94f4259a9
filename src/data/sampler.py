"""The training order: a function of (seed, epoch), split across DDP ranks, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Epoch e visits the training set in the order `randperm(n)` drawn from `seed + e`, and rank
    r of w takes every w-th index from r (torch's DistributedSampler, which Lightning then keeps
    as it is).

    `position()` gives (epoch, batches of it already run) from the trainer when an epoch's
    iteration starts. The trainer's epoch, not the one Lightning hands `set_epoch`: after a
    resume from an epoch-end checkpoint Lightning 2.6 hands it one more than in the uninterrupted
    run. The batches already run are non-zero only when training restarts from a checkpoint saved
    mid-epoch; the epoch's order then resumes after them (Lightning counts them as done).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.position = batch_size, position

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self.position is not None:
            self.epoch, done = self.position()
            skip = done * self.batch_size
        return iter(list(super().__iter__())[skip:])


class ResumableLoader(DataLoader):
    """A training DataLoader over an `EpochSampler`: its place in the epoch is Lightning's own
    progress, so it has no state to save. Having `state_dict`, it tells Lightning that it resumes
    mid-epoch (no "dataloader is not resumable" warning)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
