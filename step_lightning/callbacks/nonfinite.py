"""NonFiniteLossWatch: notice a NaN/inf training loss without a host sync per step, report its first step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

NonFiniteLoss = Literal["raise", "warn"]

_NO_STEP = 2**62  # "no non-finite loss seen yet" in the device-side record
_PHASE_SLOTS = 16  # the record packs (step, phase) as step * _PHASE_SLOTS + the phase's index in `_phases`
_LOSS_KINDS = ("finite", "nan", "inf", "-inf")


class NonFiniteLossWatch:
    """The recipe callbacks' watch on the training loss (owned by :class:`NMSparsityCallback`).

    Masks computed from NaN weights are meaningless and a NaN second moment never lets AutoSwitch decide,
    so a recipe run does not continue silently on a NaN loss. Like Lightning, which keeps training on a
    NaN loss unless told otherwise, the default (``on_nonfinite_loss="warn"``) warns once, on rank zero,
    and training goes on with the count logged as ``train/nonfinite_loss_steps``; ``"raise"`` stops the run
    on every rank with a ``FloatingPointError``.

    The loss returned by ``training_step`` (the last micro-batch of every optimizer step that ran; steps
    that fp16's ``GradScaler`` skipped are not counted: the scaler already discards them) is folded by
    :meth:`record` into a device-side record (first bad step and its phase, its value, the count) with no
    host sync. :meth:`check` reads the record on the trainer's logging steps (every
    ``trainer.log_every_n_steps`` optimizer steps, where Lightning syncs for logging anyway) and at the end
    of ``fit``, so the report may come a few steps late, but names the first step, e.g.
    ``non-finite training loss (nan) at optimizer step 37 in phase 'precondition'``. Under DDP the records
    of all ranks are gathered, so every rank raises at the same step. Lightning's
    ``Trainer(detect_anomaly=True)`` finds the operation that produced a NaN;
    ``EarlyStopping(check_finite=True)`` stops on a non-finite *monitored* metric instead.

    Args:
        owner: the name messages start with (the recipe callback's class name).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.reset()

    def reset(self) -> None:
        """Forget everything (at the start of every ``fit``)."""
        self._first: Tensor | None = None  # step * _PHASE_SLOTS + phase index of the first non-finite loss
        self._value: Tensor | None = None  # that loss
        self._count: Tensor | None = None  # optimizer steps with a non-finite loss
        self._phases: list[str] = []  # phase names in the order they were recorded: the same on every rank
        self._seen = False

    @property
    def seen(self) -> bool:
        """Whether a :meth:`check` has found a non-finite loss on any rank."""
        return self._seen

    @property
    def count(self) -> Tensor | None:
        """Optimizer steps with a non-finite loss on this rank (a device scalar), once :attr:`seen`."""
        return self._count if self._seen else None

    @torch.no_grad()
    def record(self, outputs: Any, step: int, phase: str) -> None:
        """Fold the loss of optimizer step ``step``, run in ``phase``, into the record: a few tiny kernels."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        loss = loss.detach().float()
        if loss.numel() != 1:
            loss = loss.sum()  # one non-finite element makes the sum non-finite
        loss = loss.reshape(())
        if self._first is None or self._first.device != loss.device:
            self._first = torch.full((), _NO_STEP, dtype=torch.int64, device=loss.device)
            self._value = torch.zeros((), device=loss.device)
            self._count = torch.zeros((), dtype=torch.int64, device=loss.device)
        assert self._value is not None and self._count is not None
        if phase not in self._phases:
            self._phases.append(phase)
        finite = torch.isfinite(loss)
        code = torch.where(finite, _NO_STEP, step * _PHASE_SLOTS + self._phases.index(phase))
        first = code < self._first
        self._first = torch.minimum(self._first, code)
        self._value = torch.where(first, loss, self._value)
        self._count += finite.logical_not()

    def check(self, trainer: pl.Trainer, step: int, on_nonfinite_loss: NonFiniteLoss) -> None:
        """Read the record (one sync; one small all_gather under DDP) and raise or warn.

        Collective: every rank must call it at the same optimizer steps (``step``: the current one).

        Raises:
            FloatingPointError: a rank recorded a non-finite loss and ``on_nonfinite_loss="raise"``.
        """
        if self._seen and on_nonfinite_loss == "warn":
            return  # warned once; every rank knows (the record was gathered), so every rank skips
        device = trainer.strategy.root_device
        if self._first is None or self._value is None or self._count is None:
            record = torch.tensor([_NO_STEP, 0, 0], dtype=torch.int64, device=device)
        else:
            value = self._value
            kind = torch.where(value.isnan(), 1, torch.where(value > 0, 2, 3))
            kind = torch.where(self._count > 0, kind, 0)
            record = torch.stack([self._first, self._count, kind]).to(device)
        rows = (trainer.strategy.all_gather(record) if trainer.world_size > 1 else record[None]).tolist()
        bad = [(rank, row) for rank, row in enumerate(rows) if row[1] > 0]
        if not bad:
            return
        self._seen = True
        code, _, kind = min(row for _, row in bad)
        bad_step, phase = divmod(code, _PHASE_SLOTS)
        phase_name = self._phases[phase] if phase < len(self._phases) else str(phase)
        where = f" on rank {', '.join(str(rank) for rank, _ in bad)}" if trainer.world_size > 1 else ""
        count = max(row[1] for _, row in bad)
        message = (
            f"{self.owner}: non-finite training loss ({_LOSS_KINDS[kind]}) at optimizer step {bad_step} in "
            f"phase {phase_name!r}{where}; {count} optimizer step(s) up to step {step} had a non-finite "
            "loss. Usual causes: a learning rate too high, exploding gradients (set `trainer.gradient_clip_val`), "
            "fp16 overflow (try `trainer.precision: bf16-mixed`), bad input data; `trainer.detect_anomaly: true` "
            "finds the operation that produced it."
        )
        if on_nonfinite_loss == "raise":
            raise FloatingPointError(message + " Set `on_nonfinite_loss: warn` in the recipe callback's init_args "
                                               "to keep training anyway.")
        rank_zero_warn(message + " Training continues (`on_nonfinite_loss='warn'`); the count is logged as "
                                 "`train/nonfinite_loss_steps`.")
