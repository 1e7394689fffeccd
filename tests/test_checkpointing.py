"""`fit --init_from`: weights of a checkpoint into a new run; clear errors for wrong or broken files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_lightning.checkpointing import load_weights
from step_lightning.models import ImageClassifier


def test_loads_a_lightning_checkpoint_and_a_plain_state_dict(tmp_path: Path) -> None:
    source = ImageClassifier("small_cnn", width=16)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "run.ckpt")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    for name in ("run.ckpt", "model.pt"):
        target = ImageClassifier("small_cnn", width=16)
        load_weights(target, tmp_path / name)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_mismatch_and_broken_files_are_explained(tmp_path: Path) -> None:
    torch.save(ImageClassifier("small_cnn", width=16, num_classes=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ValueError, match=r"does not fit the configured ImageClassifier: different shapes .*"
                                         r"net\.head\.weight: \(5, 64\) in the file, \(10, 64\) in the model"):
        load_weights(ImageClassifier("small_cnn", width=16), tmp_path / "five.pt")
    torch.save(ImageClassifier("small_cnn", width=32).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different shapes"):
        load_weights(ImageClassifier("small_cnn", width=16), tmp_path / "other.pt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "five.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"is not a readable PyTorch checkpoint .* truncated or corrupt"):
        load_weights(ImageClassifier("small_cnn", width=16), tmp_path / "cut.ckpt")
    with pytest.raises(FileNotFoundError, match=r"`--init_from` '.*missing.ckpt' does not exist"):
        load_weights(ImageClassifier("small_cnn", width=16), tmp_path / "missing.ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="neither a Lightning checkpoint nor a state_dict"):
        load_weights(ImageClassifier("small_cnn", width=16), tmp_path / "odd.pt")
