"""ASP: one-shot magnitude N:M pruning at a chosen step, then a fixed mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from step_lightning.callbacks.arguments import target_problems
from step_lightning.callbacks.base import NMSparsityCallback, NonFiniteLoss
from step_lightning.checks import IntAtLeast2, NonNegativeInt, OpenUnitInterval, PositiveInt, check_arguments


class ASPCallback(NMSparsityCallback):
    """NVIDIA ASP-style pruning: dense until ``prune_at``, then a fixed magnitude N:M mask.

    When ``prune_at`` optimizer steps have run, the mask is computed once from ``|w|`` (the ``n``
    largest of every ``m`` along the reduction axis) and the pruned weights are zeroed. From then on,
    before every optimizer step the gradients of pruned weights are zeroed, and after it the weights
    are re-masked (momentum and weight decay would otherwise move them). The optimizer state is not
    touched, as in the reference. The reference recipe fine-tunes a dense model with the dense run's
    optimizer, schedule and length: load the dense weights into the model and use ``prune_at=0``.

    Args:
        n: weights kept in every group of ``m``.
        m: group size along the reduction axis.
        prune_at: optimizer step at which to prune: an int (``0``: before the first step), or a float
            in (0, 1) for that fraction of the run's optimizer steps.
        include: regexes on parameter names; when given, exactly the matching weights are masked.
        exclude: regexes on parameter names that are never masked.
        per_layer_log_interval: per-layer logging on every this many trainer logging steps (0: off).
        on_nonfinite_loss: ``"warn"`` (default) or ``"raise"`` on a NaN/inf training loss; the message names
            the optimizer step and the phase.

    Example::

        trainer:
          callbacks:
            - class_path: step_lightning.ASPCallback
              init_args: {n: 2, m: 4, prune_at: 0}
    """

    def __init__(
        self,
        n: PositiveInt = 2,
        m: IntAtLeast2 = 4,
        prune_at: NonNegativeInt | OpenUnitInterval = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        per_layer_log_interval: NonNegativeInt = 10,
        on_nonfinite_loss: NonFiniteLoss = "warn",
    ) -> None:
        check_arguments(ASPCallback, locals(), extra=target_problems(n, m, include, exclude))
        super().__init__(n, m, include, exclude, 1, per_layer_log_interval, on_nonfinite_loss)
        self.prune_at = prune_at
        self.prune_step: int | None = None
        self._pruned = False

    @property
    @override
    def masks_active(self) -> bool:
        return self._pruned

    dynamic_masks = False  # the mask is computed once, at pruning

    @override
    def _prepare_run(self, trainer: pl.Trainer) -> None:
        total = trainer.estimated_stepping_batches
        self.prune_step = self.run_steps.resolve("prune_at", self.prune_at, total)
        if not self._pruned and self.prune_step >= total:
            rank_zero_warn(f"ASPCallback: `prune_at`={self.prune_at} is at or after the run's last optimizer step "
                           f"({total}): this run never prunes.")
        self._maybe_prune()

    def _maybe_prune(self) -> None:
        engine = self.masked_weights
        assert engine is not None and self.prune_step is not None
        if self._pruned or self._opt_steps < self.prune_step:
            return
        engine.update_masks()
        engine.mask_weights_()
        self._pruned = True
        rank_zero_info(f"ASPCallback: pruned {len(engine.targets)} weights to {self.n}:{self.m} at optimizer step "
                       f"{self._opt_steps}.")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._pruned:
            assert self.masked_weights is not None
            # Lightning clips gradients right after this hook (Precision._after_closure, every precision
            # plugin), so `gradient_clip_val` measures the masked gradients, as apex's masked step does.
            self.masked_weights.mask_grads_()

    @override
    def _after_optimizer_step(self, trainer: pl.Trainer) -> None:
        if self._pruned:
            assert self.masked_weights is not None
            self.masked_weights.mask_weights_()
        else:
            self._maybe_prune()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prune_step": self.prune_step, "pruned": self._pruned}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prune_step = state["prune_step"]
        self._pruned = state["pruned"]
        if self.prune_step is not None and "resolved_steps" not in state:  # a checkpoint of an earlier version
            self.run_steps.remember("prune_at", self.prune_at, self.prune_step)
