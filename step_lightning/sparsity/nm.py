"""N:M masks: computing them, and checking that a tensor obeys one.

"N:M" always means **N kept of every M**: in each group of ``m`` consecutive weights along the
reduction (input) axis at most ``n`` are non-zero. The reduction axis depends on how a layer stores
its weight, which is what ``layout`` names:

========== ======================= =====================================================================
layout     weight shape            groups of ``m`` consecutive entries along
========== ======================= =====================================================================
linear     ``(out, in)``           ``in`` (dim 1), as ``nn.Linear`` multiplies ``x @ W.T``
conv       ``(out, in, *kernel)``  ``in`` (dim 1) at a fixed output channel and kernel position
                                   (``nn.Conv1d/2d/3d``; for grouped convs ``in`` is per group)
conv1d_hf  ``(in, out)``           ``in`` (dim 0), Hugging Face ``Conv1D`` (GPT-2) computes ``x @ W``
========== ======================= =====================================================================

This module is pure PyTorch: no Lightning, no Python loop over groups, no float64, and it runs on
whatever device the weight is on.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, get_args

import torch
from torch import Tensor

Layout = Literal["linear", "conv", "conv1d_hf"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
MaskImplementation = Literal["auto", "compiled", "eager"]
MASK_IMPLEMENTATIONS: tuple[str, ...] = get_args(MaskImplementation)

# Up to this group size the ranking goes through a lookup table indexed by the packed outcomes of
# the m*(m-1)/2 pairwise comparisons (2**15 rows for m = 6); above it, ranks are accumulated.
_LUT_MAX_M = 6
_LUT_CACHE: dict[tuple[int, int, torch.device], Tensor] = {}
# Elements per slice on CPU: the slice's |w| (2 MiB in fp32) and intermediates fit a core's caches.
_CPU_SLICE = 1 << 19


def nm_ratio_problems(n: int, m: int) -> list[str]:
    """The rule across ``n`` and ``m`` (``0 < n < m``) as messages; empty if it holds or if either is no integer.

    For constructors whose signature already types ``n`` and ``m`` (``PositiveInt``, ``IntAtLeast2``): the
    rule the types cannot express, reported with the other problems of the call.
    """
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        return []
    if m >= 2 and 0 < n < m:
        return []
    return [f"`n`:`m` = {n}:{m} is not a valid N:M ratio (N kept of every M): need 0 < n < m, e.g. 2:4, 1:4, 1:8, 4:8"]


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``n`` and ``m`` describe a valid N:M ratio (``0 < n < m``)."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"`n` and `m` must be integers with 0 < n < m, got n={n!r}, m={m!r}.")
    for problem in nm_ratio_problems(n, m):
        raise ValueError(problem + ".")


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown `layout`={layout!r}; expected one of {list(LAYOUTS)}.")


def reduction_size(shape: torch.Size | tuple[int, ...], layout: Layout) -> int:
    """The length of the axis that N:M groups run along, for a weight of ``shape`` in ``layout``."""
    check_layout(layout)
    if layout == "linear":
        if len(shape) != 2:
            raise ValueError(f"layout='linear' expects a 2-D weight (out, in), got shape {tuple(shape)}.")
        return shape[1]
    if layout == "conv":
        if len(shape) < 3:
            raise ValueError(f"layout='conv' expects a weight (out, in, *kernel), got shape {tuple(shape)}.")
        return shape[1]
    if len(shape) != 2:
        raise ValueError(f"layout='conv1d_hf' expects a 2-D weight (in, out), got shape {tuple(shape)}.")
    return shape[0]


def _grouped(weight: Tensor, n: int, m: int, layout: Layout) -> Tensor:
    """View ``weight`` as ``(A, m, B)``: dim 1 runs over the members of one group.

    linear ``(out, in)`` -> ``(out * in/m, m, 1)``; conv ``(out, in, *k)`` -> ``(out * in/m, m, prod(k))``;
    conv1d_hf ``(in, out)`` -> ``(in/m, m, out)``. No copy for a contiguous weight.
    """
    check_nm(n, m)
    red = reduction_size(weight.shape, layout)
    if red % m != 0:
        raise ValueError(
            f"Cannot group a weight of shape {tuple(weight.shape)} (layout={layout!r}) into N:M "
            f"{n}:{m}: its reduction size {red} is not divisible by m={m}."
        )
    if layout == "linear":
        return weight.reshape(-1, m, 1)
    if layout == "conv":
        return weight.reshape(weight.shape[0] * (red // m), m, math.prod(weight.shape[2:]))
    return weight.reshape(red // m, m, weight.shape[1])


def _keep_table(n: int, m: int, device: torch.device) -> Tensor:
    """Row ``c`` says which of the ``m`` members are kept when the pairwise outcomes pack to ``c``.

    Bit ``b`` of ``c`` is ``|w_i| >= |w_j|`` for the ``b``-th pair ``i < j``: the lower index wins ties.
    """
    key = (n, m, device)
    table = _LUT_CACHE.get(key)
    if table is None:
        pairs = list(itertools.combinations(range(m), 2))
        codes = torch.arange(2 ** len(pairs))
        wins = torch.zeros(len(codes), m, dtype=torch.int64)
        for bit, (i, j) in enumerate(pairs):
            i_wins = (codes >> bit) & 1
            wins[:, i] += i_wins
            wins[:, j] += 1 - i_wins
        # Keep the n members with the most wins, the lower index first among equal counts. For real
        # numbers the outcomes are transitive and the win counts are distinct, so this is "the n largest";
        # NaN makes them cyclic, and this rule still keeps exactly n.
        order = (wins * m + (m - 1 - torch.arange(m))).argsort(dim=1, descending=True)
        table = torch.zeros(len(codes), m, dtype=torch.bool).scatter_(1, order[:, :n], True).to(device)
        _LUT_CACHE[key] = table
    return table


def check_mask_implementation(implementation: str) -> None:
    """Raise ``ValueError`` unless ``implementation`` is one of :data:`MASK_IMPLEMENTATIONS`."""
    if implementation not in MASK_IMPLEMENTATIONS:
        raise ValueError(f"Unknown `implementation`={implementation!r} for nm_mask; expected one of "
                         f"{list(MASK_IMPLEMENTATIONS)}.")


def use_compiled_mask(implementation: MaskImplementation, device: torch.device) -> bool:
    """Whether :func:`nm_mask` with ``implementation`` tries the fused kernel for a weight on ``device``.

    ``"auto"`` means the fused kernel on CUDA and eager on CPU. Measured on a CPU (benchmarks/RESULTS.md,
    2026-12-04): Inductor's C++ kernel is scalar there (the group members are strided loads), 1.2x faster
    than eager at 2:4, 1.6x at 1:8, 4.9x at 1:16, while one compile costs 30-60 s, which a run repays only
    after thousands of mask updates; ask for ``"compiled"`` explicitly in a long CPU run at 1:8 or 1:16. On
    a GPU the eager path is 10-130 kernel launches and passes per weight, and a compile takes seconds.
    """
    if implementation == "eager":
        return False
    return implementation == "compiled" or device.type == "cuda"


@torch.no_grad()
def nm_mask(weight: Tensor, n: int, m: int, layout: Layout = "linear", *,
            implementation: MaskImplementation = "auto") -> Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` in every group of ``m`` along the reduction axis.

    Args:
        weight: the dense weight, any floating dtype and device.
        n: how many weights each group keeps.
        m: the group size; the weight's reduction size (see the module docstring) must divide by it.
        layout: how the weight is stored: ``"linear"``, ``"conv"`` or ``"conv1d_hf"``.
        implementation: ``"eager"`` (the reference: one pass over the weight per pairwise comparison),
            ``"compiled"`` (the same rules as one ``torch.compile``d kernel, bit-identical, ties and NaN
            included: :mod:`step_lightning.sparsity.nm_compiled`; its first use per N:M, dtype and device
            compiles, announced on the ``step_lightning`` logger, and any compile failure falls back to
            eager with one warning) or ``"auto"`` (compiled on CUDA, eager on CPU: :func:`use_compiled_mask`).

    Returns:
        A ``torch.bool`` tensor of ``weight``'s shape and device with exactly ``n`` ``True`` per group.
        Ties go to the lower index within the group, so every rank computes the same mask. A group
        holding NaN still keeps exactly ``n`` for ``m <= 6`` (which ones is unspecified); above that a
        NaN group may keep more or fewer.

    Raises:
        ValueError: for ``n``/``m`` outside ``0 < n < m``, an unknown ``layout`` or ``implementation``, a
            weight of the wrong rank for the layout, or a reduction size not divisible by ``m``.

    Example::

        >>> w = torch.tensor([[0.1, -0.9, 0.5, 0.2]])
        >>> nm_mask(w, 2, 4)
        tensor([[False,  True,  True, False]])
    """
    check_mask_implementation(implementation)
    if (layout == "conv" and weight.dim() == 4 and not weight.is_contiguous()
            and weight.is_contiguous(memory_format=torch.channels_last)):
        # channels_last stores (out, kh, kw, in): the groups of m input channels are contiguous runs, so
        # rank them as a Linear weight without a copy; the mask comes back channels_last too.
        physical = weight.permute(0, 2, 3, 1)
        keep_physical = nm_mask(physical.reshape(-1, physical.shape[-1]), n, m, "linear",
                                implementation=implementation)
        return keep_physical.view(physical.shape).permute(0, 3, 1, 2)
    g = _grouped(weight, n, m, layout)
    if use_compiled_mask(implementation, weight.device):
        from step_lightning.sparsity.nm_compiled import compiled_keep  # imports torch._dynamo lazily

        fused = compiled_keep(g, n, m, row_length=weight.shape[1] if layout == "linear" else None)
        if fused is not None:
            return fused.view(weight.shape)
    a_groups, _, b = g.shape
    keep = torch.empty(g.shape, dtype=torch.bool, device=weight.device)
    # On CPU the ranking's ~10 passes over the weight are memory-bound: in slices that stay in cache
    # they run about twice as fast. A GPU wants one launch per op over the whole tensor.
    rows = max(1, _CPU_SLICE // (m * b)) if weight.device.type == "cpu" else a_groups
    for start in range(0, a_groups, rows):
        keep[start:start + rows] = _keep_grouped(g[start:start + rows], n, m)
    return keep.view(weight.shape)


def _keep_grouped(g: Tensor, n: int, m: int) -> Tensor:
    """The keep mask of a grouped view ``(A, m, B)``, same shape."""
    a_groups, _, b = g.shape
    absval = g.abs()
    members = [absval[:, k, :] for k in range(m)]  # (A, B) each; strided views, no copies
    out_shape = (a_groups, b)
    pairs = list(itertools.combinations(range(m), 2))
    if m <= _LUT_MAX_M:
        code_dtype = torch.uint8 if len(pairs) <= 8 else torch.int16
        code = torch.zeros(out_shape, dtype=code_dtype, device=g.device)
        i_wins = torch.empty(out_shape, dtype=torch.bool, device=g.device)
        for bit, (i, j) in enumerate(pairs):
            torch.ge(members[i], members[j], out=i_wins)
            code.add_(i_wins.view(torch.uint8) if code_dtype == torch.uint8 else i_wins, alpha=1 << bit)
        table = _keep_table(n, m, g.device)
        keep = torch.index_select(table, 0, code.reshape(-1).int())  # (A*B, m)
        return keep.view(a_groups, b, m).transpose(1, 2)
    # wins[k] counts the members that group member k beats; kept iff it beats at least m - n.
    wins = torch.zeros((m, *out_shape), dtype=torch.int16, device=g.device)
    for i, j in pairs:
        i_wins = torch.ge(members[i], members[j])
        wins[i].add_(i_wins)
        wins[j].add_(~i_wins)
    return (wins >= m - n).movedim(0, 1)


def _group_counts(weight: Tensor, n: int, m: int, layout: Layout) -> Tensor:
    """Number of non-zeros per group, shaped ``(A, B)`` as in :func:`_grouped`."""
    return (_grouped(weight, n, m, layout) != 0).sum(dim=1)


@torch.no_grad()
def is_nm_sparse(weight: Tensor, n: int, m: int, layout: Layout = "linear") -> bool:
    """Whether every group of ``m`` along the reduction axis holds at most ``n`` non-zeros.

    Raises ``ValueError`` for the same invalid arguments as :func:`nm_mask`.
    """
    return bool((_group_counts(weight, n, m, layout) <= n).all())


def _describe_group(shape: torch.Size, m: int, layout: Layout, a: int, b: int) -> str:
    """The group at position ``(a, b)`` of the grouped view, written as an index into the weight."""
    if layout == "linear":
        per_row = shape[1] // m
        row, start = divmod(a, per_row)
        return f"weight[{row}, {start * m}:{start * m + m}]"
    if layout == "conv":
        per_out = shape[1] // m
        out, start = divmod(a, per_out)
        kernel = tuple(int(i) for i in torch.unravel_index(torch.tensor(b), tuple(shape[2:])))
        pos = ", ".join(str(k) for k in kernel)
        return f"weight[{out}, {start * m}:{start * m + m}, {pos}]"
    return f"weight[{a * m}:{a * m + m}, {b}]"


@torch.no_grad()
def check_nm_sparse(weight: Tensor, n: int, m: int, layout: Layout = "linear", name: str = "weight") -> None:
    """Raise ``ValueError`` naming the first group of ``weight`` with more than ``n`` non-zeros.

    Args:
        weight: the tensor to check (e.g. an exported, masked weight).
        n: the most non-zeros a group may hold.
        m: the group size along the reduction axis of ``layout``.
        layout: ``"linear"``, ``"conv"`` or ``"conv1d_hf"``.
        name: how to call the tensor in the message (e.g. its parameter name).
    """
    counts = _group_counts(weight, n, m, layout)
    bad = (counts > n).nonzero()
    if bad.numel() == 0:
        return
    a, b = (int(i) for i in bad[0])
    where = _describe_group(weight.shape, m, layout, a, b).replace("weight", name, 1)
    raise ValueError(
        f"{name} (shape {tuple(weight.shape)}, layout={layout!r}) is not {n}:{m} sparse: group {where} "
        f"holds {int(counts[a, b])} non-zeros, at most {n} allowed ({bad.shape[0]} bad groups in all)."
    )
