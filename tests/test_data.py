"""Data modules and the batched CIFAR augmentation."""

import pytest
import torch
import torch.nn.functional as F

from src.data import CIFARDataModule, DataUnavailable, DigitsDataModule, SyntheticDataModule
from src.data.augment import random_crop_flip
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
