"""step_lightning: train N:M structured-sparse networks with STEP, SR-STE and ASP in PyTorch Lightning."""

from step_lightning.callbacks import ASPCallback, NMSparsityCallback, SRSTECallback, STEPCallback
from step_lightning.optim import AutoSwitch, StepAdamW
from step_lightning.sparsity import check_nm_sparse, is_nm_sparse, nm_mask, select_targets

__version__ = "0.1.0"

__all__ = [
    "ASPCallback",
    "AutoSwitch",
    "NMSparsityCallback",
    "SRSTECallback",
    "STEPCallback",
    "StepAdamW",
    "check_nm_sparse",
    "is_nm_sparse",
    "nm_mask",
    "select_targets",
]
