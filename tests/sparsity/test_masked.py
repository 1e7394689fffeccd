"""The masked-weight swap: forward sees w * mask, gradients pass straight through, dense values come back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from step_lightning.sparsity import MaskedWeights, is_nm_sparse, nm_mask, select_targets


def make() -> tuple[nn.Sequential, MaskedWeights]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Conv1d(16, 8, 1), nn.Linear(8, 2))
    targets, _ = select_targets(model, 2, 4, include=["^1", "^2"])
    return model, MaskedWeights(targets)


def test_apply_restore_roundtrip_is_exact_and_grad_is_straight_through() -> None:
    model, engine = make()
    dense = [p.detach().clone() for p in engine.params]
    engine.update_masks()
    engine.apply_()
    assert engine.applied
    assert all(is_nm_sparse(p, 2, 4, t.layout) for p, t in zip(engine.params, engine.targets, strict=True))
    lin = model[1]
    x = torch.randn(3, 16, requires_grad=True)
    lin(x).sum().backward()
    # dL/dW of a Linear is the outer product: dense everywhere, pruned entries included (straight-through).
    assert torch.allclose(lin.weight.grad, torch.ones(16, 1) * x.sum(0))
    engine.restore_()
    assert not engine.applied
    for p, d in zip(engine.params, dense, strict=True):
        assert torch.equal(p, d)


def test_sr_ste_term() -> None:
    _, engine = make()
    engine.update_masks()
    engine.apply_()
    for p in engine.params:
        p.grad = torch.zeros_like(p)
    engine.restore_(sr_ste_decay=0.5)
    for p, mask in zip(engine.params, engine.masks, strict=True):
        assert torch.equal(p.grad, 0.5 * p.detach() * ~mask)


def test_mask_grads_and_weights() -> None:
    _, engine = make()
    engine.update_masks()
    for p in engine.params:
        p.grad = torch.ones_like(p)
    engine.mask_grads_()
    engine.mask_weights_()
    for p, mask in zip(engine.params, engine.masks, strict=True):
        assert torch.equal(p.grad, mask.float())
        assert torch.equal(p.detach() != 0, mask & (p.detach() != 0))


def test_flips_and_kept() -> None:
    _, engine = make()
    assert engine.update_masks(track_flips=True) is None  # no previous masks
    with torch.no_grad():
        engine.params[0].neg_()  # same magnitudes: no flips
    assert engine.update_masks(track_flips=True).tolist() == [0, 0]
    kept_before = engine.masks[0][0, :4].clone()
    with torch.no_grad():
        engine.params[0][0, :4] = torch.where(kept_before, 0.01, 100.0)  # the pruned pair becomes the largest
    assert engine.update_masks(track_flips=True).tolist() == [4, 0]
    assert engine.kept().tolist() == [128, 64]
    assert engine.sizes().tolist() == [256, 128]


def test_masked_values_without_masks_uses_magnitude() -> None:
    _, engine = make()
    values = engine.masked_values()
    for t in engine.targets:
        assert torch.equal(values[t.name], t.param.detach() * nm_mask(t.param, 2, 4, t.layout))
    # The parameters themselves are untouched.
    assert not is_nm_sparse(engine.params[0], 2, 4)


def test_errors() -> None:
    _, engine = make()
    with pytest.raises(RuntimeError, match="No masks yet"):
        engine.apply_()
    with pytest.raises(ValueError, match="Expected 2 masks, got 1"):
        engine.set_masks([torch.ones(16, 16, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"Mask for 1.weight has shape \(4,\)"):
        engine.set_masks([torch.ones(4, dtype=torch.bool), torch.ones(8, 16, 1, dtype=torch.bool)])
    engine.update_masks()
    engine.apply_()
    with pytest.raises(RuntimeError, match="restore_\\(\\) first"):
        engine.compute_masks()
    with pytest.raises(RuntimeError, match=r"clear_masks\(\) called while masked weights are applied"):
        engine.clear_masks()
    engine.restore_()
    engine.clear_masks()
    assert engine.masks is None
    with pytest.raises(ValueError, match="at least one target"):
        MaskedWeights([])
