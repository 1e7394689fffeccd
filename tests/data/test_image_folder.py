"""ImageFolderDataModule: class discovery, mixed formats and modes, train/val label agreement, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from step_lightning.data import ImageFolderDataModule


def _image(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def make_image_folder(root: Path) -> Path:
    """train/{ant,bee,cat} with PNG/JPEG, grayscale/RGB/RGBA of several sizes; val/ lacks 'bee'."""
    specs = [("L", (20, 30), "png"), ("RGB", (40, 24), "jpg"), ("RGBA", (16, 16), "png")]
    for i, cls in enumerate(("ant", "bee", "cat")):
        for j, (mode, size, ext) in enumerate(specs):
            _image(root / "train" / cls / f"{j}.{ext}", mode, size, seed=10 * i + j)
    for cls in ("ant", "cat"):
        _image(root / "val" / cls / "0.png", "RGB", (32, 32), seed=99)
    return root


def test_classes_discovered_before_setup_and_batches_are_rgb_squares(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(str(make_image_folder(tmp_path)), image_size=16, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["ant", "bee", "cat"] and dm.in_channels == 3
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.max() < 3
    xs, ys = next(iter(dm.val_dataloader()))
    assert xs.shape == (2, 3, 16, 16)
    assert ys.tolist() == [0, 2]  # val/ lacks 'bee': 'cat' keeps its training index


def test_layout_errors_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`--data.data_dir` .* must hold the folders train/ and val/.*val"):
        (tmp_path / "train" / "a").mkdir(parents=True)
        ImageFolderDataModule(str(tmp_path))
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"val/ holds classes that train/ lacks: \['zebra'\]"):
        ImageFolderDataModule(str(tmp_path))
    with pytest.raises(ValueError, match=r"`--data\.image_size` must be an integer >= 8, got 4"):
        ImageFolderDataModule(str(tmp_path), image_size=4)


def test_no_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(ValueError, match="no image files under"):
        dm.setup("fit")
