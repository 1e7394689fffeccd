"""WarmupDecayLR: the shape of each decay, its length from the trainer, resume, and argument errors."""

from __future__ import annotations

import math

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
