"""A user's own images: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import datasets
from torchvision.transforms import v2

from step_lightning.checks import IntAtLeast8, NonNegativeInt, PositiveInt, check_arguments
from step_lightning.data.loading import global_seed, stateful_loader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ClassFolder(datasets.ImageFolder):
    """``ImageFolder`` with a given class list, so ``val`` uses the label indices of ``train``."""

    def __init__(self, root: str, classes: list[str], transform: Any) -> None:
        self._fixed_classes = classes
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: i for i, name in enumerate(self._fixed_classes)}


def _class_dirs(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


class ImageFolderDataModule(pl.LightningDataModule):
    """Images in class folders: ``data_dir/train/<class>/*`` for training, ``data_dir/val/<class>/*`` for validation.

    Any format PIL reads; grayscale, palette and RGBA images are converted to RGB. Each image is resized
    so its shorter side is ``image_size`` and center-cropped to ``image_size x image_size``; training adds
    a random crop with ``image_size // 8`` pixels of zero padding and a horizontal flip (the CIFAR recipe,
    scaled). The classes are the sub-folders of ``train/`` (sorted, as torchvision's ``ImageFolder``);
    their number is available at construction (``num_classes``) and linked to the model by the CLI.
    ``val/`` may lack some classes but not hold others. ``test`` and ``predict`` use ``val/``.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        image_size: side of the square images fed to the model.
        batch_size: images per batch (per process under DDP).
        num_workers: loader worker processes (decoding is the bottleneck: use several).
        augment: random crop and flip for training.
        mean: per-channel mean for normalisation (default: ImageNet's).
        std: per-channel standard deviation for normalisation (default: ImageNet's).

    Raises:
        ValueError: missing folders, no class folders, ``val/`` classes unknown to ``train/``, bad sizes.

    Example::

        data:
          class_path: step_lightning.data.ImageFolderDataModule
          init_args: {data_dir: /data/flowers, image_size: 64, batch_size: 64}
    """

    in_channels = 3

    def __init__(
        self,
        data_dir: str,
        image_size: IntAtLeast8 = 32,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 4,
        augment: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        classes, folder_problems = _check_folders(data_dir)
        check_arguments(ImageFolderDataModule, locals(), flag="--data.{}",
                        extra=[*_normalization_problems(mean, std), *folder_problems])
        root = Path(data_dir)
        self.save_hyperparameters()
        self.data_dir = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes = classes
        self.num_classes = len(classes)
        self.sets: dict[str, _ClassFolder] = {}

    def _transform(self, train: bool) -> v2.Compose:
        size = self.image_size
        steps: list[Any] = [v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        if train and self.augment:
            steps += [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        for split in ("train", "val"):
            self.sets[split] = _ClassFolder(str(self.data_dir / split), self.classes, self._transform(split == "train"))
            if len(self.sets[split]) == 0:
                raise ValueError(f"ImageFolderDataModule: no image files under {self.data_dir / split} (extensions "
                                 f"torchvision reads: {', '.join(datasets.folder.IMG_EXTENSIONS)}).")

    def _loader(self, split: str) -> StatefulDataLoader:
        if split not in self.sets:
            raise RuntimeError(f"ImageFolderDataModule: call setup() before asking for the {split} loader.")
        return stateful_loader(self.sets[split], self.trainer, self.batch_size, split == "train", global_seed(None),
                               num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train")

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("val")

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader("val")

    def prediction_keys(self, dataloader_idx: int = 0) -> tuple[str, list[str]]:
        """The ``path`` of each predicted image (``val/``), for :class:`~step_lightning.callbacks.PredictionWriter`."""
        return "path", [path for path, _ in self.sets["val"].samples]


def _normalization_problems(mean: Sequence[float], std: Sequence[float]) -> list[str]:
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        return [f"`--data.mean` and `--data.std` must hold 3 values (RGB), std > 0; got {list(mean)} and {list(std)}"]
    return []


def _check_folders(data_dir: str) -> tuple[list[str], list[str]]:
    """The class names under ``data_dir/train``, and what is wrong with the ``train/`` and ``val/`` folders."""
    root = Path(data_dir)
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        return [], [f"`--data.data_dir` {data_dir!r} must hold the folders train/ and val/ (one sub-folder per "
                    f"class); missing: {missing}"]
    problems = []
    classes = _class_dirs(root / "train")
    if not classes:
        problems.append(f"`--data.data_dir`: {root / 'train'} holds no class folders")
    unknown = sorted(set(_class_dirs(root / "val")) - set(classes))
    if unknown:
        problems.append(f"`--data.data_dir`: val/ holds classes that train/ lacks: {unknown}")
    return classes, problems
