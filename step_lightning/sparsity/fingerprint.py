"""Mask fingerprints: compare the N:M masks of DDP ranks with a few integers per layer.

Pure torch. Every rank computes its masks from its own copy of the weights; one small ``all_gather`` of
:func:`mask_fingerprint` rows (plus the integers the ranks must agree on) lets every rank verify that it
holds the same masks as rank 0, and :func:`describe_rank_mismatch` says in what a rank differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["describe_rank_mismatch", "mask_fingerprint"]

_HASH_CHUNK = 1 << 22  # positions hashed per kernel: bounds the temporary memory of a fingerprint
_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash: spreads positions over 32 bits


@torch.no_grad()
def mask_fingerprint(masks: Sequence[Tensor]) -> Tensor:
    """A cheap, exact-enough summary of masks to compare across DDP ranks, computed on the masks' device.

    Args:
        masks: boolean masks of any shape (the grouping axis does not matter: positions are hashed in
            the flattened row-major order of each mask).

    Returns:
        An ``int64`` tensor of shape ``(len(masks), 2)``: per mask, the number of kept entries and a
        hash of their positions (the sum over kept positions ``i`` of the low 32 bits of
        ``i * 0x9E3779B1``, wrapping in int64). The position weights are distinct (for fewer than 2**32
        entries), so one kept entry moved within its group always changes the hash; several moves cancel
        out only by coincidence. Integer sums do not depend on the reduction order, so equal masks give
        equal fingerprints on any device. Cost: a few kernels per ``_HASH_CHUNK`` entries, no host sync.
    """
    if not masks:
        return torch.zeros(0, 2, dtype=torch.int64)
    rows = []
    for mask in masks:
        flat = mask.reshape(-1)
        kept = flat.sum(dtype=torch.int64)
        digest = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            part = flat[start:start + _HASH_CHUNK]
            positions = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device)
            weights = (positions * _HASH_MULTIPLIER) & 0xFFFFFFFF
            digest += torch.where(part.bool(), weights, 0).sum()
        rows.append(torch.stack([kept, digest]))
    return torch.stack(rows)


def describe_rank_mismatch(fingerprints: Tensor, scalar_names: Sequence[str], layer_names: Sequence[str]) -> list[str]:
    """Compare per-rank fingerprints with rank 0's and say, per differing rank, in what they differ.

    Args:
        fingerprints: ``(world_size, len(scalar_names) + 2 * len(layer_names))`` integers, one row per rank:
            the named scalars (a negative value reads "none"), then per layer the two columns of
            :func:`mask_fingerprint` (kept entries, position hash).
        scalar_names: what each scalar column is, e.g. ``"switch step"``.
        layer_names: the masked weights, in column order.

    Returns:
        One line per rank that differs from rank 0 (empty when all ranks agree), e.g.
        ``"rank 1: switch step 40 (rank 0: 30); mask of fc.weight: same kept count 512, other positions"``.

    Raises:
        ValueError: ``fingerprints`` does not have the shape the names describe.
    """
    width = len(scalar_names) + 2 * len(layer_names)
    if fingerprints.ndim != 2 or fingerprints.shape[1] != width:
        raise ValueError(f"`fingerprints` must have shape (world_size, {width}) for {len(scalar_names)} scalars and "
                         f"{len(layer_names)} layers, got {tuple(fingerprints.shape)}.")

    def show(value: int) -> str:
        return "none" if value < 0 else str(value)

    rows = fingerprints.tolist()
    lines = []
    for rank, row in enumerate(rows[1:], start=1):
        diffs = [f"{name} {show(row[i])} (rank 0: {show(rows[0][i])})"
                 for i, name in enumerate(scalar_names) if row[i] != rows[0][i]]
        for j, name in enumerate(layer_names):
            k = len(scalar_names) + 2 * j
            if row[k] != rows[0][k]:
                diffs.append(f"mask of {name}: {show(row[k])} kept entries (rank 0: {show(rows[0][k])})")
            elif row[k + 1] != rows[0][k + 1]:
                diffs.append(f"mask of {name}: same kept count {row[k]}, other positions")
        if diffs:
            lines.append(f"rank {rank}: " + "; ".join(diffs))
    return lines
