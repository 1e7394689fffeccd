"""Per watched tensor, the level of Adam's second moment: StepAdamW's ``log_v_hat_layers`` (the sample of the
``"layer_rise"`` AutoSwitch test)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: One bucket's contribution to a step: the watched tensors' positions in ``watch()`` order, and their levels.
Part = tuple[list[int], Tensor]


class WatchedLevels:
    """Each watched tensor's mean ``log v_hat``, kept across steps in ``watch()`` order.

    A step's buckets each give :meth:`part` the sums of ``log v_hat`` over their tensors' elements with ``v > 0``
    and the counts of those elements; :meth:`update` writes them into the levels. A tensor without a gradient in
    a step keeps the level of the last step it had one (its ``v`` did not change), NaN before it ever had one; a
    tensor with no ``v > 0`` has no scale: level 0, a constant, until it gets one (a jump the test sees).
    """

    def __init__(self, params: Sequence[Tensor] = ()) -> None:
        self.positions: dict[int, int] = {id(p): i for i, p in enumerate(params)}  # id(param) -> position
        self._levels: Tensor | None = None
        self._index: dict[tuple[int, ...], Tensor] = {}  # a bucket's positions, on the levels' device

    def __bool__(self) -> bool:
        return bool(self.positions)

    def watches(self, param: Tensor) -> bool:
        return id(param) in self.positions

    def part(self, params: Sequence[Tensor], log_sums: Tensor, nonzero: Tensor) -> Part:
        """The levels of watched ``params`` (``log_sums`` and ``nonzero``: 1-D, an entry per parameter)."""
        levels = torch.where(nonzero > 0, log_sums / nonzero.clamp_min(1), 0.0)
        return [self.positions[id(p)] for p in params], levels

    def update(self, parts: Sequence[Part]) -> Tensor:
        """Write this step's parts into the levels; return a copy of all of them (1-D, ``watch()`` order)."""
        if self._levels is None:
            self._levels = torch.full((len(self.positions),), math.nan, device=parts[0][1].device)
        for positions, levels in parts:
            key = tuple(positions)
            if key not in self._index:  # built once per bucket, so the hot path copies nothing to the device
                self._index[key] = torch.tensor(positions, device=self._levels.device)
            self._levels.index_copy_(0, self._index[key], levels.to(self._levels.device, torch.float32))
        return self._levels.clone()
