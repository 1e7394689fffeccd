"""Swapping masked weights in and out of a model, vectorised over all masked layers.

The recipes keep **dense** weights ``w`` that the optimizer updates and run forward/backward with the
**masked** weights ``w * mask``: :meth:`MaskedWeights.apply_` writes ``w * mask`` into a persistent
buffer and swaps it in as the parameter's storage (``param.data``), :meth:`MaskedWeights.restore_`
swaps the dense storage back. A backward pass run in between produces ``dL/d(w * mask)`` in
``param.grad``: the straight-through estimator with no autograd overhead. The parameter objects never
change (the optimizer, DDP's hooks and ``torch.compile`` keep seeing the same tensors, with the same
shape, strides and dtype), and the whole swap costs one pass over the weights: the multiplication.
Swapping storage does not suit sharded parameters (FSDP) or CUDA graphs that pin parameter addresses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from step_lightning.sparsity.nm import MaskImplementation, check_mask_implementation, nm_mask
from step_lightning.sparsity.targets import SparseTarget


class MaskedWeights:
    """The masks of a set of :class:`SparseTarget` and the in-place swap of masked/dense weights.

    Args:
        targets: the weights to mask, all with the same ``n``/``m``.
        implementation: how :func:`nm_mask` computes the masks (``"auto"``: the fused compiled kernel on
            CUDA, the eager reference on CPU; ``"compiled"``; ``"eager"``); the masks are the same.

    The masks are plain attributes, not module buffers: DDP would otherwise broadcast them every
    forward. Every rank computes the same masks from the same weights (ties break to lower index).
    """

    def __init__(self, targets: Sequence[SparseTarget], implementation: MaskImplementation = "auto") -> None:
        if not targets:
            raise ValueError("MaskedWeights needs at least one target.")
        check_mask_implementation(implementation)
        self.implementation: MaskImplementation = implementation
        self.targets = list(targets)
        self.params = [t.param for t in self.targets]
        self.masks: list[Tensor] | None = None
        self._dense: list[Tensor] | None = None  # the dense storages while the masked ones are swapped in
        self._buffers: list[Tensor] | None = None  # the masked storages, reused: no allocation per step
        self._sizes: dict[torch.device, Tensor] = {}

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def applied(self) -> bool:
        """Whether the parameters currently hold the masked weights (dense values saved aside)."""
        return self._dense is not None

    @torch.no_grad()
    def compute_masks(self) -> list[Tensor]:
        """Magnitude N:M masks of the current parameter values (call while they are dense)."""
        if self.applied:
            raise RuntimeError("compute_masks() called while masked weights are applied; restore_() first.")
        return [nm_mask(t.param, t.n, t.m, t.layout, implementation=self.implementation) for t in self.targets]

    @torch.no_grad()
    def update_masks(self, track_flips: bool = False) -> Tensor | None:
        """Recompute the masks from the dense weights.

        Args:
            track_flips: also count, per layer, the mask entries that changed (one more pass over the
                masks, so callers ask only when they will log it).

        Returns:
            With ``track_flips`` and previous masks, a device tensor of flipped entries per layer (divide
            by :meth:`sizes` for rates); otherwise ``None``.
        """
        new = self.compute_masks()
        old, self.masks = self.masks, new
        if old is None or not track_flips:
            return None
        return torch.stack([(a != b).sum() for a, b in zip(old, new, strict=True)])

    def sizes(self, device: torch.device | None = None) -> Tensor:
        """Entries per masked weight, on ``device`` (cached: no host-to-device copy per logging step)."""
        key = torch.device("cpu") if device is None else torch.device(device)
        cached = self._sizes.get(key)
        if cached is None:
            cached = self._sizes[key] = torch.tensor([p.numel() for p in self.params], device=key)
        return cached

    def kept(self) -> Tensor:
        """Kept mask entries per layer (device tensor); all entries while no masks exist."""
        if self.masks is None:
            return self.sizes(self.params[0].device)
        return torch.stack([mask.sum() for mask in self.masks])

    def stats(self, masked: bool = True, flips: Tensor | None = None, per_layer: bool = False) -> dict[str, Tensor]:
        """Device scalars to log, no host sync: ``density`` (kept fraction of all masked entries) and, given
        ``flips`` (entries flipped per layer, from :meth:`update_masks`), ``flip_rate``; with ``per_layer``
        also ``layers/<name>/kept`` and ``layers/<name>/flip_rate``. ``masked=False``: the model is dense
        now, every entry counts as kept."""
        sizes = self.sizes(self.params[0].device)
        kept = self.kept() if masked else sizes
        stats = {"density": kept.sum() / sizes.sum()}
        if flips is not None:
            stats["flip_rate"] = flips.sum() / sizes.sum()
        if per_layer:
            for i, name in enumerate(self.names):
                stats[f"layers/{name}/kept"] = kept[i] / sizes[i]
                if flips is not None:
                    stats[f"layers/{name}/flip_rate"] = flips[i] / sizes[i]
        return stats

    def set_masks(self, masks: Sequence[Tensor]) -> None:
        """Install given masks (e.g. from a checkpoint), moved to each parameter's device."""
        if len(masks) != len(self.params):
            raise ValueError(f"Expected {len(self.params)} masks, got {len(masks)}.")
        for t, mask in zip(self.targets, masks, strict=True):
            if mask.shape != t.param.shape:
                raise ValueError(f"Mask for {t.name} has shape {tuple(mask.shape)}, "
                                 f"the weight has {tuple(t.param.shape)}.")
        self.masks = [mask.to(device=p.device, dtype=torch.bool) for mask, p in zip(masks, self.params, strict=True)]

    def clear_masks(self) -> None:
        """Forget the masks (e.g. those of other weights, before loading a checkpoint that may hold none)."""
        if self.applied:
            raise RuntimeError("clear_masks() called while masked weights are applied; restore_() first.")
        self.masks = None

    def _require_masks(self) -> list[Tensor]:
        if self.masks is None:
            raise RuntimeError("No masks yet: call update_masks() or set_masks() first.")
        return self.masks

    @torch.no_grad()
    def apply_(self, masks: Sequence[Tensor] | None = None) -> None:
        """Swap ``w * mask`` in as the parameters' storage, keeping the dense storage aside.

        Args:
            masks: masks to use this once (e.g. for evaluation) instead of :attr:`masks`.
        """
        masks = self._require_masks() if masks is None else list(masks)
        if self.applied:
            return
        if self._buffers is None or any(
            b.shape != p.shape or b.stride() != p.stride() or b.device != p.device or b.dtype != p.dtype
            for b, p in zip(self._buffers, self.params, strict=True)
        ):
            # Not inference tensors even when first allocated under `trainer.validate`'s inference mode:
            # training reuses them.
            with torch.inference_mode(False):
                self._buffers = [torch.empty_like(p) for p in self.params]
        dense = []
        for p, mask, buf in zip(self.params, masks, self._buffers, strict=True):
            torch.mul(p.data, mask.to(p.device), out=buf)
            dense.append(p.data)
            p.data = buf
        self._dense = dense

    @torch.no_grad()
    def restore_(self, sr_ste_decay: float = 0.0) -> None:
        """Swap the dense storage back; optionally add the SR-STE term to the gradients first.

        Args:
            sr_ste_decay: ``lambda_w``; when non-zero, ``grad += lambda_w * (1 - mask) * w`` for every
                parameter that has a gradient (``(1 - mask) * w`` is exactly ``w_dense - w_masked``).
        """
        dense = self._dense
        if dense is None:
            return
        if sr_ste_decay:
            with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
            if with_grad:
                # The masked storage is not needed any more: turn it into -(1 - mask) * w in place.
                masked = [self.params[i].data for i in with_grad]
                torch._foreach_sub_(masked, [dense[i] for i in with_grad])
                torch._foreach_add_([self.params[i].grad for i in with_grad], masked, alpha=-sr_ste_decay)
        for p, d in zip(self.params, dense, strict=True):
            p.data = d
        self._dense = None

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned entries (ASP)."""
        masks = self._require_masks()
        pairs = [(p.grad, mask) for p, mask in zip(self.params, masks, strict=True) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [mk for _, mk in pairs])

    @torch.no_grad()
    def mask_weights_(self) -> None:
        """Zero the pruned entries of the parameters permanently (ASP, after each optimizer step)."""
        torch._foreach_mul_(self.params, self._require_masks())

    def dense_values(self) -> dict[str, Tensor]:
        """The dense weights by parameter name (the saved copies while masked weights are applied)."""
        values = self._dense if self._dense is not None else self.params
        return {t.name: v.detach() for t, v in zip(self.targets, values, strict=True)}

    @torch.no_grad()
    def masked_values(self, fresh: bool = False) -> dict[str, Tensor]:
        """New tensors ``w * mask`` by parameter name.

        Args:
            fresh: use magnitude masks of the current dense weights instead of :attr:`masks` (always the
                case while no masks exist).
        """
        dense = self.dense_values()
        masks = self.masks
        if fresh or masks is None:
            masks = [nm_mask(dense[t.name], t.n, t.m, t.layout, implementation=self.implementation)
                     for t in self.targets]
        return {t.name: dense[t.name] * mask for t, mask in zip(self.targets, masks, strict=True)}
