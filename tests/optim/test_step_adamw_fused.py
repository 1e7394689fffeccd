"""StepAdamW's fused implementation against the foreach reference: update, statistic, frozen step, resume, fallbacks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from step_lightning import StepAdamW
from step_lightning.compiling import CompiledKernel
from step_lightning.optim import fused

from .test_step_adamw import model_and_grads, run

TOL = dict(rtol=1e-5, atol=1e-6)
# log_v_hat sums log(v / TINY) (about 87 per element) and subtracts 87 per element again: two summation orders
# agree to about 1e-5 of 87, in log units (the AutoSwitch threshold is 0.25).
STAT_TOL = dict(rtol=1e-4, atol=1e-4)


def twin_runs(implementations: tuple[str, str], watch: bool = False, freeze_after: int | None = None,
              swap_at: int | None = None, **kwargs) -> tuple[list[nn.Module], list[list[dict]]]:
    """Run the same 6 steps with two implementations; optionally watch the Linear weights, freeze them after
    ``freeze_after`` steps, or hand the state dict to the other implementation after ``swap_at`` steps."""
    models, stats = [], []
    for impl, other in (implementations, implementations[::-1]):
        model, grads = model_and_grads()
        weights = [model[0].weight, model[2].weight]
        opt = StepAdamW(model.parameters(), lr=1e-2, implementation=impl, **kwargs)
        if watch:
            opt.watch(weights)
        seen = []
        for k, step_grads in enumerate(grads):
            if swap_at is not None and k == swap_at:
                state = copy.deepcopy(opt.state_dict())
                opt = StepAdamW(model.parameters(), lr=1e-2, implementation=other, **kwargs)
                opt.load_state_dict(state)
                if watch:
                    opt.watch(weights)
            if freeze_after is not None and k == freeze_after:
                opt.freeze_second_moment(weights)
            run(model, opt, [step_grads])
            seen.append(dict(opt.second_moment_stats or {}))
        models.append(model)
        stats.append(seen)
    return models, stats


def assert_same(models: list[nn.Module], stats: list[list[dict]]) -> None:
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for sa, sb in zip(*stats, strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **STAT_TOL)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_update_matches_foreach(weight_decay: float) -> None:
    # "auto" on CPU: the fused AdamW kernel, the foreach statistic around it, the foreach frozen step.
    models, stats = twin_runs(("auto", "foreach"), watch=True, freeze_after=3, weight_decay=weight_decay)
    assert all(stats[0][k] for k in range(3))
    assert_same(models, stats)


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_compiled_watched_and_frozen_steps_match_foreach(weight_decay: float, bias_correction: bool) -> None:
    models, stats = twin_runs(("fused", "foreach"), watch=True, freeze_after=3, weight_decay=weight_decay,
                              frozen_bias_correction=bias_correction)
    assert all(stats[0][k] for k in range(3)) and not stats[0][4]  # watched before the freeze, none after
    assert_same(models, stats)
    assert not fused._STATS.failed and fused._FROZEN and not any(k.failed for k in fused._FROZEN.values())


@pytest.mark.slow
@pytest.mark.parametrize("swap_at", [2, 4])  # before and after the freeze
def test_state_dict_round_trips_between_implementations(swap_at: int) -> None:
    reference, _ = twin_runs(("foreach", "foreach"), watch=True, freeze_after=3)
    for pair in (("fused", "foreach"), ("foreach", "fused")):
        models, _ = twin_runs(pair, watch=True, freeze_after=3, swap_at=swap_at)
        for a, b in zip(models[0].parameters(), reference[0].parameters(), strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_auto_falls_back_to_foreach_where_fused_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    # A float64 parameter stands for one the fused kernel cannot take (another device or dtype): "auto" updates
    # it with foreach (bitwise AdamW(foreach=True)) and the float32 ones with the fused kernel.
    monkeypatch.setattr(fused, "fused_supported", lambda p: p.dtype == torch.float32)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8, dtype=torch.float64))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    ours = StepAdamW(params, lr=1e-2)
    ref32 = torch.optim.AdamW([twins[0]], lr=1e-2, fused=True)
    ref64 = torch.optim.AdamW([twins[1]], lr=1e-2, foreach=True)
    for _ in range(3):
        for p, t in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        ours.step()
        ref32.step()
        ref64.step()
    assert torch.equal(params[0], twins[0]) and torch.equal(params[1], twins[1])
    with pytest.raises(ValueError, match=r"`implementation`='fused' needs floating-point parameters on a device "
                                         r"with fused kernels; got one of dtype torch.float64 on cpu"):
        StepAdamW(params, implementation="fused")


def test_bad_implementation_is_rejected() -> None:
    with pytest.raises(ValueError, match="implementation"):
        StepAdamW([nn.Parameter(torch.zeros(2))], implementation="triton")  # type: ignore[arg-type]


def test_a_compile_failure_falls_back_to_foreach_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "_STATS", CompiledKernel("StepAdamW statistic", fused._stats))
    monkeypatch.setattr(fused, "_FROZEN", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models, stats = twin_runs(("fused", "foreach"), watch=True, freeze_after=3)
    assert_same(models, stats)
    messages = [str(c.message) for c in caught if "kernel failed" in str(c.message)]
    assert messages == ["step_lightning: the compiled StepAdamW statistic kernel failed (RuntimeError: no C++ "
                        "compiler); using the eager implementation (same results, slower) for the rest of this "
                        "process."]


@pytest.mark.gpu
def test_fused_matches_foreach_on_cuda_and_resumes_across() -> None:
    def runs(impl: str) -> tuple[list[torch.Tensor], list[dict]]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(64, 32, device="cuda")), nn.Parameter(torch.randn(32, device="cuda"))]
        opt = StepAdamW(params, lr=1e-2, weight_decay=0.1, implementation=impl)
        opt.watch(params[:1])
        seen = []
        for k in range(6):
            if k == 3:
                opt.freeze_second_moment(params[:1])
                state = copy.deepcopy(opt.state_dict())
                opt = StepAdamW(params, lr=1e-2, weight_decay=0.1, implementation=impl)
                opt.load_state_dict(state)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            seen.append(dict(opt.second_moment_stats or {}))
        return params, seen

    ours, ours_stats = runs("auto")
    ref, ref_stats = runs("foreach")
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for sa, sb in zip(ours_stats, ref_stats, strict=True):
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **STAT_TOL)
    assert not fused._STATS.failed and fused._FROZEN and not any(k.failed for k in fused._FROZEN.values())
