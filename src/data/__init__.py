"""Datasets as LightningDataModules, with batched tensor augmentation."""

from src.data.datamodules import (
    CIFARDataModule,
    DataUnavailable,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
    TensorDataModule,
    batches,
)
from src.data.fashion_mnist import FashionMNISTDataModule

__all__ = [
    "CIFARDataModule",
    "DataUnavailable",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "batches",
]
