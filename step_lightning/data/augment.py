"""Batched image augmentation on the accelerator: the CIFAR recipe without per-image Python.

:func:`crop_flip` draws, for every image of a batch independently, the same random crop with zero
padding and the same horizontal flip as torchvision's ``RandomCrop(size, padding)`` followed by
``RandomHorizontalFlip(0.5)`` (offsets uniform in ``[0, 2 * padding]`` on each axis, flip with
probability 1/2), as one gather over the whole batch on whatever device the batch lives on.
:func:`normalize` fuses ``ToDtype(float32, scale=True)`` and ``Normalize(mean, std)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None,
              flip: bool = True) -> torch.Tensor:
    """Random ``padding``-pixel zero-padded crop back to the input size, and random horizontal flip.

    Args:
        images: ``(B, C, H, W)`` batch, any dtype (uint8 in the data modules), on any device.
        padding: pixels of zero padding on every side; offsets are uniform in ``[0, 2 * padding]``.
        generator: a generator on ``images.device``, for reproducible draws.
        flip: also flip each image horizontally with probability 1/2.

    Returns:
        A new ``(B, C, H, W)`` batch of the same dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"crop_flip expects a (B, C, H, W) batch, got shape {tuple(images.shape)}.")
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    span = 2 * padding + 1
    offsets = torch.randint(0, span, (2, b), generator=generator, device=device)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # (B, H)
    cols_fwd = torch.arange(w, device=device)
    if flip:
        flips = torch.rand(b, generator=generator, device=device) < 0.5
        cols = offsets[1, :, None] + torch.where(flips[:, None], cols_fwd.flip(0), cols_fwd)  # (B, W)
    else:
        cols = offsets[1, :, None] + cols_fwd
    # One flat gather: index of (b, c, row, col) in the padded batch.
    hp, wp = h + 2 * padding, w + 2 * padding
    plane = (torch.arange(b * c, device=device).view(b, c, 1, 1)) * (hp * wp)
    index = plane + (rows * wp).view(b, 1, h, 1) + cols.view(b, 1, 1, w)
    return padded.reshape(-1).take(index)


def normalization(mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of shape ``(1, C, 1, 1)`` with ``x * scale + shift == (x / 255 - mean) / std``."""
    if len(mean) != len(std):
        raise ValueError(f"normalization: {len(mean)} means but {len(std)} stds.")
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device, dtype), (-mean_t / std_t).to(device, dtype)


def normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``images * scale + shift`` in ``scale``'s dtype, in one fused op (see :func:`normalization`).

    Build ``scale``/``shift`` once per device: creating them per batch would copy from the host every step.
    """
    if images.shape[1] != scale.shape[1]:
        raise ValueError(f"normalize: the batch has {images.shape[1]} channels, the statistics {scale.shape[1]}.")
    return torch.addcmul(shift, images.to(scale.dtype), scale)
