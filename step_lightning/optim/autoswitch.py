"""AutoSwitch: decide when Adam's second moment has settled (STEP, Lu et al., ICML 2023, arXiv 2302.01172)."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from step_lightning.checks import NonNegativeInt, PositiveFloat, PositiveInt, UnitIntervalOpenRight, check_arguments

Statistic = Literal["reference", "relative"]
STATISTICS: tuple[str, ...] = get_args(Statistic)


class AutoSwitch:
    """The sliding-window test that ends STEP's precondition phase.

    Call :meth:`observe` once per (real, not skipped) optimizer step with that step's statistic. The
    samples go into a device-side ring buffer of the last ``window`` values, so observing never
    synchronises with the host; the test itself runs every ``check_every`` steps and then switches
    when

    * the mean over the window is below ``threshold`` and the step count ``t > t_min``, or
    * ``t > t_max``, unconditionally (without it a run whose statistic never falls below the
      threshold would stay dense forever).

    A window holding NaN/inf has a NaN/inf mean and never passes the threshold test; such checks are
    counted in :attr:`num_nonfinite` so callers can report them. Every check also appends
    ``(step, window mean)`` to :attr:`history` (from the first check on, ``t_min`` or not), the curve
    to plot against the threshold.

    Raises:
        ValueError: an argument out of its range (all of them named at once).

    Args:
        threshold: the switch threshold on the window mean. Reference: Adam's ``eps`` (1e-8) for the
            ``"reference"`` statistic. The statistic scales with the gradients (loss scaling, width), so
            for ``"relative"`` pick a threshold on ``mean|dv| / mean(v)`` instead (e.g. 1e-3).
        window: number of samples averaged; ``None`` means ``1 / (1 - beta2)`` (1000 for 0.999).
        t_min: never switch on the statistic at or before this step; ``None`` means ``window`` (the
            window must be full before its mean is trusted).
        t_max: switch unconditionally once ``t > t_max``. Required (keyword-only): a STEP run always ends its dense
            phase (:class:`~step_lightning.STEPCallback` defaults it to a fraction of the run).
        statistic: which statistic the caller feeds: ``"reference"`` (``mean |v_t - v_{t-1}|``) or
            ``"relative"`` (the same divided by ``mean v_t``, scale-free). Recorded here so that the
            threshold and the statistic travel together in checkpoints.
        beta2: Adam's ``beta2``; only used to default ``window``.
        check_every: run the test every this many steps (each test reads one scalar from the device).

    Example::

        switch = AutoSwitch(threshold=1e-8, t_max=5000)
        for step in ...:
            optimizer.step()
            if switch.observe(optimizer.second_moment_stats["abs_dv"]):
                optimizer.freeze_second_moment(masked_params)
    """

    def __init__(
        self,
        threshold: PositiveFloat = 1e-8,
        window: PositiveInt | None = None,
        t_min: NonNegativeInt | None = None,
        *,
        t_max: PositiveInt,
        statistic: Statistic = "reference",
        beta2: UnitIntervalOpenRight = 0.999,
        check_every: PositiveInt = 1,
    ) -> None:
        check_arguments(AutoSwitch, locals())
        self.threshold = float(threshold)
        # Plain numbers: they go into `state_dict`, and a `weights_only` checkpoint load rejects the parser's types.
        self.window: int = max(1, round(1.0 / (1.0 - beta2))) if window is None else int(window)
        self.t_min: int = self.window if t_min is None else int(t_min)
        self.t_max: int = int(t_max)
        self.statistic = statistic
        self.check_every = int(check_every)
        self.t = 0
        self.switch_step: int | None = None
        self.switched_by: Literal["threshold", "t_max", "rank0"] | None = None
        self.num_nonfinite = 0
        self.last_window_mean: float | None = None
        self.history: list[tuple[int, float]] = []  # (step, window mean) at every check
        self._buffer: Tensor | None = None

    @property
    def switched(self) -> bool:
        return self.switch_step is not None

    def _ring(self, like: Tensor) -> Tensor:
        if self._buffer is None:
            self._buffer = torch.zeros(self.window, dtype=torch.float32, device=like.device)
        elif self._buffer.device != like.device:
            self._buffer = self._buffer.to(like.device)
        return self._buffer

    def window_mean(self) -> Tensor | None:
        """Mean of the samples in the window (a device tensor), or ``None`` before the first sample."""
        if self._buffer is None or self.t == 0:
            return None
        return self._buffer[: min(self.t, self.window)].mean()

    def observe(self, value: Tensor | float) -> bool:
        """Record the statistic of step ``t + 1``; return ``True`` exactly at the step that switches."""
        if self.switched:
            return False
        value = torch.as_tensor(value)
        buf = self._ring(value)
        buf[self.t % self.window] = value.detach().to(torch.float32)
        self.t += 1
        if self.t > self.t_max:
            self._switch("t_max")
            return True
        if self.t % self.check_every != 0:
            return False
        mean = float(self.window_mean())  # type: ignore[arg-type]  # the one host sync per check
        self.last_window_mean = mean
        self.history.append((self.t, mean))
        if not math.isfinite(mean):
            self.num_nonfinite += 1
            return False
        if self.t > self.t_min and mean < self.threshold:
            self._switch("threshold")
            return True
        return False

    def sync_decision(self, switched: bool) -> None:
        """Adopt a decision taken elsewhere (rank 0 under DDP) for the step just observed."""
        if switched and not self.switched:
            self._switch("rank0")
        elif not switched and self.switch_step == self.t:
            self.switch_step, self.switched_by = None, None

    def _switch(self, why: Literal["threshold", "t_max", "rank0"]) -> None:
        self.switch_step = self.t
        self.switched_by = why

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "window": self.window, "t_min": self.t_min, "t_max": self.t_max,
            "statistic": self.statistic, "check_every": self.check_every, "t": self.t,
            "switch_step": self.switch_step, "switched_by": self.switched_by,
            "num_nonfinite": self.num_nonfinite, "last_window_mean": self.last_window_mean,
            "history": list(self.history),
            "buffer": None if self._buffer is None else self._buffer.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("threshold", "window", "t_min", "t_max", "statistic", "check_every", "t", "switch_step",
                    "switched_by", "num_nonfinite", "last_window_mean"):
            setattr(self, key, state[key])
        self.history = [tuple(x) for x in state.get("history", [])]  # type: ignore[misc]
        buffer = state["buffer"]
        if buffer is not None and self._buffer is not None:
            buffer = buffer.to(self._buffer.device)
        self._buffer = buffer
