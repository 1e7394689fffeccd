"""CIFAR-10 / CIFAR-100, with the standard augmentation on the CPU or batched on the accelerator."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import datasets
from torchvision.transforms import v2

from step_lightning.checks import NonNegativeInt, PositiveInt, UnitIntervalOpenRight, check_arguments
from step_lightning.data.augment import crop_flip, normalization, normalize
from step_lightning.data.loading import global_seed, stateful_loader

CIFARName = Literal["cifar10", "cifar100"]
_TORCHVISION = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
# Per-channel mean and std of the training images (the values every CIFAR codebase uses).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
PADDING = 4


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_files(data_dir: str | Path, dataset: CIFARName) -> dict[str, Any]:
    """Where the standard CIFAR distribution keeps its files under ``data_dir`` (torchvision's layout)."""
    tv = _TORCHVISION[dataset]
    folder = Path(data_dir) / tv.base_folder
    return {
        "archive": Path(data_dir) / tv.filename,
        "folder": folder,
        "train": [folder / name for name, _ in tv.train_list],
        "test": [folder / name for name, _ in tv.test_list],
    }


def read_cifar(data_dir: str | Path, dataset: CIFARName, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one split, from the extracted batches.

    Reads the pickled batches of the original distribution (``cifar-10-batches-py/data_batch_1`` ...,
    ``cifar-100-python/train`` ...) without checksums, so any data in that format loads.
    """
    files = cifar_files(data_dir, dataset)["train" if train else "test"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFARDataModule: {dataset} files missing under `--data.data_dir`: {missing}.")
    images, labels = [], []
    for path in files:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the format of the official distribution
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"CIFARDataModule: {path} holds images of shape {data.shape}, expected (N, 3072).")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


class AugmentedImages(Dataset):
    """uint8 ``(N, C, H, W)`` images and labels; each item goes through a torchvision transform (CPU path)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class BatchIndices(Dataset):
    """Positions ``0..N-1``, fetched a whole batch at a time (device path: the data is already on device)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor(indices, dtype=torch.long)


def _identity(batch: Any) -> Any:
    return batch


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10 or CIFAR-100 with the standard augmentation: 4-pixel padded random crop, flip, normalise.

    ``prepare_data`` (one process per node) downloads with torchvision into ``data_dir`` unless the data
    is already there, either extracted (``cifar-10-batches-py/``, ``cifar-100-python/``) or as the
    original archive (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``), which is extracted; so
    runs work offline once ``data_dir`` holds the standard layout.

    Two input pipelines give the same distribution of augmented images:

    * CPU (``gpu_augment=False``): torchvision ``v2`` transforms per image in ``num_workers`` workers.
    * device-resident (``gpu_augment=True``): the uint8 dataset (150 MB for CIFAR) is copied once to the
      accelerator; the loader yields index batches and :meth:`on_after_batch_transfer` gathers the
      images, crops, flips and normalises the whole batch on the device. Its generator is re-seeded for
      every batch from (seed, rank, batch count), and the batch count is saved in checkpoints, so every
      rank of a resumed run draws exactly the augmentations of an uninterrupted one.

    Validation uses the official test set (the papers' convention) unless ``val_split`` > 0, which
    holds out that seeded fraction of the training set; ``test`` always uses the test set. Loaders are
    ``torchdata``'s ``StatefulDataLoader``, which Lightning checkpoints, so a run resumes mid-epoch.

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        data_dir: where the data is (or is downloaded to).
        batch_size: images per batch (per process under DDP).
        num_workers: CPU-path loader workers (the device path needs none).
        val_split: fraction of the training set held out for validation, in [0, 1).
        augment: random crop and flip for training (normalisation is always applied).
        gpu_augment: ``"auto"``: the device path when the trainer runs on a GPU (CUDA or MPS), the CPU
            path otherwise; ``True``/``False`` force one (``True`` on CPU runs the batched path on CPU).
        seed: seed of the validation split, of the shuffling under DDP and of the device path's
            augmentations; default: the run's ``seed_everything`` seed.

    Example::

        data:
          class_path: step_lightning.data.CIFARDataModule
          init_args: {dataset: cifar10, data_dir: data/, batch_size: 128}
    """

    in_channels = 3
    image_size = 32

    def __init__(
        self,
        dataset: CIFARName = "cifar10",
        data_dir: str = "data/",
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 4,
        val_split: UnitIntervalOpenRight = 0.0,
        augment: bool = True,
        gpu_augment: bool | Literal["auto"] = "auto",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_arguments(CIFARDataModule, locals(), flag="--data.{}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.augment = augment
        self.gpu_augment = gpu_augment
        self.seed = seed
        self.num_classes = 10 if dataset == "cifar10" else 100
        # Class names for written predictions (CIFAR-100's 100 fine labels are written as numbers).
        self.classes = CIFAR10_CLASSES if dataset == "cifar10" else None
        self.mean, self.std = STATS[dataset]
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._device_splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._batches_drawn = 0  # training batches augmented so far: equal on every rank, checkpointed
        self.use_device_path = gpu_augment is True

    # ---- data on disk ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        files = cifar_files(self.data_dir, self.dataset)
        if all(f.is_file() for f in files["train"] + files["test"]):
            return
        # Work in a private folder next to the data and rename the result into place: nodes that share a
        # filesystem each run this (one process per node), and none may read another's half-written files.
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".cifar-", dir=self.data_dir) as tmp:
            if files["archive"].is_file():
                from torchvision.datasets.utils import extract_archive

                rank_zero_info(f"CIFARDataModule: extracting {files['archive']}")
                extract_archive(str(files["archive"]), tmp)
            else:
                try:
                    _TORCHVISION[self.dataset](tmp, train=True, download=True)
                except Exception as err:  # no network, proxy, disk full...
                    raise RuntimeError(
                        f"CIFARDataModule: {self.dataset} is not under `--data.data_dir` {self.data_dir!r} and "
                        f"downloading it failed ({type(err).__name__}: {err}). Put the official archive "
                        f"{files['archive'].name} or its extracted folder {files['folder'].name}/ there."
                    ) from err
            with contextlib.suppress(OSError):  # another node finished first: its copy is complete
                os.replace(Path(tmp) / files["folder"].name, files["folder"])

    @property
    def _seed(self) -> int:
        return global_seed(self.seed)

    def setup(self, stage: str) -> None:
        if self.gpu_augment == "auto":
            self.use_device_path = self.trainer is not None and self.trainer.strategy.root_device.type in ("cuda",
                                                                                                          "mps")
        if self.splits:
            return
        images, labels = read_cifar(self.data_dir, self.dataset, train=True)
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"CIFARDataModule: `--data.dataset` is {self.dataset!r} but the training labels go up to "
                             f"{int(labels.max())}; is `--data.data_dir` holding the other CIFAR?")
        test = read_cifar(self.data_dir, self.dataset, train=False)
        if self.val_split > 0:
            n_val = round(len(labels) * self.val_split)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self._seed))
            val_idx, train_idx = order[:n_val], order[n_val:]
            self.splits = {"train": (images[train_idx], labels[train_idx]), "val": (images[val_idx], labels[val_idx])}
        else:
            self.splits = {"train": (images, labels), "val": test}
        self.splits["test"] = test

    # ---- loaders ----------------------------------------------------------------------------------------
    def _cpu_transform(self, train: bool) -> v2.Compose:
        steps: list[Any] = []
        if train and self.augment:
            steps += [v2.RandomCrop(32, padding=PADDING), v2.RandomHorizontalFlip()]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def _loader(self, split: str) -> StatefulDataLoader:
        if split not in self.splits:
            raise RuntimeError(f"CIFARDataModule: call setup() before asking for the {split} loader.")
        images, labels = self.splits[split]
        train = split == "train"
        if self.use_device_path:
            # Index batches only; images are gathered and augmented on the device after the transfer.
            return stateful_loader(BatchIndices(len(labels)), self.trainer, self.batch_size, train, self._seed,
                                   collate_fn=_identity)
        return stateful_loader(AugmentedImages(images, labels, self._cpu_transform(train)), self.trainer,
                               self.batch_size, train, self._seed, num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train")

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader("test")

    # ---- the device path --------------------------------------------------------------------------------
    def _split_of_stage(self) -> str:
        trainer = self.trainer
        if trainer is None or trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        return "test"  # testing and predicting

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        # Seeding is host-side only (CUDA generators are counter-based): cheap, and no state to save but a count.
        self._generator.manual_seed(((self._seed * 1_000_003 + rank) * 2_147_483_647 + self._batches_drawn) % 2**63)
        self._batches_drawn += 1
        return self._generator

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.use_device_path:
            return batch
        split = self._split_of_stage()
        device = batch.device
        if split not in self._device_splits or self._device_splits[split][0].device != device:
            images, labels = self.splits[split]
            # Once per split and device: 150 MB for CIFAR's training set.
            self._device_splits[split] = (images.to(device), labels.to(device))
            self._norm = normalization(self.mean, self.std, device)
        images, labels = self._device_splits[split]
        x = images.index_select(0, batch)
        if split == "train" and self.augment:
            x = crop_flip(x, PADDING, self._device_generator(device))
        assert self._norm is not None
        return normalize(x, *self._norm), labels.index_select(0, batch)

    def state_dict(self) -> dict[str, Any]:
        return {"augmented_batches": self._batches_drawn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches_drawn = int(state_dict.get("augmented_batches", 0))
