"""The device-resident augmentation draws the same distribution of images as torchvision's CPU transforms."""

from __future__ import annotations

import itertools

import pytest
import torch

from step_lightning.data.augment import crop_flip, normalization, normalize
from step_lightning.data.cifar import PADDING, STATS, AugmentedImages, CIFARDataModule

MEAN, STD = STATS["cifar10"]


def _candidates(image: torch.Tensor) -> torch.Tensor:
    """Every crop/flip of ``image`` torchvision can draw, built by hand: (2 * 9 * 9, C, H, W), normalised."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * PADDING, w + 2 * PADDING, dtype=image.dtype)
    padded[:, PADDING:PADDING + h, PADDING:PADDING + w] = image
    crops = []
    for flip, dy, dx in itertools.product((False, True), range(2 * PADDING + 1), range(2 * PADDING + 1)):
        crop = padded[:, dy:dy + h, dx:dx + w]
        crops.append(crop.flip(-1) if flip else crop)
    return (torch.stack(crops).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _identify(samples: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index of the candidate each sample equals (up to float rounding); fails if one matches none."""
    probe = torch.randn(candidates[0].numel(), 8, generator=torch.Generator().manual_seed(0))
    best = torch.cdist(samples.flatten(1) @ probe, candidates.flatten(1) @ probe).argmin(dim=1)
    error = (samples - candidates[best]).abs().amax()
    assert float(error) < 1e-4, "an augmented image is no crop/flip of the input"
    return best


def test_device_and_cpu_paths_draw_the_same_crops_and_flips() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    candidates = _candidates(image)
    draws = 1500

    dm = CIFARDataModule(num_workers=0)
    cpu_set = AugmentedImages(image[None].expand(draws, -1, -1, -1), torch.zeros(draws, dtype=torch.long),
                              dm._cpu_transform(train=True))
    cpu = torch.stack([cpu_set[i][0] for i in range(draws)])
    scale, shift = normalization(MEAN, STD)
    gen = torch.Generator().manual_seed(1)
    device = normalize(crop_flip(image[None].expand(draws, -1, -1, -1), PADDING, gen), scale, shift)

    counts = torch.stack([torch.bincount(_identify(x, candidates), minlength=len(candidates))
                          for x in (cpu, device)])
    stats = pytest.importorskip("scipy.stats", reason="the uniformity test needs scipy (the `test` extra)")
    # Each path is uniform over the 162 (flip, dy, dx) outcomes, and the two paths do not differ.
    for row in counts:
        assert stats.chisquare(row.numpy()).pvalue > 1e-3
    assert stats.chi2_contingency(counts.numpy()).pvalue > 1e-3
    flips = counts[:, 81:].sum(1).float() / draws
    assert torch.all((flips - 0.5).abs() < 0.06)


def test_crop_flip_is_seeded_and_keeps_dtype_device_and_shape() -> None:
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    a = crop_flip(x, 2, torch.Generator().manual_seed(3))
    b = crop_flip(x, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(crop_flip(x, 0, flip=False), x)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) batch"):
        crop_flip(x[0], 2)


def test_normalize_matches_torchvision_and_checks_channels() -> None:
    from torchvision.transforms import v2

    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(x))
    torch.testing.assert_close(normalize(x, *normalization(MEAN, STD)), expected)
    with pytest.raises(ValueError, match="3 channels, the statistics 1"):
        normalize(x, *normalization([0.5], [0.5]))
