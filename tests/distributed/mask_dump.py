"""Test helper: a callback that saves each rank's recipe state at the end of ``fit`` (launched by test_ddp.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from step_lightning.callbacks.base import NMSparsityCallback


class MaskDump(Callback):
    """Writes ``<out_dir>/rank<global rank>.pt``: the recipe's masks, switch step, phase and step count.

    Args:
        out_dir: where to write (created if missing).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recipe = next(cb for cb in trainer.callbacks if isinstance(cb, NMSparsityCallback))
        engine = recipe.masked_weights
        assert engine is not None and engine.masks is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({
            "world_size": trainer.world_size,
            "masks": {name: mask.cpu() for name, mask in zip(engine.names, engine.masks, strict=True)},
            "switch_step": getattr(recipe, "switch_step", None),
            "phase": getattr(recipe, "phase", None),
            "optimizer_steps": recipe.optimizer_steps,
            "weights": {name: value.cpu() for name, value in engine.dense_values().items()},
        }, self.out_dir / f"rank{trainer.global_rank}.pt")
