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


def test_atomic_save_keeps_the_previous_file_when_a_save_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    import os

    from step_lightning import checkpointing
    from step_lightning.checkpointing import AtomicCheckpointIO
    from step_lightning.files import umask

    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~umask())

    def dies_halfway(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # e.g. SIGINT while writing

    monkeypatch.setattr(checkpointing.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    assert os.listdir(target.parent) == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    assert int(io.load_checkpoint(target)["step"]) == 1


def test_resuming_from_a_truncated_checkpoint_says_so(tmp_path: Path) -> None:
    from step_lightning.checkpointing import AtomicCheckpointIO
    from tests.conftest import TinyModule, tiny_loaders, tiny_trainer

    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [], max_steps=2, plugins=[AtomicCheckpointIO()])
    trainer.fit(TinyModule(), train)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint '.*cut.ckpt' is truncated or corrupt .* Pass another "
                                         r"checkpoint as `--ckpt_path`: good.ckpt"):
        tiny_trainer(tmp_path, [], max_steps=4, plugins=[AtomicCheckpointIO()]).fit(TinyModule(), train,
                                                                                  ckpt_path=tmp_path / "cut.ckpt")


def test_cli_reports_a_truncated_ckpt_path(in_tmp: Path) -> None:
    from step_lightning.cli import main

    (in_tmp / "cut.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"`--ckpt_path` 'cut.ckpt' is truncated or corrupt"):
        main(["fit", "--ckpt_path", "cut.ckpt"])


def test_init_from_is_ignored_with_a_warning_outside_fit(in_tmp: Path) -> None:
    # A run's saved config.yaml keeps its init_from; evaluating with that config must still work.
    from step_lightning.cli import QUICKSTART, main
    from tests.test_cli import DEBUG

    with pytest.warns(UserWarning, match="`validate` ignores it"):
        main(["validate", "--config", str(QUICKSTART), "--config", str(DEBUG), "--init_from", "dense.ckpt"])
