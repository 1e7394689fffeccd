"""Crash and resume on both sides of the switch: the same final state as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from step_lightning import ASPCallback, SRSTECallback, STEPCallback
from tests.conftest import TARGETS, TinyModule, tiny_loaders, tiny_trainer

MAX_STEPS = 12  # 4 batches per epoch: checkpoints after steps 4 (before the switch) and 8 (after it)


def make_recipe(recipe: str) -> tuple[pl.Callback, str]:
    if recipe == "step_fixed":
        return STEPCallback(switch=6), "step_adamw"
    if recipe == "step_auto":
        return STEPCallback(switch="auto", autoswitch_window=3, autoswitch_t_max=5), "step_adamw"
    if recipe == "asp":
        return ASPCallback(prune_at=6), "adamw"
    return SRSTECallback(mask_update_interval=3), "adamw"


def run(tmp_path: Path, recipe: str, ckpt_path: Path | None = None) -> tuple[TinyModule, Any, ModelCheckpoint]:
    pl.seed_everything(0 if ckpt_path is None else 123)  # a resumed run must not depend on the fresh init
    callback, optimizer = make_recipe(recipe)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4,
                                  save_top_k=-1)
    model = TinyModule(optimizer)
    train, _ = tiny_loaders(n=32)
    trainer = tiny_trainer(tmp_path, [callback, checkpoints], max_steps=MAX_STEPS, enable_checkpointing=True)
    trainer.fit(model, train, ckpt_path=ckpt_path)
    return model, callback, checkpoints


@pytest.mark.parametrize("recipe", ["step_fixed", "step_auto", "asp", "srste"])
def test_resume_equals_uninterrupted(tmp_path: Path, recipe: str) -> None:
    full_model, full_cb, _ = run(tmp_path / "full", recipe)
    for step in (4, 8):
        ckpt = tmp_path / "full" / "ckpt" / f"step={step}.ckpt"
        model, cb, _ = run(tmp_path / f"resume{step}", recipe, ckpt)
        for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), (step, name)
        assert cb.optimizer_steps == full_cb.optimizer_steps == MAX_STEPS
        if recipe.startswith("step"):
            assert cb.switch_step == full_cb.switch_step == 6 and cb.phase == "mask_learning"
        full_masks, masks = full_cb.masked_weights.masks, cb.masked_weights.masks
        assert all(torch.equal(a, b) for a, b in zip(full_masks, masks, strict=True))
        full_opt, opt = full_model.trainer.optimizers[0], model.trainer.optimizers[0]
        for sa, sb in zip(full_opt.state.values(), opt.state.values(), strict=True):
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


@pytest.mark.parametrize(
    ("recipe", "argument", "step"),
    [
        (lambda: (STEPCallback(switch=0.5), "step_adamw"), "switch", 6),
        (lambda: (STEPCallback(switch="auto", autoswitch_window=3, autoswitch_t_max=0.5), "step_adamw"),
         "autoswitch_t_max", 6),
        (lambda: (ASPCallback(prune_at=0.5), "adamw"), "prune_at", 6),
    ],
)
def test_fractional_steps_resolve_as_when_the_run_started(tmp_path: Path, recipe: Any, argument: str,
                                                          step: int) -> None:
    # Half of 12 steps is step 6. Resumed at step 4 with max_steps=20, half the run would be step 10: the resumed
    # run keeps step 6 (what it would have done uninterrupted) and says so.
    callback, optimizer = recipe()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    train, _ = tiny_loaders(n=32)
    tiny_trainer(tmp_path, [callback, checkpoints], max_steps=MAX_STEPS, enable_checkpointing=True).fit(
        TinyModule(optimizer), train)
    callback, optimizer = recipe()
    with pytest.warns(UserWarning, match=rf"`{argument}`=0.5 resolves to step 10 of this run's 20 optimizer steps, "
                                         rf"but to step {step} when the run started: keeping step {step}"):
        tiny_trainer(tmp_path, [callback], max_steps=20).fit(TinyModule(optimizer), train,
                                                              ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    if isinstance(callback, STEPCallback):
        assert callback.switch_step == step + (argument == "autoswitch_t_max")  # AutoSwitch: after step t_max
    else:
        assert callback.prune_step == step


def test_checkpoint_saved_while_masked_holds_dense_weights(tmp_path: Path) -> None:
    class SaveMidStep(pl.Callback):
        def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
            if trainer.global_step == 3:
                self.masked = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
            if trainer.global_step == 3:
                self.dense = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    saver = SaveMidStep()
    train, _ = tiny_loaders()
    tiny_trainer(tmp_path, [SRSTECallback(), saver], max_steps=5).fit(TinyModule("adamw"), train)
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["state_dict"]
    for n in TARGETS:
        assert not torch.equal(saver.masked[n], saver.dense[n])
        assert torch.equal(state[n], saver.dense[n])


@pytest.mark.parametrize(
    ("resume_with", "message"),
    [
        (lambda: STEPCallback(n=1, m=4, switch=6), r"written by STEPCallback\{'n': 2, 'm': 4\} but this run configures "
                                                   r"STEPCallback\{'n': 1, 'm': 4\}"),
        (lambda: SRSTECallback(), r"written by STEPCallback\{'n': 2, 'm': 4\} but this run configures SRSTECallback"),
        (lambda: STEPCallback(switch=6, exclude=["fc2"]), r"masks a different set of weights.*Only in the checkpoint: "
                                                          r"\['net.fc2.weight'\]; only in this run: \[\]"),
    ],
)
def test_resume_with_a_different_recipe_is_an_error(tmp_path: Path, resume_with: Any, message: str) -> None:
    run(tmp_path / "full", "step_fixed")
    train, _ = tiny_loaders(n=32)
    trainer = tiny_trainer(tmp_path, [resume_with()], max_steps=MAX_STEPS)
    with pytest.raises(ValueError, match=message):
        trainer.fit(TinyModule(), train, ckpt_path=tmp_path / "full" / "ckpt" / "step=8.ckpt")


def test_resume_after_switch_without_frozen_optimizer_state(tmp_path: Path) -> None:
    run(tmp_path / "full", "step_fixed")
    ckpt = torch.load(tmp_path / "full" / "ckpt" / "step=8.ckpt", weights_only=False)
    ckpt["optimizer_states"][0]["state"] = {}  # e.g. an optimizer state that does not belong to this run
    torch.save(ckpt, tmp_path / "broken.ckpt")
    train, _ = tiny_loaders(n=32)
    trainer = tiny_trainer(tmp_path, [STEPCallback(switch=6)], max_steps=MAX_STEPS)
    with pytest.raises(ValueError, match=r"phase 'mask_learning' but the optimizer state has no frozen second moment "
                                         r"for \['net.conv.weight', 'net.fc1.weight', 'net.fc2.weight'\]"):
        trainer.fit(TinyModule(), train, ckpt_path=tmp_path / "broken.ckpt")
