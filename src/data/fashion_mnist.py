"""Fashion-MNIST (Xiao et al. 2017): 70k 28x28 grey images of clothes in 10 classes, a dataset
beyond the paper's CIFAR and ImageNet, read from local files only (no network).

torchvision's `datasets.FashionMNIST` reads the uncompressed idx files in `<root>/FashionMNIST/raw/`
(with plain `open`: it cannot read the `.gz` files that Debian's `dataset-fashion-mnist` installs in
/usr/share/datasets/fashion-mnist, and whose checksums differ from the ones its download checks).
So a folder with the `.gz` files is decompressed once, by torchvision's own `extract_archive`,
into that layout under `cache_dir` (the project's `data/`); a folder that already has torchvision's
layout is read in place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from torch.utils.data import TensorDataset

from src.data.datamodules import DataUnavailable, TensorDataModule, held_out_splits
from src.errors import ConfigError
from src.schema import Range

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist`
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FILES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _raw(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"  # where torchvision's FashionMNIST(root) reads


class FashionMNISTDataModule(TensorDataModule):
    """Fashion-MNIST held as uint8 tensors: 60k training images (of which `val_size` are held out
    for validation, chosen by a fixed generator; 0: validate on the test set) and 10k test images
    (`test_size`: the first n of them, for faster lesion sweeps on a CPU; the 10k are in random
    class order). Augmentation (`augment`) is CIFAR's: zero-pad, random 28x28 crop, horizontal
    flip."""

    scale, channels, num_classes = 255.0, 1, 10
    mean, std = (0.2860,), (0.3530,)  # of the 60k training images, in [0, 1] units

    def __init__(
        self,
        data_dir: str = DEBIAN_DIR,
        cache_dir: str = "data",
        val_size: Annotated[int, Range(0, 60000, open_high=True)] = 5000,
        augment: bool = True,
        test_size: Annotated[int, Range(1, 10000)] | None = None,
        **kwargs,
    ):
        super().__init__(augment=augment, **kwargs)
        if not 0 <= val_size < 60000:
            raise ConfigError(f"data.val_size must lie in [0, 60000), got {val_size}")
        if test_size is not None and not 0 < test_size <= 10000:
            raise ConfigError(
                f"data.test_size must lie in 1..10000 (or null: all), got {test_size}"
            )
        self.test_size = test_size
        self.data_dir, self.cache_dir = Path(data_dir).expanduser(), Path(cache_dir).expanduser()
        self.val_size = val_size

    def _root(self) -> Path:
        """A root in torchvision's layout holding all four files; decompresses them there from
        `data_dir` (flat, as Debian has them, or in torchvision's layout) on first use."""
        if all((_raw(self.data_dir) / f).is_file() for f in FILES):
            return self.data_dir
        raw = _raw(self.cache_dir)
        for name in FILES:
            if (raw / name).is_file():
                continue
            found = [
                d / f"{name}{ext}"
                for d in (self.data_dir, _raw(self.data_dir))
                for ext in ("", ".gz")
            ]
            found = [p for p in found if p.is_file()]
            if not found:
                raise DataUnavailable(
                    f"Fashion-MNIST file {name}(.gz) is not in {self.data_dir.resolve()}: "
                    f"apt-get install dataset-fashion-mnist (files in {DEBIAN_DIR}) or pass "
                    "data.data_dir=<dir with the Fashion-MNIST files>, or use data=digits"
                )
            self._decompress(found[0], raw, name)
        return self.cache_dir

    @staticmethod
    def _decompress(src: Path, raw: Path, name: str) -> None:
        """`src` (`name.gz`, or `name` itself: linked) to `raw/name`, atomically: concurrent ranks
        never read a half-written file."""
        from torchvision.datasets.utils import extract_archive

        try:
            raw.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=raw) as tmp:
                if src.suffix == ".gz":
                    extract_archive(str(src), tmp)
                else:
                    os.symlink(src.resolve(), Path(tmp, name))
                os.replace(Path(tmp, name), raw / name)
        except OSError as err:
            raise DataUnavailable(
                f"cannot write Fashion-MNIST's decompressed files to {raw.resolve()} "
                f"({type(err).__name__}): pass data.cache_dir=<a writable dir>"
            ) from None

    def prepare_data(self) -> None:
        self._root()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from torchvision.datasets import FashionMNIST

        root = str(self._root())
        train, test = FashionMNIST(root, train=True), FashionMNIST(root, train=False)
        n = self.test_size or len(test.targets)
        test = TensorDataset(test.data[:n, None], test.targets[:n])
        self.splits = held_out_splits(train.data[:, None], train.targets, test, self.val_size)
