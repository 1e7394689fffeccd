"""The fused (compiled) nm_mask against the eager reference: bit-identical, ties and NaN included; and its fallback."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from step_lightning import nm_mask
from step_lightning.sparsity import nm_compiled

from .test_nm import RATIOS

SHAPES = {"linear": (6, 32), "conv": (5, 32, 3, 3), "conv1d_hf": (32, 7)}


def inputs(shape: tuple[int, ...], m: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Random values, and tie-heavy ones: a few integers, +-0, equal magnitudes of either sign, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    few = torch.tensor([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0])
    ties = few[torch.randint(0, len(few), shape, generator=g)]
    specials = torch.tensor([1.0, -1.0, 0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.0])
    nan_heavy = specials[torch.randint(0, len(specials), shape, generator=g)]
    zeros = torch.zeros(shape)
    zeros.view(-1)[::3] = -0.0
    return [t.to(dtype) for t in (torch.randn(shape, generator=g), ties, nan_heavy, zeros)]


def reshaped(shape: tuple[int, ...], layout: str, m: int) -> tuple[int, ...]:
    size = list(shape)
    size[0 if layout == "conv1d_hf" else 1] = 4 * m
    return tuple(size)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "m"), RATIOS)
def test_compiled_is_bit_identical_to_eager(n: int, m: int) -> None:
    for layout in ("linear", "conv", "conv1d_hf"):
        shape = reshaped(SHAPES[layout], layout, m)
        for seed, w in enumerate(inputs(shape, m, torch.float32, seed=n * 100 + m)):
            eager = nm_mask(w, n, m, layout, implementation="eager")
            compiled = nm_mask(w, n, m, layout, implementation="compiled")
            assert torch.equal(compiled, eager), (layout, seed)
    assert not nm_compiled._KERNELS[(n, m)].failed  # the compiled kernel ran, no silent fallback
    assert not nm_compiled._ROW_KERNELS[(n, m)].failed  # and the row kernel (linear layout on CPU)


@pytest.mark.slow
def test_compiled_other_dtypes_shapes_and_channels_last() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for w in inputs((8, 64), 4, dtype, seed=1):
            assert torch.equal(nm_mask(w, 2, 4, implementation="compiled"), nm_mask(w, 2, 4, implementation="eager"))
    for shape in ((3, 8), (17, 40), (1, 4), (5, 12), (9, 4)):  # one compile serves every shape
        w = torch.randn(shape)
        assert torch.equal(nm_mask(w, 2, 4, implementation="compiled"), nm_mask(w, 2, 4, implementation="eager"))
    w = torch.randn(4, 16, 3, 3).to(memory_format=torch.channels_last)
    assert torch.equal(nm_mask(w, 2, 4, "conv", implementation="compiled"), nm_mask(w, 2, 4, "conv",
                                                                                    implementation="eager"))
    assert not nm_compiled._KERNELS[(2, 4)].failed and not nm_compiled._ROW_KERNELS[(2, 4)].failed


@pytest.mark.slow
def test_row_kernel_hands_weights_with_nan_to_the_grouped_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # The row kernel counts wins; for m <= 6 that is the eager lookup table only without NaN. In this group the
    # NaN makes the wins cyclic: the count keeps 3 members where the table keeps 2.
    monkeypatch.setattr(nm_compiled, "_KERNELS", {})
    w = torch.randn(6, 16)
    assert torch.equal(nm_mask(w, 2, 4, implementation="compiled"), nm_mask(w, 2, 4, implementation="eager"))
    assert nm_compiled._KERNELS == {}  # no NaN: the row kernel alone
    cyclic = torch.tensor([0.0, 1.0, float("nan"), 1.0])
    for row, col in ((0, 0), (0, 12), (3, 4), (5, 12)):  # first row (padded), interior, last row (padded)
        v = w.clone()
        v[row, col:col + 4] = cyclic
        eager = nm_mask(v, 2, 4, implementation="eager")
        assert eager[row, col:col + 4].tolist() == [False, True, True, False]
        assert torch.equal(nm_mask(v, 2, 4, implementation="compiled"), eager), (row, col)
    assert not nm_compiled._KERNELS[(2, 4)].failed and not nm_compiled._ROW_KERNELS[(2, 4)].failed


def test_a_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(nm_compiled, "_KERNELS", {})
    monkeypatch.setattr(nm_compiled, "_ROW_KERNELS", {})
    w = torch.randn(8, 16)
    eager = nm_mask(w, 2, 4, implementation="eager")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="step_lightning"):
        warnings.simplefilter("always")
        first = nm_mask(w, 2, 4, implementation="compiled")
        second = nm_mask(w * 2, 2, 4, implementation="compiled")
    assert torch.equal(first, eager) and torch.equal(second, eager)
    messages = [str(c.message) for c in caught]
    assert len(messages) == 1, messages
    assert ("the compiled nm_mask 2:4 kernel failed (RuntimeError: InductorError: no C++ compiler); using the "
            "eager implementation (same results, slower) for the rest of this process") in messages[0]
    assert "compiling the fused nm_mask 2:4 kernel for float32 on cpu, rows" in caplog.text


def test_masked_weights_use_the_chosen_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    from step_lightning.sparsity import MaskedWeights, SparseTarget

    seen = []
    monkeypatch.setattr(nm_compiled, "compiled_keep", lambda g, n, m, **kw: seen.append((tuple(g.shape), n, m)))
    w = torch.nn.Parameter(torch.randn(4, 8))
    target = SparseTarget(name="fc.weight", param=w, n=2, m=4, layout="linear")
    masks = MaskedWeights([target], implementation="compiled").compute_masks()
    assert seen == [((8, 4, 1), 2, 4)]  # tried the fused kernel (which "declined" here: eager result)
    assert torch.equal(masks[0], nm_mask(w, 2, 4, implementation="eager"))
    with pytest.raises(ValueError, match=r"Unknown `implementation`='fast'"):
        MaskedWeights([target], implementation="fast")  # type: ignore[arg-type]


def test_auto_is_eager_on_cpu_and_bad_implementation_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    monkeypatch.setattr(nm_compiled, "compiled_keep", lambda *args: called.append(args))
    nm_mask(torch.randn(4, 8), 2, 4)
    assert called == []
    with pytest.raises(ValueError, match=r"Unknown `implementation`='fused' for nm_mask; expected one of "
                                         r"\['auto', 'compiled', 'eager'\]"):
        nm_mask(torch.randn(4, 8), 2, 4, implementation="fused")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8), (1, 16), (4, 8)])
def test_compiled_is_bit_identical_to_eager_on_cuda(n: int, m: int) -> None:
    for layout in ("linear", "conv", "conv1d_hf"):
        shape = reshaped(SHAPES[layout], layout, m)
        for dtype in (torch.float32, torch.bfloat16):
            for w in inputs(shape, m, dtype, seed=n * 100 + m):
                w = w.cuda()
                assert torch.equal(nm_mask(w, n, m, layout), nm_mask(w, n, m, layout, implementation="eager"))
    assert not nm_compiled._KERNELS[(n, m)].failed  # "auto" is the compiled kernel on CUDA, and it ran
