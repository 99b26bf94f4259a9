"""Data modules and the batched CIFAR augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.data import (
    CIFARDataModule,
    DataUnavailable,
    DigitsDataModule,
    FashionMNISTDataModule,
    SyntheticDataModule,
)
from src.data.augment import random_crop_flip
from src.data.fashion_mnist import DEBIAN_DIR
from src.errors import ConfigError


def test_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = random_crop_flip(x, padding=4, flip=True, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (4, 4, 4, 4))
    offsets, flips = set(), 0
    for img, pad in zip(out, padded):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(img.flip(2) if f else img, pad[:, dy : dy + 32, dx : dx + 32])
        ]
        assert matches, "every output must be a (mirrored) 32x32 window of the padded image"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 10 and 10 < flips < 54  # offsets and flips really vary


def test_no_padding_no_flip_is_identity():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_digits_are_real_and_split():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"test": 359, "val": 179, "train": 1259}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and set(y.tolist()) <= set(range(10))
    z = dm.transform(x, train=False)
    assert z.dtype == torch.float32 and abs(z.mean()) < 0.5


def test_synthetic_any_shape():
    dm = SyntheticDataModule(shape=(2, 5, 7), num_classes=3, n_train=10, n_test=4, batch_size=4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 2, 5, 7) and y.max() < 3
    with pytest.raises(ConfigError):
        SyntheticDataModule(shape=(0, 5, 5))
    with pytest.raises(ConfigError):
        DigitsDataModule(batch_size=0)


def test_cifar_without_files_or_network_says_what_to_do(tmp_path):
    dm = CIFARDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DataUnavailable) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "\n" not in msg and "data.data_dir" in msg and "data=digits" in msg


needs_fashion_mnist = pytest.mark.skipif(
    not Path(DEBIAN_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fashion_cache(tmp_path_factory):
    """Debian's .gz files decompressed once into a torchvision layout for this module's tests."""
    cache = tmp_path_factory.mktemp("fashion")
    FashionMNISTDataModule(cache_dir=str(cache)).prepare_data()
    return cache


@needs_fashion_mnist
def test_fashion_mnist_splits_and_images_are_torchvisions(fashion_cache):
    from torchvision.datasets import FashionMNIST

    dm = FashionMNISTDataModule(cache_dir=str(fashion_cache))  # default val_size=5000
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    x, y = dm.splits["train"].tensors
    assert x.shape == (55000, 1, 28, 28) and x.dtype == torch.uint8
    # train + val is a partition of the 60k training images: 6,000 of each of the 10 classes
    yv = dm.splits["val"].tensors[1]
    assert torch.bincount(torch.cat([y, yv])).tolist() == [6000] * 10
    full = FashionMNISTDataModule(cache_dir=str(fashion_cache), val_size=0)
    full.setup()
    for train, expect in ((True, (9, 0)), (False, (9, 2))):  # ankle boot, T-shirt / pullover
        tv = FashionMNIST(str(fashion_cache), train=train)
        xs, ys = full.splits["train" if train else "test"].tensors
        for i, label in enumerate(expect):
            img, target = tv[i]  # a PIL image, as torchvision returns it
            assert target == label == ys[i]
            assert np.array_equal(np.asarray(img), xs[i, 0].numpy())
    # test_size: the first n test images, every class among them
    head = FashionMNISTDataModule(cache_dir=str(fashion_cache), test_size=2000)
    head.setup()
    xt, yt = head.splits["test"].tensors
    assert len(yt) == 2000 and torch.equal(xt, full.splits["test"].tensors[0][:2000])
    assert torch.bincount(yt, minlength=10).min() > 150
    with pytest.raises(ConfigError, match="test_size"):
        FashionMNISTDataModule(test_size=0)


@needs_fashion_mnist
def test_fashion_mnist_augmentation_keeps_shapes(fashion_cache):
    dm = FashionMNISTDataModule(cache_dir=str(fashion_cache), batch_size=64)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    aug = dm.transform(x, train=True, generator=torch.Generator().manual_seed(0))
    plain = dm.transform(x, train=False)
    assert aug.shape == plain.shape == x.shape and aug.dtype == torch.float32
    assert not torch.equal(aug, plain) and abs(plain.mean()) < 0.5


def test_fashion_mnist_without_files_says_what_to_do(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = FashionMNISTDataModule(data_dir=str(empty), cache_dir=str(tmp_path / "cache"))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DataUnavailable) as err:
            step()
        msg = str(err.value)
        assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg
        assert "data.data_dir=" in msg
