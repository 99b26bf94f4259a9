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

__all__ = [
    "CIFARDataModule",
    "DataUnavailable",
    "DigitsDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "batches",
]
