"""``configure_optimizers`` shared by the LightningModules: optimizer and schedule come from the config."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch


def configure_optimization(module: pl.LightningModule, params: Iterable[Any],
                           optimizer: Callable[[Any], torch.optim.Optimizer],
                           lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None) -> Any:
    """Build the optimizer from ``params`` and, if given, a scheduler stepped every optimizer step.

    A scheduler with ``total_steps=None`` (e.g. :class:`~step_lightning.optim.WarmupDecayLR`) gets the run's
    optimizer steps from ``trainer.estimated_stepping_batches``, so its length follows the trainer's.
    """
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    scheduler = lr_scheduler(opt)
    if getattr(scheduler, "needs_total_steps", False):
        total = module.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(f"{type(scheduler).__name__} needs the run's length, but the trainer's is unbounded "
                             "(`--trainer.max_steps` -1 and `--trainer.max_epochs` -1 or an iterable without a "
                             "length): set `--trainer.max_steps` or the scheduler's `total_steps`.")
        scheduler.total_steps = int(total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
