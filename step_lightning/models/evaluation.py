"""Evaluation helpers shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric


def any_updated(metrics: Iterable[Any]) -> bool:
    """Whether any of ``metrics`` (torchmetrics ``Metric``\\ s; other objects are ignored) saw an update."""
    return any(getattr(metric, "update_count", 0) > 0 for metric in metrics if isinstance(metric, Metric))


def updated_on_any_rank(module: pl.LightningModule, local: Sequence[bool]) -> list[bool]:
    """``local`` flags (e.g. "this metric saw a batch here") or-ed over the DDP ranks, one reduce for all.

    Under DDP a rank can get no batch of a small dev set (evaluation does not repeat examples), and torchmetrics'
    ``compute`` is a collective: deciding from every rank's flags makes all ranks take part in the same syncs.
    """
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer: one process
        return list(local)
    if trainer.world_size <= 1:
        return list(local)
    flags = torch.tensor(local, dtype=torch.int32, device=module.device)
    return [bool(v) for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist()]
