"""MNIST from a local folder of ``{train,val,test}.npz`` arrays (written by ``studies/get_data.py``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from step_lightning.checks import NonNegativeInt, PositiveInt, check_arguments
from step_lightning.data.loading import global_seed, stateful_loader

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Mean and std of the MNIST training pixels in [0, 1] (the values every MNIST codebase uses).
MEAN, STD = 0.1307, 0.3081


def read_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32, normalised with :data:`MEAN`/:data:`STD`, and labels ``(N,)`` int64.

    Reads ``<data_dir>/<split>.npz``: ``images`` uint8 ``(N, 28, 28)`` and ``labels`` ``(N,)`` integers 0-9.

    Raises:
        FileNotFoundError: the file is missing (the message says how to make it).
        ValueError: the arrays do not have those shapes, types or values.
    """
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"MNISTDataModule: {path} is missing (`--data.data_dir`={str(data_dir)!r}). "
                                "Build it with `python studies/get_data.py --out data/studies` (the study's data; it "
                                "writes data/studies/mnist/{train,val,test}.npz), or point `--data.data_dir` at such "
                                "a folder.")
    with np.load(path) as arrays:
        if "images" not in arrays or "labels" not in arrays:
            raise ValueError(f"MNISTDataModule: {path} holds {sorted(arrays.files)}, expected 'images' and 'labels'.")
        images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise ValueError(f"MNISTDataModule: {path} must hold uint8 images (N, 28, 28) and N labels; got images "
                         f"{images.dtype} {images.shape}, {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"MNISTDataModule: {path} has labels outside 0..9 ({labels.min()}..{labels.max()}).")
    x = (torch.from_numpy(images).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


class MNISTDataModule(pl.LightningDataModule):
    """MNIST 28x28 grayscale digits from ``data_dir/{train,val,test}.npz``, fully offline.

    ``studies/get_data.py`` writes the classic 50,000 / 10,000 / 10,000 split of ``mnist.pkl.gz`` there (the
    ``val`` images are the last 10,000 of MNIST's official training set; ``test`` is MNIST's test set).
    Pixels are scaled to ``[0, 1]`` and normalised with MNIST's mean and std; no augmentation. The whole set
    lives in memory as tensors (190 MB as float32). ``train_size`` keeps a fixed, seeded subset of the
    training images (shorter epochs on a CPU). Loaders are ``torchdata``'s ``StatefulDataLoader``, which
    Lightning checkpoints, so a run resumes mid-epoch.

    Args:
        data_dir: the folder holding ``train.npz``, ``val.npz`` and ``test.npz``.
        batch_size: training images per batch (per process under DDP).
        eval_batch_size: validation/test images per batch; ``None``: ``batch_size``.
        train_size: train on this many images, a seeded random subset; ``None``: all of them.
        num_workers: DataLoader worker processes (the data is in memory: 0 is fastest).
        seed: seed of the subset and of the shuffling under DDP; default: the run's ``seed_everything`` seed
            for the shuffling and 0 for the subset (every seed trains on the same images).

    Attributes:
        num_classes, in_channels, image_size: 10, 1 and 28; linked into the model by the CLI.

    Raises:
        ValueError: an invalid argument, or ``train_size`` larger than the training set.
        FileNotFoundError: a missing ``.npz`` file (run ``python studies/get_data.py``).

    Example::

        data:
          class_path: step_lightning.data.MNISTDataModule
          init_args: {data_dir: data/studies/mnist, batch_size: 128, train_size: 20000}
    """

    num_classes = 10
    classes = tuple(str(digit) for digit in range(10))
    in_channels = 1
    image_size = 28

    def __init__(self, data_dir: str = "data/studies/mnist", batch_size: PositiveInt = 128,
                 eval_batch_size: PositiveInt | None = None, train_size: PositiveInt | None = None,
                 num_workers: NonNegativeInt = 0, seed: int | None = None) -> None:
        super().__init__()
        check_arguments(MNISTDataModule, locals(), flag="--data.{}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_size = train_size
        self.num_workers = num_workers
        self.seed = seed
        self.sets: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        for split in SPLITS:  # fail before anything is built, with the command that makes the data
            if not (Path(self.data_dir) / f"{split}.npz").is_file():
                read_split(self.data_dir, split)

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        for split in SPLITS:
            x, y = read_split(self.data_dir, split)
            if split == "train" and self.train_size is not None:
                if self.train_size > len(y):
                    raise ValueError(f"MNISTDataModule: `--data.train_size`={self.train_size} exceeds the "
                                     f"{len(y)} training images in {self.data_dir}.")
                generator = torch.Generator().manual_seed(self.seed or 0)
                keep = torch.randperm(len(y), generator=generator)[: self.train_size]
                x, y = x[keep], y[keep]
            self.sets[split] = TensorDataset(x, y)

    def _loader(self, split: str, train: bool) -> StatefulDataLoader:
        if split not in self.sets:
            raise RuntimeError(f"MNISTDataModule: call setup() before asking for the {split} loader.")
        return stateful_loader(self.sets[split], self.trainer, self.batch_size if train else self.eval_batch_size,
                               train, global_seed(self.seed), num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", train=False)
