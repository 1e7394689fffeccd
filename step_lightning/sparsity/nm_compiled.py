"""The fused N:M mask: the eager :func:`~step_lightning.sparsity.nm.nm_mask` rules as one compiled kernel.

The eager reference makes one pass over the weight per pairwise comparison (6 for 2:4, 28 for 1:8, 120 for
1:16) plus the lookups; memory-bound, it costs 6-20x a copy of the weight. Here the same rules are written
as elementwise code over the group members of a grouped view ``(A, m, B)`` (see ``nm._grouped``), which
Inductor compiles into one kernel that reads each weight once and writes the mask once. The rules are
those of the eager code, so the masks are bit-identical, ties and NaN included:

* ``m <= 6`` (the eager lookup table): member ``k`` wins the pair ``(i, j)``, ``i < j``, as ``i`` when
  ``|w_i| >= |w_j|``; the ``n`` members with the most wins are kept, the lower index first among equal
  counts (which is what the table rows hold). Per group: ``m (m - 1) / 2`` comparisons and a ranking of
  ``m`` small integers, in registers.
* ``m > 6``, ``n = 1`` (1:8, 1:16): the eager rule keeps member ``k`` iff it beats every other member,
  i.e. ``|w_k| > |w_i|`` for every ``i < k`` (a NaN ``|w_i|`` is beaten; a NaN ``|w_k|`` beats every
  earlier one) and ``|w_k| >= |w_j|`` for every ``j > k``. That is a comparison with the NaN-ignoring
  maximum of the members before ``k`` and with the NaN-propagating maximum of those after it: a prefix
  and a suffix scan, ``O(m)`` per group instead of ``O(m^2)`` pairs.
* ``m > 6``, ``n > 1``: the eager win count (``wins >= m - n``), pairwise, still in one pass over memory.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from step_lightning.compiling import CompiledKernel, compile_available, dtype_and_device, mark_dynamic

_KERNELS: dict[tuple[int, int], CompiledKernel] = {}


def _count(flags: list[Tensor]) -> Tensor:
    """How many of the boolean tensors ``flags`` are true, elementwise, as int32."""
    total = flags[0].to(torch.int32)
    for flag in flags[1:]:
        total = total + flag.to(torch.int32)
    return total


def _wins(members: list[Tensor], m: int) -> list[Tensor]:
    """Per member, how many others it beats (the pair ``i < j`` goes to ``i`` when ``|w_i| >= |w_j|``)."""
    ge = {(i, j): members[i] >= members[j] for i, j in itertools.combinations(range(m), 2)}
    return [_count([ge[(k, j)] if k < j else ~ge[(j, k)] for j in range(m) if j != k]) for k in range(m)]


def _keep_top1(members: list[Tensor], m: int) -> list[Tensor]:
    """``n = 1``, ``m > 6``: member ``k`` is kept iff it beats all the others (eager's ``wins >= m - 1``)."""
    # earlier[k]: the NaN-ignoring max of members[0..k], -1 (below every |w|) while they are all NaN.
    earlier = [torch.where(members[0].isnan(), -1.0, members[0])]
    for k in range(1, m):
        earlier.append(torch.fmax(earlier[-1], members[k]))
    later = [members[m - 1]]  # later[i]: NaN-propagating max of members[m-1-i..m-1]
    for k in range(m - 2, -1, -1):
        later.append(torch.maximum(later[-1], members[k]))
    keep = []
    for k in range(m):
        beats_earlier = members[k].isnan() | (members[k] > earlier[k - 1]) if k > 0 else None
        beats_later = members[k] >= later[m - 2 - k] if k < m - 1 else None
        if beats_earlier is None:
            keep.append(beats_later)
        elif beats_later is None:
            keep.append(beats_earlier)
        else:
            keep.append(beats_earlier & beats_later)
    return keep


def _make_kernel(n: int, m: int):
    def keep_grouped(g: Tensor) -> Tensor:
        absval = g.abs()
        members = [absval[:, k, :] for k in range(m)]
        if m > 6 and n == 1:
            keep = _keep_top1(members, m)
        elif m > 6:
            keep = [wins >= m - n for wins in _wins(members, m)]
        else:
            # The lookup table's order: most wins first, the lower index first among equal counts.
            key = [wins * m + (m - 1 - k) for k, wins in enumerate(_wins(members, m))]
            keep = [_count([key[i] > key[k] for i in range(m) if i != k]) < n for k in range(m)]
        return torch.stack(keep, dim=1)

    return keep_grouped


def compiled_keep(g: Tensor, n: int, m: int) -> Tensor | None:
    """The keep mask of a grouped view ``(A, m, B)`` from the fused kernel, or ``None`` when it is unavailable.

    ``None`` (the caller then runs the eager rules) when ``torch.compile`` cannot target the device or when
    the kernel failed once in this process (with one warning, see :class:`~step_lightning.compiling.CompiledKernel`).
    """
    if not compile_available(g.device):
        return None
    kernel = _KERNELS.get((n, m))
    if kernel is None:
        kernel = _KERNELS[(n, m)] = CompiledKernel(f"nm_mask {n}:{m}", _make_kernel(n, m))
    # Dynamo specialises a size-1 group width (Linear: B = 1) and compiles anew per dtype and device.
    key = f"{dtype_and_device(g)}, {'B = 1' if g.shape[2] == 1 else 'B > 1'}"
    # The group count and width vary between weights; m stays static, so the member loads have static strides.
    return kernel(key, mark_dynamic(g, (0, 2)))
