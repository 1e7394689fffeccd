"""Pure-PyTorch N:M sparsity: masks, layouts, target selection, masked-weight swapping, mask fingerprints.

Nothing in this package imports Lightning, so it can be used in any training loop.
"""

from step_lightning.sparsity.fingerprint import describe_rank_mismatch, mask_fingerprint
from step_lightning.sparsity.masked import MaskedWeights
from step_lightning.sparsity.nm import (
    LAYOUTS,
    Layout,
    check_nm,
    check_nm_sparse,
    is_nm_sparse,
    nm_mask,
    nm_ratio_problems,
    reduction_size,
)
from step_lightning.sparsity.targets import Skipped, SparseTarget, format_table, module_layout, select_targets

__all__ = [
    "LAYOUTS",
    "Layout",
    "MaskedWeights",
    "Skipped",
    "SparseTarget",
    "check_nm",
    "check_nm_sparse",
    "describe_rank_mismatch",
    "format_table",
    "is_nm_sparse",
    "mask_fingerprint",
    "module_layout",
    "nm_mask",
    "nm_ratio_problems",
    "reduction_size",
    "select_targets",
]
