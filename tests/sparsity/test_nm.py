"""N:M masks against an independent, loop-based reference, per layout and ratio."""

from __future__ import annotations

import itertools

import pytest
import torch

from step_lightning import check_nm_sparse, is_nm_sparse, nm_mask

RATIOS = [(1, 2), (2, 4), (1, 4), (3, 4), (1, 8), (2, 8), (4, 8), (1, 16), (5, 6)]


def reference_mask(weight: torch.Tensor, n: int, m: int, layout: str) -> torch.Tensor:
    """Loop over every group in plain Python: move the reduction axis last, keep the n largest |w|,
    the lower index first among equals."""
    if layout == "linear":
        w = weight
    elif layout == "conv":
        w = weight.movedim(1, -1)  # (out, *k, in)
    else:
        w = weight.t()  # (out, in)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    flat_w, flat_m = w.reshape(-1, w.shape[-1]), mask.view(-1, w.shape[-1])
    for row in range(flat_w.shape[0]):
        for start in range(0, flat_w.shape[1], m):
            values = [abs(float(v)) for v in flat_w[row, start:start + m]]
            order = sorted(range(m), key=lambda k: (-values[k], k))
            for k in order[:n]:
                flat_m[row, start + k] = True
    if layout == "conv":
        return mask.movedim(-1, 1)
    if layout == "conv1d_hf":
        return mask.t()
    return mask


SHAPES = {"linear": (6, 16), "conv": (3, 16, 2, 3), "conv1d_hf": (16, 5)}


@pytest.mark.parametrize(("n", "m"), RATIOS)
@pytest.mark.parametrize("layout", ["linear", "conv", "conv1d_hf"])
def test_matches_reference(layout: str, n: int, m: int) -> None:
    shape = list(SHAPES[layout])
    red_axis = 0 if layout == "conv1d_hf" else 1
    shape[red_axis] = 2 * m if m != 6 else 12
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randn(*shape, generator=g)
    # Plant ties, including all-equal groups and zeros.
    w.view(-1)[: m] = 0.5
    w.view(-1)[m: 2 * m] = -0.5
    w.view(-1)[-3:] = 0.0
    mask = nm_mask(w, n, m, layout)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, reference_mask(w, n, m, layout))


def test_example_and_ties_go_to_lower_index() -> None:
    assert nm_mask(torch.tensor([[0.1, -0.9, 0.5, 0.2]]), 2, 4).tolist() == [[False, True, True, False]]
    assert nm_mask(torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 2, 4).tolist() == [[True, True, False, False]]
    assert nm_mask(torch.zeros(1, 8), 1, 8).tolist() == [[True] + [False] * 7]
    assert nm_mask(torch.full((1, 8), 0.3), 4, 8).tolist() == [[True] * 4 + [False] * 4]


def test_conv_groups_run_along_input_channels() -> None:
    # Make one input channel dominate at every output/kernel position: it must be kept everywhere.
    w = torch.rand(2, 4, 3, 3)
    w[:, 2] += 10
    mask = nm_mask(w, 1, 4, "conv")
    assert mask[:, 2].all() and not mask[:, [0, 1, 3]].any()


def test_conv1d_hf_groups_run_along_dim0() -> None:
    w = torch.rand(4, 3)  # (in, out)
    w[1] += 10
    assert nm_mask(w, 1, 4, "conv1d_hf").tolist() == [[False] * 3, [True] * 3, [False] * 3, [False] * 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    w = torch.randn(8, 32).to(dtype)
    assert torch.equal(nm_mask(w, 2, 4), reference_mask(w, 2, 4, "linear"))


def test_non_contiguous_input() -> None:
    base = torch.randn(16, 8)
    w = base.t()  # (8, 16) non-contiguous
    assert torch.equal(nm_mask(w, 2, 4), reference_mask(w.contiguous(), 2, 4, "linear"))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8), (3, 8)])
def test_channels_last_conv_weight_gets_the_same_mask_in_its_own_format(n: int, m: int) -> None:
    w = torch.randn(6, 16, 3, 3, generator=torch.Generator().manual_seed(m))
    w.view(-1)[:m] = 0.25  # ties
    mask = nm_mask(w.to(memory_format=torch.channels_last), n, m, "conv")
    assert torch.equal(mask, reference_mask(w, n, m, "conv"))
    assert mask.is_contiguous(memory_format=torch.channels_last)


def test_exactly_n_kept_per_group_even_with_nan() -> None:
    w = torch.randn(4, 16)
    w[0, 1] = float("nan")
    counts = nm_mask(w, 2, 4).view(4, 4, 4).sum(-1)
    assert (counts == 2).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=4, m=4), "need 0 < n < m"),
        (dict(n=0, m=4), "need 0 < n < m"),
        (dict(n=2.0, m=4), "must be integers"),
        (dict(n=2, m=4, layout="rowwise"), "Unknown `layout`='rowwise'"),
        (dict(n=2, m=3), r"shape \(4, 8\).*reduction size 8 is not divisible by m=3"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=message):
        nm_mask(w, **kwargs)


def test_wrong_rank_for_layout() -> None:
    with pytest.raises(ValueError, match="layout='conv' expects a weight"):
        nm_mask(torch.randn(4, 8), 2, 4, "conv")
    with pytest.raises(ValueError, match="layout='linear' expects a 2-D weight"):
        nm_mask(torch.randn(4, 8, 3, 3), 2, 4, "linear")


@pytest.mark.parametrize("layout", ["linear", "conv", "conv1d_hf"])
def test_is_nm_sparse_and_check(layout: str) -> None:
    w = torch.randn(*{"linear": (4, 8), "conv": (4, 8, 3, 3), "conv1d_hf": (8, 4)}[layout])
    masked = w * nm_mask(w, 2, 4, layout)
    assert is_nm_sparse(masked, 2, 4, layout)
    assert is_nm_sparse(masked, 3, 4, layout)  # "at most n"
    assert not is_nm_sparse(w, 2, 4, layout)
    check_nm_sparse(masked, 2, 4, layout)


def test_check_names_first_offending_group() -> None:
    w = torch.zeros(3, 8)
    w[1, 4:7] = 1.0  # 3 non-zeros in the second group of row 1
    w[2, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"fc\.weight\[1, 4:8\] holds 3 non-zeros, at most 2 allowed \(2 bad groups"):
        check_nm_sparse(w, 2, 4, name="fc.weight")
    conv = torch.zeros(2, 8, 3, 3)
    conv[1, 4:8, 2, 1] = 1.0
    with pytest.raises(ValueError, match=r"weight\[1, 4:8, 2, 1\] holds 4"):
        check_nm_sparse(conv, 2, 4, "conv")
    hf = torch.zeros(8, 5)
    hf[0:4, 3] = 1.0
    with pytest.raises(ValueError, match=r"weight\[0:4, 3\] holds 4"):
        check_nm_sparse(hf, 2, 4, "conv1d_hf")


def test_all_lut_tables_cover_every_outcome() -> None:
    # For every distinct-magnitude ordering of a group of 4, the mask keeps the n largest.
    for perm in itertools.permutations(range(4)):
        w = torch.tensor([list(map(float, perm))]) + 1
        for n in (1, 2, 3):
            assert nm_mask(w, n, 4).tolist() == [[v >= 4 - n + 1 for v in w[0].tolist()]]
