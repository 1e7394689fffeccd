"""WarmupDecayLR: the shape of each decay, its length from the trainer, resume, and argument errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from step_lightning.optim import WarmupDecayLR


def _lrs(scheduler: WarmupDecayLR, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_shapes(decay: str) -> None:
    lrs = _lrs(WarmupDecayLR(_optimizer(), warmup=4, decay=decay, total_steps=12, min_lr_ratio=0.0), 13)  # type: ignore
    assert lrs[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    expected = {
        "cosine": [1 + math.cos(math.pi * (s - 4) / 8) for s in range(4, 13)],
        "linear": [2 * (1 - (s - 4) / 8) for s in range(4, 13)],
        "constant": [2.0] * 9,
        "inverse_sqrt": [2 * math.sqrt(4 / s) for s in range(4, 13)],
    }[decay]
    assert lrs[4:] == pytest.approx(expected)


def test_fractional_warmup_and_length_set_later_then_state_round_trip() -> None:
    scheduler = WarmupDecayLR(_optimizer(), warmup=0.25, decay="linear", min_lr_ratio=0.5)
    assert scheduler.needs_total_steps and scheduler.get_last_lr() == [0.0]
    scheduler.total_steps = 8  # what the LightningModule does before the first step
    lrs = _lrs(scheduler, 5)
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 2 * (1 - 0.5 / 6), 2 * (1 - 1 / 6)])
    resumed = WarmupDecayLR(_optimizer(), warmup=0.25, decay="linear", min_lr_ratio=0.5)
    resumed.load_state_dict(scheduler.state_dict())
    assert _lrs(resumed, 4) == pytest.approx(_lrs(scheduler, 4))


def test_argument_errors_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        WarmupDecayLR(_optimizer(), warmup=1.5, decay="exp", total_steps=0, min_lr_ratio=2)  # type: ignore[arg-type]
    for arg in ("`warmup`", "`decay`", "`total_steps`", "`min_lr_ratio`"):
        assert arg in str(err.value)
    with pytest.raises(ValueError, match="'inverse_sqrt' needs `warmup` > 0"):
        WarmupDecayLR(_optimizer(), decay="inverse_sqrt")


def test_a_longer_resumed_run_stretches_a_length_taken_from_the_trainer() -> None:
    first = WarmupDecayLR(_optimizer(), decay="linear")
    first.total_steps, first.total_from_trainer = 10, True
    _lrs(first, 6)
    longer = WarmupDecayLR(_optimizer(), decay="linear")
    longer.total_steps, longer.total_from_trainer = 20, True  # e.g. --trainer.max_epochs doubled on resume
    longer.load_state_dict(first.state_dict())
    assert longer.total_steps == 20 and longer.last_epoch == 6
    assert _lrs(longer, 2) == pytest.approx([2 * (1 - 6 / 20), 2 * (1 - 7 / 20)])
    fixed = WarmupDecayLR(_optimizer(), decay="linear", total_steps=30)
    fixed.load_state_dict(first.state_dict())  # a length given in the config is the checkpoint's
    assert fixed.total_steps == 10


def test_following_the_trainer_keeps_a_mid_epoch_resume_exact(tmp_path: Path) -> None:
    """The length is read at the first step: read in configure_optimizers, it made Lightning build the loader
    before restoring the checkpoint, and the resumed run started the epoch over (the first version did)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from step_lightning.data import DigitsDataModule
    from step_lightning.models import ImageClassifier
    from tests.conftest import tiny_trainer

    class Seen(pl.Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, float]] = []

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            self.batches.append((trainer.global_step, float(batch[0].sum())))

    def run(out: Path, ckpt: str | None) -> tuple[list[tuple[int, float]], list[float]]:
        pl.seed_everything(0)
        model = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=8,
                                lr_scheduler=lambda o: WarmupDecayLR(o, warmup=0.1, decay="cosine"))
        seen, saver = Seen(), ModelCheckpoint(dirpath=out, every_n_train_steps=5, save_top_k=-1, filename="{step}")
        trainer = tiny_trainer(out, [seen, saver], max_epochs=2, max_steps=-1, limit_val_batches=0,
                               enable_checkpointing=True)
        trainer.fit(model, DigitsDataModule(batch_size=128), ckpt_path=ckpt)
        return seen.batches, [float(p.detach().sum()) for p in model.parameters()]

    full, weights = run(tmp_path / "a", None)
    resumed, resumed_weights = run(tmp_path / "b", str(tmp_path / "a" / "step=5.ckpt"))
    assert len(full) > 12 and resumed == full[5:]  # step 5 is mid-epoch 0
    assert resumed_weights == weights
    state = torch.load(tmp_path / "a" / "step=5.ckpt", weights_only=False)["lr_schedulers"][0]
    assert "_total_estimate" not in state and state["total_steps"] == len(full)
