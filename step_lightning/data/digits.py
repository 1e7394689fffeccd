"""The quickstart data: scikit-learn's bundled 8x8 handwritten digits (offline, 1,797 images)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset, random_split
from torchdata.stateful_dataloader import StatefulDataLoader

from step_lightning.checks import NonNegativeInt, OpenUnitInterval, PositiveInt, check_arguments
from step_lightning.data.loading import stateful_loader


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``), shipped inside scikit-learn.

    Images are scaled to ``[0, 1]`` and shaped ``(1, 8, 8)``; ``val_split`` of them (a fixed, seeded
    split) form the validation set, which also serves ``test``. Nothing is downloaded.

    Args:
        batch_size: samples per training batch.
        val_split: fraction of the 1,797 images held out for validation, in (0, 1).
        num_workers: DataLoader worker processes (the whole set is a 0.5 MB tensor: 0 is fastest).
        seed: seed of the train/validation split.
    """

    num_classes = 10
    classes = tuple(str(digit) for digit in range(10))
    in_channels = 1
    image_size = 8

    def __init__(self, batch_size: PositiveInt = 64, val_split: OpenUnitInterval = 0.2, num_workers: NonNegativeInt = 0,
                 seed: int = 0) -> None:
        super().__init__()
        check_arguments(DigitsDataModule, locals(), flag="--data.{}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_split = val_split
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        full = TensorDataset(images, labels)
        n_val = round(len(full) * self.val_split)
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(full, [len(full) - n_val, n_val], generator=generator)
        self.train_set = TensorDataset(*full[train.indices])
        self.val_set = TensorDataset(*full[val.indices])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> StatefulDataLoader:
        assert dataset is not None, "setup() first"
        return stateful_loader(dataset, self.trainer, self.batch_size, shuffle, self.seed, num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)
