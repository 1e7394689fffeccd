"""STEP: a dense precondition phase, then N:M mask learning with a frozen second moment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from step_lightning.callbacks.arguments import target_problems
from step_lightning.callbacks.base import NMSparsityCallback, NonFiniteLoss
from step_lightning.checks import (
    IntAtLeast2,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_arguments,
)
from step_lightning.optim import SAMPLE_KEYS, AutoSwitch, Statistic, StepAdamW, WarmupDecayLR

Phase = Literal["precondition", "mask_learning"]


def warmup_end(trainer: pl.Trainer, total_steps: int | float) -> int:
    """The optimizer step at which the run's learning-rate warm-up ends: the longest warm-up of the
    :class:`~step_lightning.optim.WarmupDecayLR` schedulers that step every optimizer step; 0 without one."""
    total = int(total_steps) if math.isfinite(total_steps) and total_steps > 0 else None
    ends = [config.scheduler.warmup_steps(total) for config in trainer.lr_scheduler_configs
            if isinstance(config.scheduler, WarmupDecayLR) and config.interval == "step"
            and (config.scheduler.warmup >= 1 or total is not None)]
    return max(ends, default=0)


class STEPCallback(NMSparsityCallback):
    """STEP (Lu et al., ICML 2023): learn N:M masks from scratch with Adam, preconditioned.

    What happens, and when (``t`` counts optimizer steps that really ran):

    1. **Precondition** (``phase == "precondition"``, ``sparsity/phase`` = 0): plain dense AdamW through
       :class:`~step_lightning.StepAdamW`. With ``switch="auto"`` the optimizer measures after each step
       the level of Adam's bias-corrected second moment ``v_hat`` of each weight that will be masked (the mean
       of its ``log v_hat``), and :class:`~step_lightning.AutoSwitch` watches how much any of them rose within
       the window (the default ``"layer_rise"``; the other statistics below). Validation
       evaluates the N:M model with magnitude masks of the dense weights (what a one-shot prune would
       deploy), so ``val/...`` always measures an N:M model.
    2. **The switch** at step ``T0`` (``switch_step``): when the window value falls below
       ``autoswitch_threshold`` after ``autoswitch_t_min`` steps (checked every ``autoswitch_check_every``
       steps; by default: once no masked weight's ``v_hat`` rose by more than 65 % within the window), or
       unconditionally after
       ``autoswitch_t_max`` steps; or at the fixed step ``switch`` (an int, or a float fraction of the
       run). The second moment of every masked weight is frozen (:meth:`StepAdamW.freeze_second_moment`).
    3. **Mask learning** (``phase == "mask_learning"``, ``sparsity/phase`` = 1), from step ``T0 + 1``:
       forward/backward use ``w * mask(w)`` (``n`` largest ``|w|`` of every ``m`` along the reduction
       axis, recomputed from the dense weights every ``mask_update_interval`` steps), the gradient
       reaches the dense weights straight through, and the frozen ``v`` preconditions the update.
       Weights that are never masked keep training with plain AdamW. Validation, test, predict and
       :meth:`masked_state_dict` use the N:M model.

    The reference STEP code uses plain STE in phase 2 (``sr_ste_decay=0``, the default); set
    ``sr_ste_decay=2e-4`` for "SR-STE + precondition". The frozen denominator is the reference
    ``sqrt(v*) + eps ** 0.75`` of the raw ``v*`` unless the optimizer has ``frozen_bias_correction=True``. The
    raw ``v*`` is ``1 - beta2 ** T0`` times ``v_hat``: for a switch inside Adam's memory (``T0`` below about
    ``1 / (1 - beta2)``) the mask-learning steps come out ``1 / sqrt(1 - beta2 ** T0)`` times Adam's, and the
    callback warns at the switch (the shipped configs of short runs set ``frozen_bias_correction: true``).

    Args:
        n: weights kept in every group of ``m`` (N of "N:M").
        m: group size along the reduction axis.
        switch: ``"auto"`` (AutoSwitch), an int optimizer step ``>= 1``, or a float in (0, 1): that
            fraction of the run's optimizer steps (``trainer.estimated_stepping_batches``).
        include: regexes on parameter names; when given, exactly the matching weights are masked.
        exclude: regexes on parameter names that are never masked.
        sr_ste_decay: ``lambda_w`` of the SR-STE term in phase 2 (0: plain STE, the reference).
        autoswitch_threshold: switch when the statistic's window value is below this. Default 0.5 for
            ``"layer_rise"`` (no masked weight's geometric-mean ``v_hat`` rose by more than 65 % within the window;
            chosen on the study's dense runs: studies/RESULTS.md); 0.25 for ``"log_drift"``; the reference
            Adam's eps (1e-8) for ``"reference"``; e.g. 5e-3 for ``"relative"``.
        autoswitch_statistic: ``"layer_rise"`` (default: the largest rise within the window of any masked
            weight's log geometric-mean bias-corrected ``v_hat``; a falling ``v_hat`` does not hold the switch
            back, since frozen it only makes the steps smaller; its switch step does not depend on the loss
            scale), ``"log_drift"`` (the two-sided spread of one global geometric mean), ``"reference"`` (the
            paper's window mean of mean ``|v_t - v_{t-1}|``; in practice below 1e-8 from the first steps, so it
            switches at ``autoswitch_t_min``) or ``"relative"`` (mean ``|dv|`` / mean ``v`` of the raw ``v``,
            about ``1 / t`` while the average fills: its threshold mostly picks a step count). See
            :class:`~step_lightning.AutoSwitch`. The global ones are logged, and each weight's level as
            ``sparsity/layers/<name>/log_v_hat``.
        autoswitch_window: samples in the sliding window; ``None`` means Adam's memory ``1 / (1 - beta2)``
            (1000 for beta2 = 0.999), cut to a quarter of ``autoswitch_t_max`` where that is shorter, so that
            the test can act in runs shorter than a few memories (the window must be full before ``t_min``).
        autoswitch_t_min: no switch on the statistic before this step: an int, a float fraction of
            the run, or ``None``: the later of the window length and the end of the learning-rate
            warm-up of a :class:`~step_lightning.optim.WarmupDecayLR` stepping every optimizer step (Adam's
            second moment is not settled while the learning rate still ramps up).
        autoswitch_t_max: switch unconditionally after this step: an int, or a float fraction of the run
            (default 0.5: the second half of the run always learns masks).
        autoswitch_check_every: evaluate the test every this many steps. Each test reads one scalar from
            the device (a sync), so the default 10 keeps the hot path free of per-step syncs; the switch
            then lands on a multiple of 10 (the reference tests every step: 1).
        mask_update_interval: optimizer steps between mask updates in phase 2 (reference: 1).
        per_layer_log_interval: per-layer logging on every this many trainer logging steps (0: off).
        on_nonfinite_loss: ``"warn"`` (default) or ``"raise"`` on a NaN/inf training loss; the message names
            the first such optimizer step and its phase (see :class:`NMSparsityCallback`).

    Under DDP every rank learns its masks locally; the AutoSwitch decision is taken on rank 0 and
    broadcast, and at the switch and at the end of ``fit`` one ``all_gather`` checks that all ranks agree
    on the switch step, the step count and every mask (a ``RuntimeError`` says which ranks differ).

    Raises:
        ValueError: invalid arguments (at construction), no maskable weight, or an optimizer that is
            not :class:`~step_lightning.StepAdamW` (at the start of ``fit``).
        FloatingPointError: a non-finite training loss with ``on_nonfinite_loss="raise"``.
        RuntimeError: DDP ranks that disagree on the switch step, the step count or the masks.

    Example::

        optimizer:
          class_path: step_lightning.StepAdamW
          init_args: {lr: 1.0e-3, weight_decay: 0.0}
        trainer:
          callbacks:
            - class_path: step_lightning.STEPCallback
              init_args: {n: 2, m: 4, switch: auto, autoswitch_t_max: 0.5}
    """

    def __init__(
        self,
        n: PositiveInt = 2,
        m: IntAtLeast2 = 4,
        switch: Literal["auto"] | PositiveInt | OpenUnitInterval = "auto",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        sr_ste_decay: NonNegativeFloat = 0.0,
        autoswitch_threshold: PositiveFloat = 0.5,
        autoswitch_statistic: Statistic = "layer_rise",
        autoswitch_window: PositiveInt | None = None,
        autoswitch_t_min: NonNegativeInt | OpenUnitInterval | None = None,
        autoswitch_t_max: PositiveInt | OpenUnitInterval = 0.5,
        autoswitch_check_every: PositiveInt = 10,
        mask_update_interval: PositiveInt = 1,
        per_layer_log_interval: NonNegativeInt = 10,
        on_nonfinite_loss: NonFiniteLoss = "warn",
    ) -> None:
        check_arguments(STEPCallback, locals(), extra=target_problems(n, m, include, exclude))
        super().__init__(n, m, include, exclude, mask_update_interval, per_layer_log_interval, on_nonfinite_loss)
        self.switch = switch
        self.sr_ste_decay = float(sr_ste_decay)
        self.autoswitch_threshold = autoswitch_threshold
        self.autoswitch_statistic = autoswitch_statistic
        self.autoswitch_window = autoswitch_window
        self.autoswitch_t_min = autoswitch_t_min
        self.autoswitch_t_max = autoswitch_t_max
        self.autoswitch_check_every = autoswitch_check_every

        self._phase: Phase = "precondition"
        self._switch_step: int | None = None
        self._fixed_switch: int | None = None
        self.autoswitch: AutoSwitch | None = None
        self._optimizer: StepAdamW | None = None
        self._restored_autoswitch: dict[str, Any] | None = None
        self._gradients_checked = False

    # ----------------------------------------------------------------------------------------------
    @property
    @override
    def phase(self) -> Phase:
        """``"precondition"`` (dense AdamW) until the switch, then ``"mask_learning"``."""
        return self._phase

    @property
    def switch_step(self) -> int | None:
        """The optimizer step ``T0`` after which the second moment was frozen; ``None`` before the switch."""
        return self._switch_step

    @property
    @override
    def masks_active(self) -> bool:
        return self._phase == "mask_learning"

    # ----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        owners = [opt for opt in trainer.optimizers
                  if any(id(p) == id(t.param) for g in opt.param_groups for p in g["params"] for t in self.targets)]
        if len(owners) != 1 or not isinstance(owners[0], StepAdamW):
            got = [type(opt).__name__ for opt in owners] or [type(opt).__name__ for opt in trainer.optimizers]
            raise ValueError(
                f"STEPCallback needs the masked weights to be optimized by one step_lightning.StepAdamW "
                f"(it freezes Adam's second moment at the switch), got {got}. In YAML: "
                "`optimizer: {class_path: step_lightning.StepAdamW, init_args: {lr: ...}}`; in code, return "
                "StepAdamW(...) from configure_optimizers. For other optimizers use SRSTECallback."
            )
        self._optimizer = owners[0]
        self._gradients_checked = False

    @override
    def _prepare_run(self, trainer: pl.Trainer) -> None:
        assert self._optimizer is not None
        total = trainer.estimated_stepping_batches
        if self.switch != "auto":
            self._fixed_switch = self.run_steps.resolve("switch", self.switch, total)  # type: ignore[arg-type]
            if self._phase == "precondition" and self._fixed_switch >= total:
                rank_zero_warn(f"STEPCallback: `switch`={self.switch} is at or after the run's last optimizer step "
                               f"({total}): this run stays dense and never learns N:M masks.")
        elif self.autoswitch is None:
            beta2 = self._optimizer.param_groups[0]["betas"][1]
            t_max = self.run_steps.resolve("autoswitch_t_max", self.autoswitch_t_max, total)
            t_min = None if self.autoswitch_t_min is None else self.run_steps.resolve("autoswitch_t_min",
                                                                                  self.autoswitch_t_min, total)
            window = self.autoswitch_window
            if window is None:  # Adam's memory, but at most a quarter of the precondition budget
                window = max(1, min(round(1.0 / (1.0 - beta2)), t_max // 4))
            self.autoswitch = AutoSwitch(self.autoswitch_threshold, window, t_min, t_max=t_max,
                                         statistic=self.autoswitch_statistic, beta2=beta2,
                                         check_every=self.autoswitch_check_every)
            if self.autoswitch_t_min is None:
                self.autoswitch.t_min = max(self.autoswitch.t_min, warmup_end(trainer, total))
            if self._restored_autoswitch is not None:
                self.autoswitch.load_state_dict(self._restored_autoswitch)
                self._restored_autoswitch = None
            if t_max >= total and self._phase == "precondition":
                rank_zero_warn(f"STEPCallback: `autoswitch_t_max`={self.autoswitch_t_max} is at or after the run's "
                               f"last optimizer step ({total}): unless AutoSwitch's threshold is met, this run stays "
                               "dense and never learns N:M masks.")
            if self.autoswitch.t_min >= t_max:
                rank_zero_warn(f"STEPCallback: autoswitch_t_min ({self.autoswitch.t_min}) >= autoswitch_t_max "
                               f"({t_max}): AutoSwitch will switch at step {t_max + 1} whatever the statistic.")
            rank_zero_info(
                f"STEPCallback: AutoSwitch on {self.autoswitch_statistic!r} statistic, threshold "
                f"{self.autoswitch.threshold:g}, window {self.autoswitch.window}, t_min {self.autoswitch.t_min}; "
                f"switches at the latest after step {t_max} of {total}."
            )
        if self._phase == "precondition":
            watched = [t.param for t in self.targets] if self.switch == "auto" else []
            self._optimizer.watch(watched)
        if self._phase == "mask_learning":
            # Resumed after the switch: the optimizer state restored the frozen second moment.
            self._check_frozen()

    def _check_frozen(self) -> None:
        assert self._optimizer is not None
        unfrozen = [t.name for t in self.targets if not self._optimizer.is_frozen(t.param)]
        if unfrozen:
            raise ValueError(f"STEPCallback is in phase 'mask_learning' but the optimizer state has no frozen second "
                             f"moment for {unfrozen}: the checkpoint's optimizer state does not match its callback "
                             "state.")

    def _check_gradients(self) -> None:
        # After the first optimizer step of a fit: a masked weight that got no gradient has no second moment,
        # which the switch would only find (and fail on) hours later.
        assert self._optimizer is not None
        self._gradients_checked = True
        missing = [t.name for t in self.targets if "exp_avg_sq" not in self._optimizer.state.get(t.param, {})]
        if missing:
            raise ValueError(
                f"STEPCallback: these masked weights got no gradient in optimizer step {self._opt_steps} (phase "
                f"'precondition'): {missing}. STEP freezes the Adam second moment of every masked weight at the "
                "switch, and a weight without a gradient has none (nor can it learn a mask). List them in `exclude` "
                "(`--recipe.exclude`), or make them take part in the loss."
            )

    @override
    def _after_optimizer_step(self, trainer: pl.Trainer) -> None:
        if self._phase != "precondition":
            return
        assert self._optimizer is not None
        if not self._gradients_checked:
            self._check_gradients()
        if self.autoswitch is not None:
            stats = self._optimizer.second_moment_stats
            if stats is None:
                return
            nonfinite = self.autoswitch.num_nonfinite
            decide = self.autoswitch.observe(stats[SAMPLE_KEYS[self.autoswitch.statistic]])
            if self.autoswitch.num_nonfinite > nonfinite:
                rank_zero_warn(f"STEPCallback: the AutoSwitch window holds NaN/inf at optimizer step "
                               f"{self.autoswitch.t} (phase 'precondition'); it cannot switch on the statistic until "
                               "the window is finite again. Check the loss and the gradients.")
            # Decide on rank 0 and broadcast, so every rank switches at the same step by construction.
            # Every rank reaches this at the same steps (check steps, and the t_max step).
            if self.autoswitch.t % self.autoswitch.check_every == 0 or decide:
                decide = trainer.strategy.broadcast(decide, src=0)
                self.autoswitch.sync_decision(decide)
            if decide:
                if self.autoswitch.switched_by == "t_max":
                    rank_zero_warn(
                        f"STEPCallback: AutoSwitch reached autoswitch_t_max={self.autoswitch.t_max} without the "
                        f"{self.autoswitch_statistic} statistic falling below {self.autoswitch.threshold:g} (last "
                        f"checked window value: {self.autoswitch.last_window_mean}); switching now. Consider "
                        "another `autoswitch_threshold` or `autoswitch_statistic` (see sparsity/autoswitch_*)."
                    )
                self._do_switch(trainer)
        elif self._fixed_switch is not None and self._opt_steps >= self._fixed_switch:
            self._do_switch(trainer)

    def _do_switch(self, trainer: pl.Trainer) -> None:
        assert self._optimizer is not None
        # A non-finite loss is the usual cause of a non-finite second moment, which the freeze refuses: report
        # the loss first (raise, or warn once), with its step and phase. Every rank switches at this step.
        self.loss_watch.check(trainer, self._opt_steps, self.on_nonfinite_loss)
        self._optimizer.freeze_second_moment([t.param for t in self.targets], names=[t.name for t in self.targets])
        self._optimizer.watch([])
        self._phase = "mask_learning"
        self._switch_step = self._opt_steps
        self._warn_early_raw_freeze()
        rank_zero_info(f"STEPCallback: switched to mask learning after optimizer step {self._switch_step}; "
                       f"{len(self.targets)} weights now {self.n}:{self.m} with a frozen second moment.")

    def _warn_early_raw_freeze(self) -> None:
        """The reference frozen denominator is ``sqrt(v*)`` of the raw ``v``, which is ``1 - beta2 ** T0`` times
        ``v_hat``: for a switch well inside Adam's memory the frozen steps come out several times Adam's."""
        assert self._optimizer is not None and self._switch_step is not None
        targets = {id(t.param) for t in self.targets}
        groups = [g for g in self._optimizer.param_groups
                  if not g["frozen_bias_correction"] and any(id(p) in targets for p in g["params"])]
        if not groups:
            return
        beta2 = max(g["betas"][1] for g in groups)
        share = 1.0 - beta2 ** self._switch_step
        factor = share ** -0.5
        if factor > 1.25:
            rank_zero_warn(
                f"STEPCallback: the second moment was frozen after step {self._switch_step} with the reference "
                f"denominator sqrt(v*) + eps2 of the raw v, which is 1 - beta2^T0 = {share:.3f} times Adam's "
                f"bias-corrected v_hat there: the mask-learning steps come out about {factor:.1f}x Adam's. On a "
                "small GPT-2 switching at step 120 that made STEP end at perplexity 252 instead of 148 "
                "(studies/RESULTS.md). For a switch this early use --model.init_args.optimizer.init_args."
                "frozen_bias_correction true (the reference and the bias-corrected denominators agree for a switch "
                "after several thousand steps)."
            )

    @override
    def _recipe_metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.autoswitch is not None:
            metrics["sparsity/autoswitch_threshold"] = self.autoswitch.threshold
            stats = self._optimizer.second_moment_stats if self._optimizer is not None else None
            if stats is not None:
                sample = stats[SAMPLE_KEYS[self.autoswitch.statistic]]
                if sample.dim() == 0:
                    metrics["sparsity/autoswitch_stat"] = sample
                metrics["sparsity/autoswitch_log_v_hat"] = stats["log_v_hat"]
                # layer_rise's sample: each masked weight's mean log v_hat (watched in `targets` order)
                for target, level in zip(self.targets, stats["log_v_hat_layers"], strict=True):
                    metrics[f"sparsity/layers/{target.name}/log_v_hat"] = level
                metrics["sparsity/autoswitch_abs_dv"] = stats["abs_dv"]
                metrics["sparsity/autoswitch_rel_dv"] = stats["rel_dv"]
            mean = self.autoswitch.window_mean()
            if mean is not None and self._phase == "precondition":
                metrics["sparsity/autoswitch_window_mean"] = mean
            metrics["sparsity/autoswitch_nonfinite_checks"] = float(self.autoswitch.num_nonfinite)
        if self._switch_step is not None:
            metrics["sparsity/switch_step"] = float(self._switch_step)
        return metrics

    @override
    def _rank_agreement_scalars(self) -> dict[str, int | None]:
        return {**super()._rank_agreement_scalars(), "switch step": self._switch_step}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "phase": self._phase,
            "switch_step": self._switch_step,
            "autoswitch": self.autoswitch.state_dict() if self.autoswitch is not None else self._restored_autoswitch,
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._phase = state["phase"]
        self._switch_step = state["switch_step"]
        if state["autoswitch"] is not None:
            if self.autoswitch is not None:
                self.autoswitch.load_state_dict(state["autoswitch"])
            else:
                self._restored_autoswitch = state["autoswitch"]  # applied once the run's length is known

