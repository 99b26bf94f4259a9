"""LightningDataModules: CIFAR-10/100 (paper Sec. 4), ImageNet (Fig. 4), scikit-learn's bundled
digits (real 8x8 images that need no network: `preset=quick` and the tests) and synthetic tensors.

Small datasets are held as whole tensors; augmentation and normalisation run on each batch after
it reached its device (`on_after_batch_transfer`), as tensor ops. Their training order and
augmentation are functions of the run's seed and Lightning's counters (`src/seeds.py`), so a run
resumed from any of its checkpoints sees the same batches as the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from src import seeds
from src.data.augment import Normalizer, random_crop_flip
from src.data.sampler import EpochSampler, ResumableLoader
from src.errors import ConfigError, DataUnavailable  # noqa: F401  (re-exported)
from src.schema import FRACTION, NON_NEGATIVE, POSITIVE, Range


def _unrepeated_sampler(dataset) -> DistributedSampler | None:
    """Under DDP, split an evaluation set across ranks without padding it: Lightning's default
    sampler repeats images to equalise the ranks, which would count them twice in test error."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def batches(
    datamodule: L.LightningDataModule,
    split: str = "test",
    device="cpu",
    train: bool = False,
    seed: int | None = None,
):
    """Yield ready (x, y) batches of a split outside the Trainer loop (for analyses): moved to
    `device` and passed through the data module's batch transform (augmentation iff `train`).
    The whole split, also under DDP: a rank-sharded evaluation loader is read unsharded.
    `seed`: the split in an order drawn from this seed alone (an analysis's own seed decides which
    examples it sees first), else in the split loader's own order."""
    if hasattr(datamodule, "setup"):
        datamodule.setup("test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    if seed is not None or isinstance(loader.sampler, DistributedSampler):
        order = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(len(loader.dataset), generator=gen).tolist()
        loader = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=order,
            num_workers=loader.num_workers,
        )
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if isinstance(datamodule, TensorDataModule):
            x = datamodule.transform(x, train)
        yield x, y


def held_out_splits(x, y, test: TensorDataset, val_size: int) -> dict[str, TensorDataset]:
    """train/val/test splits: `val_size` training examples (a fixed draw) held out for
    validation; with 0, validation reads the test set (the paper trains on every image)."""
    if val_size == 0:
        return {"train": TensorDataset(x, y), "val": test, "test": test}
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    v, t = perm[:val_size], perm[val_size:]
    return {"train": TensorDataset(x[t], y[t]), "val": TensorDataset(x[v], y[v]), "test": test}


class TensorDataModule(L.LightningDataModule):
    """Train/val/test held as tensors; subclasses fill `self.splits` in `setup`."""

    channels: int
    num_classes: int
    inputs = "images"  # what a batch's x holds: "images" or "tokens" (src/data/text.py)
    scale: float = 1.0  # raw pixel value that maps to 1.0
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: Annotated[int, POSITIVE] = 128,
        eval_batch_size: Annotated[int, POSITIVE] | None = None,
        num_workers: Annotated[int, NON_NEGATIVE] = 0,
        augment: bool = False,
        padding: Annotated[int, NON_NEGATIVE] = 4,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be positive, got {eval_batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.padding = padding
        self.splits: dict[str, TensorDataset] = {}

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        self._hold_on_accelerator()
        data = self.splits[split]
        on_gpu = data.tensors[0].device.type != "cpu"
        return (ResumableLoader if train else DataLoader)(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._train_sampler(data) if train else _unrepeated_sampler(data),
            drop_last=train and len(self.splits[split]) > self.batch_size,
            num_workers=0 if on_gpu else self.num_workers,
            persistent_workers=self.num_workers > 0 and not on_gpu,
        )

    def _hold_on_accelerator(self) -> None:
        """Training on a GPU: the (small) splits move to it once, so a batch is gathered there
        (views of single images, then one stack) and no training step copies data from the host.
        The transform then augments on the device from a device generator."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else None
        if device is None or device.type != "cuda":
            return
        for name, split in self.splits.items():
            if split.tensors[0].device != device:
                self.splits[name] = TensorDataset(*(t.to(device) for t in split.tensors))

    def _train_sampler(self, data: TensorDataset) -> EpochSampler:
        """This rank's share of the order of (seed, epoch), resuming after the batches that
        Lightning's progress counts as done in this epoch."""
        trainer = self.trainer
        if trainer is None:
            return EpochSampler(data, seeds.derive(seeds.run_seed(), "order"), self.batch_size)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return EpochSampler(
            data,
            seeds.derive(seeds.run_seed(trainer), "order"),
            self.batch_size,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            position=lambda: (trainer.current_epoch, progress.current.ready),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def transform(
        self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Batch augmentation (train only, drawn from `generator`) then normalisation, on the
        batch's device."""
        if train and self.augment:
            x = random_crop_flip(x, self.padding, generator=generator)
        if getattr(self, "_normalizer", None) is None:
            self._normalizer = Normalizer(self.mean, self.std, self.scale)
        return self._normalizer(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return self.transform(x, False), y
        # the augmentation of step t on rank r: the same whenever step t is (re)run
        step = seeds.generator(
            seeds.run_seed(trainer),
            "augment",
            trainer.global_step,
            trainer.global_rank,
            device=x.device,
        )
        return self.transform(x, True, step), y


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits (ships inside the wheel; no network)."""

    channels, num_classes, scale = 1, 10, 16.0
    mean, std = (0.3,), (0.38,)

    def __init__(
        self,
        test_fraction: Annotated[float, FRACTION] = 0.2,
        val_fraction: Annotated[float, Range(0, 1, open_high=True)] = 0.1,
        split_seed: Annotated[int, NON_NEGATIVE] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1:
            raise ConfigError("data.test_fraction and data.val_fraction must lie in (0, 1)")
        self.test_fraction, self.val_fraction, self.split_seed = (
            test_fraction,
            val_fraction,
            split_seed,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None]
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_test = int(len(y) * self.test_fraction)
        n_val = int(len(y) * self.val_fraction)
        parts = {
            "test": perm[:n_test],
            "val": perm[n_test : n_test + n_val],
            "train": perm[n_test + n_val :],
        }
        if n_val == 0:
            parts["val"] = parts["test"]
        self.splits = {k: TensorDataset(x[i], y[i]) for k, i in parts.items()}


class SyntheticDataModule(TensorDataModule):
    """Random images of any shape with random labels: smoke tests and benchmarks."""

    scale = 1.0

    def __init__(
        self,
        shape: Sequence[Annotated[int, POSITIVE]] = (3, 32, 32),
        num_classes: Annotated[int, POSITIVE] = 10,
        n_train: Annotated[int, POSITIVE] = 512,
        n_test: Annotated[int, POSITIVE] = 256,
        seed: Annotated[int, NON_NEGATIVE] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        shape = tuple(shape)
        if len(shape) != 3 or min(shape) < 1 or num_classes < 1 or min(n_train, n_test) < 1:
            raise ConfigError(
                "data.shape must be 3 positive ints (C, H, W); sizes must be positive"
            )
        self.shape, self.num_classes, self.n_train, self.n_test, self.seed = (
            shape,
            num_classes,
            n_train,
            n_test,
            seed,
        )
        self.channels = shape[0]
        self.mean, self.std = (0.0,) * shape[0], (1.0,) * shape[0]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        g = torch.Generator().manual_seed(self.seed)

        def make(n):
            return TensorDataset(
                torch.randn(n, *self.shape, generator=g),
                torch.randint(0, self.num_classes, (n,), generator=g),
            )

        train, test = make(self.n_train), make(self.n_test)
        self.splits = {"train": train, "val": test, "test": test}


class CIFARDataModule(TensorDataModule):
    """CIFAR-10/100 from torchvision (downloaded on first use), held as uint8 tensors.

    The paper's recipe trains on all 50k images and reports test error; `val_size` > 0 holds
    out that many training images for validation instead of validating on the test set.
    """

    scale = 255.0
    channels = 3
    STATS = {
        10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }

    def __init__(
        self,
        num_classes: Literal[10, 100] = 10,
        data_dir: str = "data",
        download: bool = True,
        val_size: Annotated[int, NON_NEGATIVE] = 0,
        augment: bool = True,
        **kwargs,
    ):
        super().__init__(augment=augment, **kwargs)
        if num_classes not in self.STATS:
            raise ConfigError(f"CIFAR has 10 or 100 classes, got {num_classes}")
        self.num_classes = num_classes
        self.data_dir, self.download, self.val_size = Path(data_dir), download, val_size
        self.mean, self.std = self.STATS[num_classes]

    def _dataset(self, train: bool, download: bool):
        import torchvision

        cls = (
            torchvision.datasets.CIFAR10
            if self.num_classes == 10
            else torchvision.datasets.CIFAR100
        )
        try:
            return cls(str(self.data_dir), train=train, download=download)
        except Exception as err:  # URLError, RuntimeError("Dataset not found"), OSError ...
            raise DataUnavailable(
                f"CIFAR-{self.num_classes} is not in {self.data_dir.resolve()} and could not be "
                f"downloaded ({type(err).__name__}); put the torchvision CIFAR files there "
                f"(data.data_dir=<dir>) or use data=digits / data=synthetic"
            ) from None

    def prepare_data(self) -> None:
        self._dataset(True, self.download)
        self._dataset(False, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return

        def tensors(ds):
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return x, torch.tensor(ds.targets, dtype=torch.long)

        xtr, ytr = tensors(self._dataset(True, False))
        xte, yte = tensors(self._dataset(False, False))
        self.splits = held_out_splits(xtr, ytr, TensorDataset(xte, yte), self.val_size)


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet from a user-given directory with `train/` and `val/` class folders (ImageFolder)."""

    channels, num_classes = 3, 1000
    inputs = "images"

    def __init__(
        self,
        data_dir: str = "",
        batch_size: Annotated[int, POSITIVE] = 256,
        eval_batch_size: Annotated[int, POSITIVE] | None = None,
        num_workers: Annotated[int, NON_NEGATIVE] = 8,
        image_size: Annotated[int, POSITIVE] = 224,
    ):
        super().__init__()
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.eval_batch_size = eval_batch_size or batch_size

    def _folder(self, split: str):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        path = self.data_dir / split if self.data_dir else None
        if path is None or not path.is_dir():
            raise DataUnavailable(
                f"ImageNet folder {path or '<unset>'} not found: pass data.data_dir=<dir with "
                "train/ and val/ class folders> or use data=digits / data=synthetic"
            )
        norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        if split == "train":
            tf = T.Compose(
                [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
            )
        else:
            tf = T.Compose(
                [
                    T.Resize(int(self.image_size * 8 / 7)),
                    T.CenterCrop(self.image_size),
                    T.ToTensor(),
                    norm,
                ]
            )
        return ImageFolder(str(path), tf)

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self._folder(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=True,
            drop_last=train,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", False)
