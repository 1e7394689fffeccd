"""SR-STE: learn N:M masks from step 0 with the sparse-refined straight-through estimator."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from step_lightning.callbacks.base import NMSparsityCallback
from step_lightning.checks import IntAtLeast2, NonNegativeFloat, PositiveInt, check_arguments


class SRSTECallback(NMSparsityCallback):
    """SR-STE (Zhou et al., ICLR 2021) with any optimizer.

    From the first optimizer step on, every forward/backward pass uses ``w * mask(w)`` where the mask
    keeps the ``n`` largest ``|w|`` of every ``m`` along the reduction axis and is recomputed from the
    dense weights every ``mask_update_interval`` steps; the gradient reaches the dense weights straight
    through, plus the sparse-refined term ``sr_ste_decay * (1 - mask) * w`` that pulls pruned weights to zero.
    Validation, test, predict and :meth:`masked_state_dict` use the N:M model.

    Args:
        n: weights kept in every group of ``m`` (N of "N:M").
        m: group size along the reduction axis.
        sr_ste_decay: ``lambda_w`` of the SR-STE term (reference 2e-4); ``0`` gives plain STE.
        **kwargs: the shared arguments of :class:`NMSparsityCallback` (``include``, ``exclude``,
            ``mask_update_interval`` (reference: 1), ``per_layer_log_interval``, ``on_nonfinite_loss``).

    Raises:
        ValueError: invalid arguments (at construction), or (at setup) no maskable weight.

    Example::

        trainer:
          callbacks:
            - class_path: step_lightning.SRSTECallback
              init_args: {n: 2, m: 4, sr_ste_decay: 2.0e-4}
    """

    def __init__(self, n: PositiveInt = 2, m: IntAtLeast2 = 4, sr_ste_decay: NonNegativeFloat = 2e-4,
                 **kwargs: Any) -> None:
        check_arguments(SRSTECallback, locals())
        super().__init__(n, m, **kwargs)  # checks the shared arguments and the N:M ratio
        self.sr_ste_decay = float(sr_ste_decay)

    @property
    @override
    def masks_active(self) -> bool:
        return True
