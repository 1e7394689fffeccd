"""MNISTDataModule on tiny .npz folders written here: shapes, scaling, the seeded subset, every user error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from step_lightning.data import MNISTDataModule
from step_lightning.data.mnist import MEAN, STD


def write_mnist(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``{train,val,test}.npz`` of random uint8 28x28 images and labels 0-9, as studies/get_data.py writes them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (sizes or {"train": 40, "val": 12, "test": 10}).items():
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                 labels=rng.integers(0, 10, n).astype(np.uint8))
    return folder


def test_reads_every_split_scaled_and_normalised(tmp_path: Path) -> None:
    folder = write_mnist(tmp_path / "mnist")
    dm = MNISTDataModule(data_dir=str(folder), batch_size=8, eval_batch_size=5)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    images, labels = np.load(folder / "val.npz")["images"], np.load(folder / "val.npz")["labels"]
    vx, vy = next(iter(dm.val_dataloader()))  # not shuffled: the file's first rows
    assert vx.shape[0] == 5
    torch.testing.assert_close(vx[:, 0], (torch.from_numpy(images[:5]).float() / 255 - MEAN) / STD)
    assert vy.tolist() == labels[:5].tolist()
    assert len(dm.test_dataloader().dataset) == 10 and len(dm.predict_dataloader().dataset) == 10


def test_train_size_is_a_fixed_seeded_subset(tmp_path: Path) -> None:
    folder = write_mnist(tmp_path / "mnist")
    subsets = []
    for _ in range(2):
        dm = MNISTDataModule(data_dir=str(folder), train_size=16)
        dm.setup("fit")
        subsets.append(dm.sets["train"].tensors[1])
    assert len(subsets[0]) == 16 and torch.equal(subsets[0], subsets[1])
    with pytest.raises(ValueError, match=r"`--data.train_size`=41 exceeds the 40 training images"):
        MNISTDataModule(data_dir=str(folder), train_size=41).setup("fit")


def test_missing_folder_says_how_to_make_it(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"train.npz is missing .*`python studies/get_data.py --out data/st"):
        dm.prepare_data()


def test_bad_arrays_and_arguments(tmp_path: Path) -> None:
    folder = write_mnist(tmp_path / "mnist")
    np.savez(folder / "val.npz", images=np.zeros((3, 28, 28), dtype=np.float32), labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"must hold uint8 images \(N, 28, 28\)"):
        MNISTDataModule(data_dir=str(folder)).setup("fit")
    np.savez(folder / "val.npz", images=np.zeros((3, 28, 28), dtype=np.uint8), labels=np.array([0, 1, 10]))
    with pytest.raises(ValueError, match=r"labels outside 0..9"):
        MNISTDataModule(data_dir=str(folder)).setup("fit")
    np.savez(folder / "val.npz", pixels=np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected 'images' and 'labels'"):
        MNISTDataModule(data_dir=str(folder)).setup("fit")
    with pytest.raises(ValueError, match=r"`--data.batch_size` must be an integer >= 1, got 0"):
        MNISTDataModule(batch_size=0)
