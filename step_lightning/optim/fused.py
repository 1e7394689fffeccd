"""StepAdamW's fused paths: ``torch._fused_adamw_`` before the freeze, compiled kernels for the AutoSwitch
statistic and the frozen update.

The foreach reference (:class:`~step_lightning.optim.step_adamw.StepAdamW` with ``implementation="foreach"``)
makes one pass over the weights per op: an AdamW step is about 10, the watched statistic another 10 (a copy
of ``v``, ``g^2``, two 1-norms, a clamp, a log, a 0-norm...), the frozen step 6. Here:

* the AdamW update is PyTorch's fused AdamW kernel (one read and write of ``p, m, v``), bitwise
  ``torch.optim.AdamW(fused=True)``;
* the statistic is one compiled kernel per watched tensor that reads the old ``v`` and ``g`` once, before
  the update, and reduces the four sums the statistic needs (it recomputes the new ``v`` in registers);
* the frozen update is one compiled call for all frozen tensors of a bucket (a function that takes the lists,
  :func:`_frozen_set`): per tensor one loop that reads ``p, g, m, v*`` and writes ``p, m``. One call per
  tensor cost a Python call and a Dynamo guard check each (about 0.1 ms), which on ResNet-18's 21 frozen
  weights made the step 1.18x AdamW(fused=True) (benchmarks/RESULTS.md, 2026-12-04).

The statistic's tensors are passed flattened, with their length marked dynamic: one compile per dtype and
device serves every parameter. The frozen set is compiled for its shapes (one compile per parameter set,
dtype and device; Dynamo generalises a set whose shapes change to dynamic sizes on its next compile). Each
number of tensors has a kernel of its own (:func:`_frozen_kernel`): Dynamo's cache, and its limit of 8
compiles, is per code object. Hyper-parameters and the step count are passed
as numbers and 0-d tensors, so a learning rate that changes every step does not recompile (Dynamo turns a float
that changed into a kernel argument).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from step_lightning.compiling import CompiledKernel, compile_available, dtype_and_device, mark_dynamic

_TINY = torch.finfo(torch.float32).tiny
_LOG_TINY = math.log(_TINY)


def fused_supported(param: Tensor) -> bool:
    """Whether ``torch._fused_adamw_`` can update ``param``: a floating dtype on a device with fused kernels."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return (type(param) is torch.Tensor or isinstance(param, torch.nn.Parameter)) and \
        torch.is_floating_point(param) and param.device.type in _get_fused_kernels_supported_devices()


def _stats(v: Tensor, g: Tensor, shift: Tensor, beta2: float) -> Tensor:
    """``[sum |v - g^2|, sum v_new, sum log v_hat over v_new > 0, count of v_new > 0]`` of one tensor, fp32.

    As the foreach reference: ``log v_hat = log(max(v, TINY) / TINY) + log(TINY) - log(1 - beta2 ** k)`` on
    the elements with ``v > TINY`` (the first term is exactly 0 elsewhere, which is what is counted);
    ``shift = log(TINY) - log(1 - beta2 ** k)`` comes in as a 0-d tensor (:func:`_bias_terms`).
    """
    v32, g32 = v.float(), g.float()
    gg = g32 * g32
    v_new = v32 * beta2 + gg * (1 - beta2)
    level = torch.log(torch.clamp_min(v_new, _TINY)) - _LOG_TINY
    nonzero = (level != 0).sum(dtype=torch.float32)
    return torch.stack([(v32 - gg).abs().sum(), v_new.sum(), level.sum() + nonzero * shift, nonzero])


def _frozen(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: Tensor, beta1: float, decay: float,
            scale: float, eps: float) -> None:
    """In place, as the foreach reference: ``p *= decay; m = lerp(m, g, 1 - beta1); p += step_size * m / denom``
    with ``denom = sqrt(v*) * scale + eps`` (``scale`` is ``1 / sqrt(1 - beta2 ** T0)`` or 1) and the 0-d
    ``step_size = -lr / (1 - beta1 ** k)`` (:func:`_bias_terms`)."""
    p.mul_(decay)
    m.lerp_(g, 1 - beta1)
    denom = torch.sqrt(v) * scale + eps
    p.add_(m / denom * step_size)


def _frozen_set(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], vs: list[Tensor],
                step_sizes: Tensor, scales: list[float], beta1: float, decay: float, eps: float) -> None:
    """:func:`_frozen` over the lists (``step_sizes``: one tensor, an entry per tensor): compiled as one call,
    one loop per tensor."""
    for i, (p, g, m, v, scale) in enumerate(zip(params, grads, exp_avgs, vs, scales, strict=True)):
        _frozen(p, g, m, v, step_sizes[i], beta1, decay, scale, eps)


_STATS = CompiledKernel("StepAdamW statistic", _stats)
_FROZEN: dict[int, CompiledKernel] = {}  # number of tensors -> the frozen-set kernel


def _frozen_kernel(count: int) -> CompiledKernel:
    """The compiled :func:`_frozen_set` for lists of ``count`` tensors."""
    kernel = _FROZEN.get(count)
    if kernel is None:
        kernel = _FROZEN[count] = CompiledKernel("StepAdamW frozen step", _frozen_set)
    return kernel


def _bias_terms(steps: list[Tensor], beta: float, device: torch.device) -> list[Tensor]:
    """``1 - beta ** k`` per step counter, as 0-d fp32 tensors on ``device``: computed here, once per tensor, since
    Inductor would inline a 0-d expression into the elementwise loop and evaluate ``pow`` per element; no host sync
    (the counters may live on the GPU)."""
    out = torch._foreach_pow(beta, [s.to(device, torch.float32) for s in steps])
    torch._foreach_mul_(out, -1.0)
    torch._foreach_add_(out, 1.0)
    return out


def compiled_available(device: torch.device) -> bool:
    """Whether the compiled kernels can run on ``device`` (and have not failed in this process)."""
    return compile_available(device) and not (_STATS.failed or any(k.failed for k in _FROZEN.values()))


def watched_sums(vs: list[Tensor], grads: list[Tensor], steps: list[Tensor], beta2: float) -> Tensor | None:
    """The four sums of :func:`_stats` of each watched tensor (before its update), as rows of a ``(len(vs), 4)``
    tensor, or ``None`` on a failure."""
    parts = []
    shifts = _bias_terms(steps, beta2, vs[0].device)
    torch._foreach_log_(shifts)
    torch._foreach_mul_(shifts, -1.0)
    torch._foreach_add_(shifts, _LOG_TINY)
    for v, g, shift in zip(vs, grads, shifts, strict=True):
        out = _STATS(dtype_and_device(v), mark_dynamic(v.view(-1), (0,)), mark_dynamic(g.reshape(-1), (0,)), shift,
                     beta2)
        if out is None:
            return None
        parts.append(out)
    return torch.stack(parts)


def frozen_step(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                frozen_vs: list[Tensor], steps: list[Tensor], scales: list[float], eps: float) -> bool:
    """Run the compiled frozen update on all of ``params`` in one call; ``False`` if the kernel failed (nothing
    was updated then: the caller updates them with the foreach reference)."""
    beta1, _ = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    if not params:
        return True
    kernel = _frozen_kernel(len(params))
    if kernel.failed:
        return False
    # -lr / (1 - beta1 ** k) for all tensors in a few small ops on one stacked tensor: outside the kernel, where
    # Inductor would evaluate the pow per element (see _bias_terms).
    step_sizes = torch.pow(beta1, torch.stack(steps).to(params[0].device, torch.float32)).neg_().add_(1.0)
    step_sizes = step_sizes.reciprocal_().mul_(-lr)
    kernel(f"{dtype_and_device(params[0])}, {len(params)} tensors", params, grads, exp_avgs, frozen_vs, step_sizes,
           scales, float(beta1), 1 - lr * wd, eps)
    return not kernel.failed
