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

**Row kernel (CPU, Linear layout).** Inductor's C++ backend emits the grouped kernel scalar: a group's members
sit at stride ``m`` (it loads ``w[k + m*x0]``), and its heuristics refuse to vectorise loops where such loads
dominate (forcing it was 5x slower: each strided load goes through a scalar gather). Where groups run along the
contiguous axis (layout ``linear``, group width ``B = 1``) a second kernel therefore works per **element** of the
``(rows, row_length)`` weight: element ``k`` at position ``p = k % m`` of its group meets its mates at ``k + d``,
``d`` in ``[-p, m - 1 - p]``, i.e. in shifted contiguous views of the weight, which Inductor vectorises
(``at::vec``, 16 floats wide with AVX-512). What it takes to keep that loop vector code, all measured:

* ``p`` (or which neighbours are mates) comes in as a small float tensor of one row's length
  (:func:`_row_aux`): ``k % m`` computed in the kernel made the loop scalar;
* the interior rows read shifted views of the flat weight, which never leave it; only the first and the last
  row read a padded copy of themselves (masked loads over the whole weight were 4-7x slower);
* the mask is written as ``int8`` 0/1 through float and viewed as ``bool``: Inductor's vectorised stores of
  ``bool``, or conversions of a mask to ``int8``, were 15-25x slower;
* the three parts (first row, interior, last row) are joined by ``torch.cat``, which for ``int8`` on CPU
  Inductor leaves to ``aten.cat``: one extra copy of the mask (a quarter of the weight's bytes, read and
  written). Writing the parts into slices of a preallocated output instead made Inductor materialise the
  intermediates (15x slower).

The element counts its wins by the eager pairwise rule (the pair ``i < j`` goes to ``i`` when
``|w_i| >= |w_j|``) and is kept iff ``wins >= m - n``:

* ``m > 6``: that *is* the eager rule, NaN included.
* ``m <= 6``: the eager lookup table ranks the members by wins, the lower index first among equal counts.
  Without NaN the pairwise outcomes are those of a strict total order (magnitude, then index), the win counts
  are ``0..m-1``, and the table keeps exactly the members with ``wins >= m - n``. A NaN can make them cyclic
  (``[0, 1, NaN, 1]``: the count keeps 3, the table 2), so the row kernel also returns each row's
  NaN-propagating maximum, and a weight that holds a NaN is masked by the grouped kernel instead.

One compile per N:M, dtype and device serves every weight shape with at least 4 rows (rows and row length are
dynamic); smaller weights go to the grouped kernel.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from step_lightning.compiling import CompiledKernel, compile_available, dtype_and_device, mark_dynamic

_KERNELS: dict[tuple[int, int], CompiledKernel] = {}
_ROW_KERNELS: dict[tuple[int, int], CompiledKernel] = {}
_AUX: dict[tuple[bool, int, torch.device], Tensor] = {}


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


def _keep_by_wins(at, aux: Tensor, n: int, m: int) -> Tensor:
    """Per element: whether it beats at least ``m - n`` of its group mates (eager's pairwise rule).

    ``at(d)`` is ``|w|`` shifted by ``d`` elements along the row (``at(0)`` the element itself); ``aux`` is
    :func:`_row_aux`. An earlier mate ``e`` (``d <= p``, ``p`` the element's position in its group) is beaten
    when ``not |w_e| >= |w|``, a later one ``l`` (``d <= m - 1 - p``) when ``|w| >= |w_l|``. The forms are the
    cheapest found for Inductor's vector code: for ``n = 1`` (beat them all) a conjunction over the neighbours
    with ``aux = p``; else a float32 count with one compare, select and add per neighbour, where
    ``aux[0, d-1]`` is 1.0 where the element ``d`` before is a mate and ``aux[1, d-1]`` where the one ``d``
    after is.
    """
    a = at(0)
    keep = wins = None
    for d in range(1, m):
        if n == 1:
            beats = ((aux < d) | ~(at(-d) >= a)) & ((aux > m - 1 - d) | (a >= at(d)))
            keep = beats if keep is None else keep & beats
        else:
            won = torch.where(at(-d) >= a, 0.0, aux[0, d - 1]) + torch.where(a >= at(d), aux[1, d - 1], 0.0)
            wins = won if wins is None else wins + won
    return keep if n == 1 else wins >= m - n


def _make_row_kernel(n: int, m: int):
    def keep_rows(w: Tensor, aux: Tensor) -> tuple[Tensor, Tensor | None]:
        rows, length = w.shape
        flat = w.reshape(-1)

        def inner(d: int) -> Tensor:  # rows 1..rows-2 shifted by d: always inside the weight, no bounds checks
            return flat[length + d: length + d + (rows - 2) * length].view(rows - 2, length).abs()

        ends = F.pad(torch.stack([w[0], w[rows - 1]]).abs(), (m - 1, m - 1))

        def outer(d: int) -> Tensor:  # the first and the last row, from their padded copy
            return ends[:, m - 1 + d: m - 1 + d + length]

        # bool -> float -> int8: Inductor's vectorised bool -> int8 (or bool) conversion is 15x slower.
        middle = _keep_by_wins(inner, aux, n, m).float().to(torch.int8)
        first_last = _keep_by_wins(outer, aux, n, m).float().to(torch.int8)
        keep = torch.cat([first_last[:1], middle, first_last[1:]])
        if m > 6:
            return keep, None
        # Per row, NaN iff the row holds one (maximum propagates NaN); fused into the loop above: no second pass.
        return keep, torch.cat([inner(0).amax(dim=1), ends.amax(dim=1)])

    return keep_rows


def _row_aux(length: int, n: int, m: int, device: torch.device) -> Tensor:
    """The ``aux`` of :func:`_keep_by_wins` for a row of ``length``, float32: the positions ``p = k % m``
    (``(length,)``) for ``n = 1``, else the mate flags (``(2, m - 1, length)``). A view of one cached tensor per
    ``n = 1`` or not, ``m`` and device: an index computed in the kernel, ``k % m``, made its loop scalar."""
    key = (n == 1, m, device)
    cached = _AUX.get(key)
    if cached is None or cached.shape[-1] < length:
        p = torch.arange(max(length, 4096), device=device) % m
        d = torch.arange(1, m, device=device).unsqueeze(1)
        cached = _AUX[key] = (p if n == 1 else torch.stack([p >= d, p <= m - 1 - d])).float()
    return cached[..., :length]


def _row_keep(weight: Tensor, n: int, m: int) -> Tensor | None:
    """The keep mask of a 2-D ``(rows, row_length)`` weight from the row kernel, or ``None`` where it does not
    apply (a NaN with ``m <= 6``, fewer than 4 rows) or failed."""
    rows, length = weight.shape
    kernel = _ROW_KERNELS.get((n, m))
    if kernel is None:
        kernel = _ROW_KERNELS[(n, m)] = CompiledKernel(f"nm_mask {n}:{m}", _make_row_kernel(n, m))
    if rows < 4 or not weight.is_contiguous():  # 3 rows: Dynamo would specialise the interior's 1 row
        return None
    out = kernel(f"{dtype_and_device(weight)}, rows", mark_dynamic(weight, (0, 1)),
                 mark_dynamic(_row_aux(length, n, m, weight.device), (0,) if n == 1 else (2,)))
    if out is None:
        return None
    keep, row_max = out
    if row_max is not None and bool(row_max.isnan().any()):
        return None
    return keep.view(torch.bool)


def compiled_keep(g: Tensor, n: int, m: int, row_length: int | None = None) -> Tensor | None:
    """The keep mask of a grouped view ``(A, m, B)`` from the fused kernel, or ``None`` when it is unavailable.

    ``row_length``: for a weight whose groups run along its contiguous rows (layout ``linear``, ``B = 1``), the
    length of a row; on CPU such weights go to the row kernel (see the module docstring). ``None`` (the caller
    then runs the eager rules) when ``torch.compile`` cannot target the device or when the kernel failed once in
    this process (with one warning, see :class:`~step_lightning.compiling.CompiledKernel`).
    """
    if not compile_available(g.device):
        return None
    if row_length is not None and g.device.type == "cpu" and g.shape[2] == 1:
        keep = _row_keep(g.view(-1, row_length), n, m)
        if keep is not None:
            return keep.view(g.shape)
        if _ROW_KERNELS[(n, m)].failed:  # warned once; a compiler that fails here fails the grouped kernel too
            return None
    kernel = _KERNELS.get((n, m))
    if kernel is None:
        kernel = _KERNELS[(n, m)] = CompiledKernel(f"nm_mask {n}:{m}", _make_kernel(n, m))
    # Dynamo specialises a size-1 group width (Linear: B = 1) and compiles anew per dtype and device.
    key = f"{dtype_and_device(g)}, {'B = 1' if g.shape[2] == 1 else 'B > 1'}"
    # The group count and width vary between weights; m stays static, so the member loads have static strides.
    return kernel(key, mark_dynamic(g, (0, 2)))
