"""STEPCallback's AutoSwitch through a real Trainer: the statistic it feeds, loss-scale invariance, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from step_lightning import AutoSwitch, STEPCallback
from tests.conftest import TinyModule, tiny_loaders, tiny_trainer

MAX_STEPS = 40  # 8 batches per epoch; t_max = 0.9 -> 36
# On TinyModule the log_drift spread over a window of 8 steps reads 0.29 / 0.26 / 0.26 at step 20 and 0.20 / 0.13 /
# 0.13 at step 24 for loss x 1e-3 / 1 / 1e3: a threshold of 0.25 checked every 4 steps switches after step 24;
# layer_rise (the default statistic) switches after step 12.
DRIFT = dict(autoswitch_window=8, autoswitch_threshold=0.25, autoswitch_check_every=4, autoswitch_t_max=0.9)


class ScaledLoss(TinyModule):
    """TinyModule whose training loss is multiplied by ``scale`` (the gradients scale with it)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * self.scale


def fit(tmp_path: Path, cb: STEPCallback, scale: float = 1.0, **kwargs: Any) -> ScaledLoss:
    pl.seed_everything(0)
    model = ScaledLoss(scale)
    train, _ = tiny_loaders()
    tiny_trainer(tmp_path, [cb], **{"max_steps": MAX_STEPS, **kwargs}).fit(model, train)
    return model


@pytest.mark.parametrize("statistic", ["layer_rise", "log_drift"])
def test_drift_switch_step_does_not_depend_on_the_loss_scale(tmp_path: Path, statistic: str) -> None:
    switches = {}
    for scale in (1e-3, 1.0, 1e3):
        cb = STEPCallback(**{**DRIFT, "autoswitch_statistic": statistic})  # type: ignore[arg-type]
        fit(tmp_path / f"x{scale:g}", cb, scale)
        assert cb.autoswitch is not None
        switches[scale] = (cb.switch_step, cb.autoswitch.switched_by)
    # Within the check interval (4 steps), by the threshold, after t_min (8) and before t_max (36).
    steps = [step for step, _ in switches.values()]
    assert max(steps) - min(steps) <= 4, switches
    assert all(why == "threshold" and 8 < step < 36 for step, why in switches.values()), switches


def test_defaults_watch_layer_rise_with_a_window_that_fits_the_precondition_budget(tmp_path: Path) -> None:
    cb = STEPCallback()
    assert (cb.autoswitch_statistic, cb.autoswitch_threshold) == ("layer_rise", 0.5)
    fit(tmp_path, cb, max_steps=MAX_STEPS)  # t_max = 20: Adam's memory (1000) is cut to a quarter of it
    assert cb.autoswitch is not None and (cb.autoswitch.window, cb.autoswitch.t_max) == (5, 20)


def test_reference_switch_step_moves_with_the_loss_scale(tmp_path: Path) -> None:
    # Evidence, not a requirement: mean |dv| scales with the squared gradients, so against Adam's eps it switches at
    # the first check after t_min for small losses and only at t_max for large ones.
    switches = {}
    for scale in (1e-3, 1.0, 1e3):
        cb = STEPCallback(**{**DRIFT, "autoswitch_statistic": "reference", "autoswitch_threshold": 1e-8})
        with pytest.warns(UserWarning, match="reached autoswitch_t_max") if scale >= 1 else _no_warning():
            fit(tmp_path / f"x{scale:g}", cb, scale)
        assert cb.autoswitch is not None
        switches[scale] = (cb.switch_step, cb.autoswitch.switched_by)
    assert switches == {1e-3: (12, "threshold"), 1.0: (37, "t_max"), 1e3: (37, "t_max")}


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# The optimizer entry each statistic must sample, written out (not read from SAMPLE_KEYS) so a swap fails here.
FED = {"layer_rise": "log_v_hat_layers", "log_drift": "log_v_hat", "reference": "abs_dv", "relative": "rel_dv"}


@pytest.mark.parametrize("statistic", sorted(FED))
def test_callback_feeds_the_configured_statistic(tmp_path: Path, statistic: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fed: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []
    observe = AutoSwitch.observe

    def recording(self: AutoSwitch, value: Any) -> bool:
        fed.append(value.clone())
        stats = cb._optimizer.second_moment_stats  # type: ignore[union-attr]
        expected.append(stats[FED[statistic]].clone())
        others = [v for k, v in stats.items() if k != FED[statistic]]
        assert all(v.shape != value.shape or not torch.equal(v, value) for v in others)  # the entries differ
        return observe(self, value)

    monkeypatch.setattr(AutoSwitch, "observe", recording)
    cb = STEPCallback(**{**DRIFT, "autoswitch_statistic": statistic, "autoswitch_threshold": 1e-30})
    fit(tmp_path, cb, max_steps=12)
    assert cb.autoswitch is not None and cb.autoswitch.statistic == statistic
    assert len(fed) == cb.autoswitch.t_max + 1, (cb.autoswitch.t_max, len(fed))
    assert all(torch.equal(a, b) for a, b in zip(fed, expected, strict=True))


def run_with_checkpoints(tmp_path: Path, ckpt_path: Path | None = None) -> tuple[ScaledLoss, STEPCallback]:
    pl.seed_everything(0 if ckpt_path is None else 123)  # a resumed run must not depend on the fresh init
    cb = STEPCallback(**DRIFT)  # type: ignore[arg-type]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=8,
                                  save_top_k=-1)
    model = ScaledLoss(1.0)
    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [cb, checkpoints], max_steps=MAX_STEPS, enable_checkpointing=True)
    trainer.fit(model, train, ckpt_path=ckpt_path)
    return model, cb


def test_threshold_switch_after_a_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full_model, full_cb = run_with_checkpoints(tmp_path / "full")
    assert full_cb.autoswitch is not None and full_cb.autoswitch.switched_by == "threshold"
    assert full_cb.switch_step is not None and full_cb.switch_step > 8  # the checkpoint is before the switch
    model, cb = run_with_checkpoints(tmp_path / "resumed", tmp_path / "full" / "ckpt" / "step=8.ckpt")
    assert cb.autoswitch is not None and cb.autoswitch.switched_by == "threshold"
    assert cb.switch_step == full_cb.switch_step
    assert cb.autoswitch.history == full_cb.autoswitch.history
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_with_another_statistic_is_an_error(tmp_path: Path) -> None:
    run_with_checkpoints(tmp_path / "full")
    cb = STEPCallback(**{**DRIFT, "autoswitch_statistic": "relative"})
    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path / "other", [cb], max_steps=MAX_STEPS)
    with pytest.raises(ValueError, match=r"watched the 'layer_rise' statistic, this run is configured with 'relative'"):
        trainer.fit(ScaledLoss(1.0), train, ckpt_path=tmp_path / "full" / "ckpt" / "step=8.ckpt")
