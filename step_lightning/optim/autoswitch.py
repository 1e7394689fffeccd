"""AutoSwitch: decide when Adam's second moment has settled (STEP, Lu et al., ICML 2023, arXiv 2302.01172)."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from step_lightning.checks import NonNegativeInt, PositiveFloat, PositiveInt, UnitIntervalOpenRight, check_arguments

Statistic = Literal["layer_rise", "log_drift", "reference", "relative"]
STATISTICS: tuple[str, ...] = get_args(Statistic)
#: The entry of :attr:`StepAdamW.second_moment_stats <step_lightning.StepAdamW.second_moment_stats>` that each
#: statistic samples once per step.
SAMPLE_KEYS: dict[str, str] = {"layer_rise": "log_v_hat_layers", "log_drift": "log_v_hat", "reference": "abs_dv",
                               "relative": "rel_dv"}
#: The statistics whose window value comes from the levels s_(t-window) .. s_t, not from a window mean.
DRIFT_STATISTICS = ("layer_rise", "log_drift")


class AutoSwitch:
    """The sliding-window test that ends STEP's precondition phase.

    Call :meth:`observe` once per (real, not skipped) optimizer step with that step's sample of the
    statistic (``StepAdamW.second_moment_stats[SAMPLE_KEYS[statistic]]``). The samples go into a
    device-side ring buffer, so observing never synchronises with the host; the test itself runs every
    ``check_every`` steps and then switches when

    * the window value (:meth:`window_mean`) is below ``threshold`` and the step count ``t > t_min``, or
    * ``t > t_max``, unconditionally (without it a run whose statistic never falls below the
      threshold would stay dense forever).

    The statistics, and what their window value is:

    * ``"layer_rise"`` (the default of :class:`~step_lightning.STEPCallback`): the sample is a vector,
      per watched weight ``l`` its level ``s_t^l = mean log v_hat_t`` (the log of the geometric mean of Adam's
      bias-corrected second moment over that weight's elements). The window value is the largest rise
      ``s_j^l - s_i^l``, ``i <= j``, of any weight within ``s_(t-window) .. s_t``, in log units (0.5 is
      a ``v_hat`` 65 % higher); before the window is full, the rise so far extrapolated to one window
      (``x window / steps``). Why a rise, and why per weight: after the freeze a weight's step is
      ``m / sqrt(v*)``; where ``v_hat`` would have kept *rising* the frozen steps come out too large (on a
      small BERT trained from scratch ``v_hat`` of the attention projections rose by e^13 after step 100,
      and every switch before the rise ended left the model at chance: studies/RESULTS.md), where it keeps
      *falling* (gradients shrinking while the model fits its data, the common case late in a run) they come
      out smaller, like a decaying learning rate. A two-sided test never passes on such a steady fall (one
      log unit per 1,000 steps on MNIST); one global mean lets weights that move in opposite directions
      cancel. Scaling the loss by ``c`` shifts every level by ``2 log c``, so the switch step does not
      depend on the gradients' scale (where Adam's ``eps`` is negligible against ``sqrt(v_hat)``).
    * ``"log_drift"`` (the previous default): the sample is ``s_t = mean log v_hat_t``, the log of the
      geometric mean of Adam's bias-corrected second moment over all watched elements. The window value is
      the spread ``max - min`` of ``s_(t-window) .. s_t``: the largest drift of the typical ``v_hat``
      between two steps of the last window, in log units (0.1 is about 10 %); before the window is full,
      the spread so far extrapolated to one window (``x window / steps``). The spread, unlike the
      end-to-end drift ``|s_t - s_(t-window)|``, is not fooled by a ``v_hat`` that rose and fell back
      within the window. Scaling the loss by ``c`` shifts every ``s_t`` by ``2 log c``, so the spread, and the
      switch step, do not depend on the gradients' scale; and ``v_hat`` is bias-corrected, so the spread does
      not merely count the steps the moving average needs to fill. It falls when the gradients' magnitudes
      stop changing (for gradients that keep shrinking, ``v_hat`` follows them and the spread stays up).
      Measured thresholds: studies/AUTOSWITCH.md.
    * ``"reference"`` (the paper's test): the sample is ``mean |v_t - v_(t-1)|``, the window value the
      window mean, against Adam's ``eps`` (1e-8). That statistic scales with the squared gradients; at
      real model scales it is about 1e-9 to 1e-12 from the first steps, so in practice this test
      switches at ``t_min`` (or at ``t_max`` if ``t_min`` is later).
    * ``"relative"``: the sample is ``sum |v_t - v_(t-1)| / sum v_t`` of the raw, bias-uncorrected ``v``,
      the window value the window mean. It is scale-free, but while the moving average fills
      (``t << 1 / (1 - beta2)``) it is about ``1 / t`` for steady gradients, so its threshold mostly
      picks a step count (about ``1 / threshold``); once the gradients vanish it settles near
      ``1 - beta2``.

    A window holding NaN/inf has a NaN/inf value and never passes the threshold test; such checks are
    counted in :attr:`num_nonfinite` so callers can report them. Every check also appends
    ``(step, window value)`` to :attr:`history` (from the first check on, ``t_min`` or not), the curve
    to plot against the threshold.

    Raises:
        ValueError: an argument out of its range (all of them named at once); at
            :meth:`load_state_dict`, a state saved for another statistic.

    Args:
        threshold: the switch threshold on the window value: e.g. 0.5 for ``"layer_rise"``, 0.2 for
            ``"log_drift"`` (a 20 % drift of
            the geometric-mean ``v_hat`` over one window), Adam's ``eps`` (1e-8) for ``"reference"``, a
            ratio such as 5e-3 for ``"relative"``.
        window: the window, in steps; ``None`` means ``1 / (1 - beta2)`` (1000 for 0.999).
        t_min: never switch on the statistic at or before this step; ``None`` means ``window`` (the
            window must be full before its value is trusted).
        t_max: switch unconditionally once ``t > t_max``. Required (keyword-only): a STEP run always ends its dense
            phase (:class:`~step_lightning.STEPCallback` defaults it to a fraction of the run).
        statistic: which statistic the caller feeds (see above). Recorded here so that the threshold and
            the statistic travel together in checkpoints.
        beta2: Adam's ``beta2``; only used to default ``window``.
        check_every: run the test every this many steps (each test reads one scalar from the device).

    Example::

        switch = AutoSwitch(threshold=0.2, t_max=5000, statistic="log_drift")
        for step in ...:
            optimizer.step()
            if switch.observe(optimizer.second_moment_stats[SAMPLE_KEYS[switch.statistic]]):
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

    @property
    def _size(self) -> int:
        # The drift statistics keep the levels s_(t-window) .. s_t: window + 1 samples.
        return self.window + 1 if self.statistic in DRIFT_STATISTICS else self.window

    def _ring(self, like: Tensor) -> Tensor:
        if self._buffer is None:  # one row per step; "layer_rise" samples one level per watched tensor
            self._buffer = torch.zeros((self._size, *like.shape), dtype=torch.float32, device=like.device)
        elif self._buffer.shape[1:] != like.shape:
            raise ValueError(f"AutoSwitch.observe: got a sample of shape {tuple(like.shape)} after samples of shape "
                             f"{tuple(self._buffer.shape[1:])}: the watched weights changed during the run.")
        elif self._buffer.device != like.device:
            self._buffer = self._buffer.to(like.device)
        return self._buffer

    def window_mean(self) -> Tensor | None:
        """The window value the test compares with the threshold (a device tensor), or ``None`` before it
        exists: the mean of the samples in the window; for ``"log_drift"`` the spread ``max - min`` of the
        levels ``s_(t-window) .. s_t``, for ``"layer_rise"`` the largest rise of a weight's level among them
        (both need two levels)."""
        if self._buffer is None or self.t == 0:
            return None
        if self.statistic not in DRIFT_STATISTICS:
            return self._buffer[: min(self.t, self.window)].mean()
        filled = min(self.t, self._size)
        if filled < 2:
            return None
        if self.statistic == "log_drift":  # the spread of the ring's filled slots (in any order)
            levels = self._buffer[:filled]
            return (levels.amax() - levels.amin()) * (self.window / (filled - 1))
        # layer_rise: the levels in time order (oldest first), per watched tensor its largest rise s_j - s_i, i <= j
        order = torch.arange(self.t - filled, self.t, device=self._buffer.device) % self._size
        levels = self._buffer[order]
        rise = (levels - torch.cummin(levels, dim=0).values).amax()
        return rise * (self.window / (filled - 1))

    def observe(self, value: Tensor | float) -> bool:
        """Record the statistic of step ``t + 1``; return ``True`` exactly at the step that switches."""
        if self.switched:
            return False
        value = torch.as_tensor(value)
        buf = self._ring(value)
        buf[self.t % self._size] = value.detach().to(torch.float32)
        self.t += 1
        if self.t > self.t_max:
            self._switch("t_max")
            return True
        if self.t % self.check_every != 0:
            return False
        value = self.window_mean()
        if value is None:
            return False
        mean = float(value)  # the one host sync per check
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
        if state["statistic"] != self.statistic:
            # The window holds samples of the saved statistic: testing them against another one's threshold
            # would switch on meaningless numbers.
            raise ValueError(
                f"AutoSwitch: the checkpoint's AutoSwitch watched the {state['statistic']!r} statistic, this run is "
                f"configured with {self.statistic!r}. Resume with --recipe.init_args.autoswitch_statistic "
                f"{state['statistic']} (or start a new run to change the statistic)."
            )
        for key in ("threshold", "window", "t_min", "t_max", "statistic", "check_every", "t", "switch_step",
                    "switched_by", "num_nonfinite", "last_window_mean"):
            setattr(self, key, state[key])
        self.history = [tuple(x) for x in state.get("history", [])]  # type: ignore[misc]
        buffer = state["buffer"]
        if buffer is not None and self._buffer is not None:
            buffer = buffer.to(self._buffer.device)
        self._buffer = buffer
