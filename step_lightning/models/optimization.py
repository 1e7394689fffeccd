"""``configure_optimizers`` shared by the LightningModules: optimizer and schedule come from the config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch


def configure_optimization(module: pl.LightningModule, params: Iterable[Any],
                           optimizer: Callable[[Any], torch.optim.Optimizer],
                           lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None) -> Any:
    """Build the optimizer from ``params`` and, if given, a scheduler stepped every optimizer step.

    A scheduler with ``total_steps=None`` (e.g. :class:`~step_lightning.optim.WarmupDecayLR`) gets the run's
    optimizer steps from ``trainer.estimated_stepping_batches`` at its first step, so its length follows the
    trainer's (asking here, in ``configure_optimizers``, would make Lightning build the training loader before
    restoring a checkpoint and lose the loader's mid-epoch position).
    """
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    scheduler = lr_scheduler(opt)
    if getattr(scheduler, "needs_total_steps", False):
        trainer = module.trainer
        if trainer.max_steps == -1 and trainer.max_epochs in (None, -1):
            raise ValueError(f"{type(scheduler).__name__} needs the run's length, but the trainer's is unbounded "
                             "(`--trainer.max_steps` -1 and `--trainer.max_epochs` -1): set `--trainer.max_steps` "
                             "or the scheduler's `total_steps`.")
        scheduler.follow_trainer(lambda: trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def parameter_groups(module: torch.nn.Module, no_decay: tuple[str, ...] = ("bias", "norm")) -> list[dict[str, Any]]:
    """Two parameter groups, the Hugging Face / BERT convention: no weight decay on biases and norm weights.

    A parameter goes to the ``weight_decay=0`` group when it is 1-D (biases, LayerNorm/BatchNorm weights) or
    its name contains one of ``no_decay`` (case-insensitive); the other group sets no ``weight_decay`` key,
    so the optimizer's own value applies (``StepAdamW(lr=..., weight_decay=0.01)`` in a config works as is).
    Frozen parameters are left out. Empty groups are dropped.
    """
    decay, plain = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        (plain if param.ndim <= 1 or any(key in lowered for key in no_decay) else decay).append(param)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups
