"""Learning-rate schedules whose length is the run's: warm-up, then cosine / linear / no decay."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from step_lightning.checks import ClosedUnitInterval, PositiveInt, UnitIntervalOpenRight, check_arguments

Decay = Literal["cosine", "linear", "constant", "inverse_sqrt"]


class WarmupDecayLR(LRScheduler):
    """Linear warm-up from 0, then a decay to ``min_lr_ratio`` of the base learning rate at ``total_steps``.

    Stepped once per optimizer step (the models register it with ``interval="step"``). ``total_steps=None``
    (the default in configs) means "the run's optimizer steps": the LightningModule has it taken from
    ``trainer.estimated_stepping_batches`` at the first step (:meth:`follow_trainer`), so the schedule follows
    ``max_epochs``/``max_steps``/accumulation without being typed twice.

    Args:
        optimizer: the wrapped optimizer.
        warmup: warm-up length: a float in [0, 1) is a fraction of ``total_steps``, an int >= 1 a step count.
        decay: after warm-up, ``"cosine"`` (half cosine to ``min_lr_ratio``), ``"linear"`` (straight line
            to ``min_lr_ratio``), ``"constant"`` (no decay), or ``"inverse_sqrt"`` (``sqrt(warmup/step)``,
            the Transformer schedule; it ignores ``total_steps`` and ``min_lr_ratio``).
        total_steps: optimizer steps of the run; ``None``: set by the LightningModule from the trainer.
        min_lr_ratio: final learning rate as a fraction of the base one.
        last_epoch: the index of the last step, for resuming (``-1``: start).

    Example::

        model:
          init_args:
            lr_scheduler:
              class_path: step_lightning.optim.WarmupDecayLR
              init_args: {warmup: 0.1, decay: linear}
    """

    def __init__(self, optimizer: Optimizer, warmup: UnitIntervalOpenRight | PositiveInt = 0.0,
                 decay: Decay = "cosine", total_steps: PositiveInt | None = None,
                 min_lr_ratio: ClosedUnitInterval = 0.0, last_epoch: int = -1) -> None:
        cross = ["`decay`='inverse_sqrt' needs `warmup` > 0 (the decay is sqrt(warmup / step))"] \
            if decay == "inverse_sqrt" and warmup == 0 else []
        check_arguments(WarmupDecayLR, locals(), extra=cross)
        # Plain numbers: the scheduler's state_dict (its __dict__) goes into checkpoints.
        self.warmup: int | float = int(warmup) if isinstance(warmup, int) else float(warmup)
        self.decay = decay
        self.total_steps = None if total_steps is None else int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.total_from_trainer = False  # set by the LightningModule when it fills in total_steps
        super().__init__(optimizer, last_epoch)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position; a length taken from the trainer stays the current run's (a resumed run with
        more epochs stretches the rest of the schedule instead of sitting at ``min_lr_ratio``)."""
        current = self.total_steps if self.total_from_trainer else None
        super().load_state_dict(state_dict)
        if current is not None and current != self.total_steps:
            self.total_steps = current
            self.total_from_trainer = True
            # The restored optimizer holds the learning rate of the old length: set this position's now
            # (Lightning restores optimizers before schedulers).
            self._last_lr = [base * self.factor(self.last_epoch) for base in self.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
                group["lr"] = lr
        elif current is not None:
            self.total_from_trainer = True

    def follow_trainer(self, estimate: Callable[[], float]) -> None:
        """Take ``total_steps`` from ``estimate()`` (``trainer.estimated_stepping_batches``) at the first step.

        Not earlier: asked in ``configure_optimizers``, Lightning builds the training loader before it restores
        a checkpoint, and the loader's saved position is then never applied (a mid-epoch resume would start
        the epoch over). By the first step the loader exists and the estimate costs nothing. The first step's
        learning rate never depends on the length (0 with warm-up, the base rate without).
        """
        self._total_estimate: Callable[[], float] | None = estimate

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_total_estimate", None)  # a closure over the trainer: not part of the schedule's state
        return state

    def _resolve_total(self) -> None:
        estimate = self.__dict__.get("_total_estimate")
        if estimate is None:
            return
        self._total_estimate = None
        total = estimate()
        if not math.isfinite(total) or total < 1:
            raise ValueError(f"WarmupDecayLR(warmup={self.warmup!r}, decay={self.decay!r}) needs the run's length, "
                             f"but the trainer's is unbounded ({total}: `--trainer.max_steps` -1 with an unbounded "
                             "`--trainer.max_epochs` or a training loader without a length): set "
                             "`--trainer.max_steps` or the scheduler's `total_steps`.")
        self.total_steps, self.total_from_trainer = int(total), True

    @property
    def needs_total_steps(self) -> bool:
        """True while the length of the run is still unknown and the schedule depends on it."""
        return self.total_steps is None and (self.warmup < 1 or self.decay in ("cosine", "linear"))

    def warmup_steps(self, total_steps: int | None = None) -> int:
        """The number of warm-up steps; a fractional ``warmup`` needs ``total_steps`` (or the schedule's own)."""
        if self.warmup >= 1:
            return int(self.warmup)
        if self.warmup == 0:
            return 0
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None:
            raise RuntimeError("WarmupDecayLR: `warmup` is a fraction of the run but `total_steps` is not set.")
        return max(1, round(self.warmup * total))

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate after ``step`` optimizer steps."""
        warmup = self.warmup_steps()
        if step < warmup:
            return step / warmup
        if self.decay == "constant":
            return 1.0
        if self.decay == "inverse_sqrt":
            return math.sqrt(warmup / max(step, 1))
        if self.total_steps is None:
            raise RuntimeError(f"WarmupDecayLR: decay={self.decay!r} needs `total_steps`.")
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:  # at construction the run's length may not be known yet
            factor = 0.0 if self.warmup else 1.0
        else:
            self._resolve_total()
            factor = self.factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]
