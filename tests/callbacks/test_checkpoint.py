"""LastCheckpoint against Lightning's ModelCheckpoint(save_last=True, every_n_train_steps=N, save_top_k=0), side by
side in one Trainer: the differences LastCheckpoint's docstring names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from step_lightning.callbacks import LastCheckpoint
from step_lightning.checkpointing import AtomicCheckpointIO
from tests.conftest import TinyModule, tiny_loaders, tiny_trainer


def _step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["global_step"])


class Probe(pl.Callback):
    """Reads both last.ckpt files at the start of each training batch (after the previous step's saves)."""

    def __init__(self, ours: Path, theirs: Path) -> None:
        self.ours, self.theirs = ours, theirs
        self.seen: dict[int, tuple[int | None, int | None]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen[trainer.global_step] = tuple(  # type: ignore[assignment]
            _step_of(p) if p.is_file() else None for p in (self.ours, self.theirs))


class FailAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise FloatingPointError(f"failed at step {self.step}")


def _callbacks(tmp_path: Path, **theirs: Any) -> tuple[LastCheckpoint, ModelCheckpoint, Path, Path]:
    ours = LastCheckpoint(every_n_train_steps=3, dirpath=str(tmp_path / "ours"))
    lightning = ModelCheckpoint(dirpath=tmp_path / "theirs", save_last=True, every_n_train_steps=3, save_top_k=0,
                                **theirs)
    return ours, lightning, tmp_path / "ours" / "last.ckpt", tmp_path / "theirs" / "last.ckpt"


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    return tiny_trainer(tmp_path, callbacks, plugins=[AtomicCheckpointIO()], enable_checkpointing=True, **kwargs)


def test_last_ckpt_follows_every_validation_and_the_end_of_training(tmp_path: Path) -> None:
    ours, lightning, ours_file, theirs_file = _callbacks(tmp_path)
    probe = Probe(ours_file, theirs_file)
    train, val = tiny_loaders()  # 8 batches an epoch
    trainer = _trainer(tmp_path, [probe, ours, lightning], max_steps=7, val_check_interval=5)
    trainer.fit(TinyModule(), train, val)
    # Both save at step 3 and 6. After the validation at step 5 ours holds step 5, Lightning's still step 3.
    assert probe.seen[4] == (3, 3)
    assert probe.seen[5] == (5, 3)
    assert probe.seen[6] == (6, 6)
    # At the end of training (step 7, not a multiple of 3) ours holds the final state, Lightning's step 6.
    assert (_step_of(ours_file), _step_of(theirs_file)) == (7, 6)


def test_an_exception_leaves_last_ckpt_as_last_saved(tmp_path: Path) -> None:
    ours, lightning, ours_file, theirs_file = _callbacks(tmp_path, save_on_exception=True)
    train, val = tiny_loaders()
    trainer = _trainer(tmp_path, [FailAt(5), ours, lightning], max_steps=7)
    with pytest.raises(FloatingPointError, match="failed at step 5"):
        trainer.fit(TinyModule(), train, val)
    # Ours keeps the step-3 save; Lightning's `save_on_exception` overwrites last.ckpt with the failed run's state.
    assert (_step_of(ours_file), _step_of(theirs_file)) == (3, 5)


def test_an_existing_last_ckpt_is_replaced_not_versioned(tmp_path: Path) -> None:
    ours, lightning, ours_file, theirs_file = _callbacks(tmp_path)
    for path in (ours_file, theirs_file):  # left by an earlier run in the same folder
        path.parent.mkdir(parents=True)
        torch.save({"global_step": -1}, path)
    train, val = tiny_loaders()
    trainer = _trainer(tmp_path, [ours, lightning], max_steps=3)
    trainer.fit(TinyModule(), train, val)
    assert _step_of(ours_file) == 3 and sorted(p.name for p in ours_file.parent.iterdir()) == ["last.ckpt"]
    assert _step_of(theirs_file) == -1 and _step_of(theirs_file.parent / "last-v1.ckpt") == 3
