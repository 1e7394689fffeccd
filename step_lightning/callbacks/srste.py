"""SR-STE: learn N:M masks from step 0 with the sparse-refined straight-through estimator."""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

from step_lightning.callbacks.base import NMSparsityCallback, NonFiniteLoss


class SRSTECallback(NMSparsityCallback):
    """SR-STE (Zhou et al., ICLR 2021) with any optimizer.

    From the first optimizer step on, every forward/backward pass uses ``w * mask(w)`` where the mask
    keeps the ``n`` largest ``|w|`` of every ``m`` along the reduction axis and is recomputed from the
    dense weights every ``mask_update_interval`` steps; the gradient reaches the dense weights straight
    through, plus the sparse-refined term ``decay * (1 - mask) * w`` that pulls pruned weights to zero.
    Validation, test, predict and :meth:`masked_state_dict` use the N:M model.

    Args:
        n: weights kept in every group of ``m`` (N of "N:M").
        m: group size along the reduction axis.
        decay: ``lambda_w`` of the SR-STE term (reference 2e-4); ``0`` gives plain STE.
        include: regexes on parameter names; when given, exactly the matching weights are masked.
        exclude: regexes on parameter names that are never masked.
        mask_update_interval: optimizer steps between mask updates (reference: 1).
        per_layer_log_interval: per-layer logging on every this many trainer logging steps (0: off).
        on_nonfinite_loss: ``"warn"`` (default) or ``"raise"`` on a NaN/inf training loss; the message names
            the optimizer step and the phase.

    Raises:
        ValueError: invalid ``n``/``m``/``decay``, or (at setup) no maskable weight.

    Example::

        trainer:
          callbacks:
            - class_path: step_lightning.SRSTECallback
              init_args: {n: 2, m: 4, decay: 2.0e-4}
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        decay: float = 2e-4,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        mask_update_interval: int = 1,
        per_layer_log_interval: int = 10,
        on_nonfinite_loss: NonFiniteLoss = "warn",
    ) -> None:
        super().__init__(n, m, include, exclude, mask_update_interval, per_layer_log_interval, on_nonfinite_loss)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(f"`decay` (SR-STE lambda_w) must be a number >= 0, got {decay!r}; 0 means plain STE.")
        self.decay = float(decay)

    @property
    @override
    def masks_active(self) -> bool:
        return True

    @property
    @override
    def sr_ste_decay(self) -> float:
        return self.decay
