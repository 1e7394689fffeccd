"""Micro-benchmarks of the weight-sized work, for ``overhead.py`` and ``gpu_check.py``: ratios side by side.

* ``nm_mask`` of a square fp32 weight (layout ``linear``) at 2:4, 1:8 and 1:16, eager and compiled (the fused
  kernel), against a naive ``topk`` + ``scatter_`` mask and against one ``copy_`` into a preallocated buffer
  (the memory-traffic floor) and a ``clone()``;
* the optimizer step on a CIFAR ResNet-18's parameters (random gradients): ``torch.optim.AdamW`` foreach and
  fused, ``StepAdamW`` foreach (the reference) and fused (``implementation="fused"``: the fused AdamW kernel,
  compiled statistic and frozen kernels), before any freeze, with ``watch()`` on every >=2-D weight (the
  AutoSwitch statistic), and after freezing every >=2-D weight.

Every case runs once first (compiles, lookup tables, allocator), then the cases alternate for ``repeats``
rounds; a ratio is the median of the per-round ratios. Each function returns Markdown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from step_lightning import StepAdamW, nm_mask

RATIOS = ((2, 4), (1, 8), (1, 16))
LR = 1e-3


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    aligns = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


CLOCKS = ("wall", "cpu")


def timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], Any]], float]:
    """Seconds ``fn`` takes: wall time, or with ``clock="cpu"`` the CPU time of this thread (``time.thread_time``:
    what a single-threaded CPU run costs, without the time other processes on a shared machine take the core;
    page faults and cache misses still count)."""
    if clock not in CLOCKS:
        raise ValueError(f"Unknown clock={clock!r}; expected one of {list(CLOCKS)}.")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError(f"clock='cpu' times the CPU only; got device {device}.")
    now = time.thread_time if clock == "cpu" else time.perf_counter

    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return now() - t0
    return timed


def interleave(cases: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
               clock: str = "wall") -> dict[str, list[float]]:
    timed = timer(device, clock)
    for fn in cases.values():  # warm-up: compiles, tables, allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return median([x / y for x, y in zip(times[a], times[b], strict=True)])


def naive_topk_mask(w: Tensor, n: int, m: int) -> Tensor:
    """The textbook N:M mask along the last axis: topk of |w| per group, scattered into a bool tensor."""
    idx = w.abs().view(-1, m).topk(n, dim=1).indices
    return torch.zeros(idx.shape[0], m, dtype=torch.bool, device=w.device).scatter_(1, idx, True).view_as(w)


@torch.no_grad()
def bench_nm_mask(size: int, repeats: int, device: torch.device, dtype: torch.dtype = torch.float32,
                  ratios: Sequence[tuple[int, int]] = RATIOS, clock: str = "wall") -> str:
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    for n, m in ratios:  # the fused kernel must give the eager mask
        if not torch.equal(nm_mask(w, n, m, implementation="compiled"), nm_mask(w, n, m, implementation="eager")):
            raise RuntimeError(f"compiled nm_mask {n}:{m} differs from eager")
    buffer = torch.empty_like(w)
    cases: dict[str, Callable[[], Any]] = {"copy_ (preallocated)": lambda: buffer.copy_(w), "clone": w.clone}
    for n, m in ratios:
        cases[f"nm_mask {n}:{m} eager"] = lambda n=n, m=m: nm_mask(w, n, m, implementation="eager")
        cases[f"nm_mask {n}:{m} compiled"] = lambda n=n, m=m: nm_mask(w, n, m, implementation="compiled")
        cases[f"topk+scatter {n}:{m}"] = lambda n=n, m=m: naive_topk_mask(w, n, m)
    times = interleave(cases, repeats, device, clock)
    dt = str(dtype).removeprefix("torch.")
    out = [f"#### nm_mask, {size}x{size} {dt} weight on {device.type}, layout linear\n",
           f"{repeats} interleaved repeats after one warm-up call each, {clock} clock; ratios are medians of "
           "per-repeat ratios.\n",
           table(["operation", "median [ms]"], [[k, f"{1e3 * median(v):.2f}"] for k, v in times.items()]), ""]
    rows = []
    for n, m in ratios:
        e, c, t = f"nm_mask {n}:{m} eager", f"nm_mask {n}:{m} compiled", f"topk+scatter {n}:{m}"
        copy = "copy_ (preallocated)"
        rows.append([f"{n}:{m}", f"{ratio(times, e, copy):.2f}", f"{ratio(times, c, copy):.2f}",
                     f"{ratio(times, t, copy):.2f}", f"{ratio(times, e, c):.2f}"])
    out.append(table(["N:M", "eager / copy_", "compiled / copy_", "topk+scatter / copy_", "eager / compiled"], rows))
    return "\n".join(out) + "\n"


def resnet18_params(device: torch.device) -> list[Tensor]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return [p.detach().to(device) for p in model.parameters()]


def bench_optimizer(repeats: int, device: torch.device, clock: str = "wall") -> str:
    ref = resnet18_params(device)
    g = torch.Generator().manual_seed(1)
    grads = [(torch.randn(p.shape, generator=g) * 1e-2).to(device) for p in ref]

    def params() -> list[nn.Parameter]:
        out = [nn.Parameter(p.clone()) for p in ref]
        for p, grad in zip(out, grads, strict=True):
            p.grad = grad.clone()
        return out

    opts: dict[str, Any] = {
        "AdamW(foreach=True)": torch.optim.AdamW(params(), lr=LR, weight_decay=1e-2, foreach=True),
        "AdamW(fused=True)": torch.optim.AdamW(params(), lr=LR, weight_decay=1e-2, fused=True),
        "StepAdamW foreach": StepAdamW(params(), lr=LR, weight_decay=1e-2, implementation="foreach"),
        "StepAdamW fused": StepAdamW(params(), lr=LR, weight_decay=1e-2, implementation="fused"),
        "StepAdamW auto": StepAdamW(params(), lr=LR, weight_decay=1e-2, implementation="auto"),
    }
    steps = [k for k in opts if k.startswith("StepAdamW")]
    phases: list[tuple[str, dict[str, list[float]]]] = []

    def phase(label: str) -> None:
        phases.append((label, interleave({k: opt.step for k, opt in opts.items()}, repeats, device, clock)))

    phase("before freezing, no watch")
    for k in steps:
        opts[k].watch([p for p in opts[k].param_groups[0]["params"] if p.dim() >= 2])
    phase("before freezing, watch(all >=2-D weights)")
    for k in steps:
        weights = [p for p in opts[k].param_groups[0]["params"] if p.dim() >= 2]
        opts[k].watch([])
        opts[k].freeze_second_moment(weights)
    phase("after freezing all >=2-D weights")
    rows = []
    for label, times in phases:
        rows.append([label, *(f"{1e3 * median(times[k]):.1f}" for k in opts),
                     *(f"{ratio(times, k, 'AdamW(fused=True)'):.3f}" for k in steps)])
    numel = sum(p.numel() for p in ref)
    header = ["StepAdamW state", *(f"{k} [ms]" for k in opts), *(f"{k} / AdamW(fused)" for k in steps)]
    return "\n".join([
        f"#### Optimizer step on {device.type}, ResNet-18 parameters ({len(ref)} tensors, {numel / 1e6:.1f} M), "
        "random grads\n",
        f"{repeats} interleaved repeats after one warm-up step each, {clock} clock; ratios are medians of per-repeat "
        "ratios. The "
        "AdamW columns run plain AdamW in every phase (the reference for the ratio).\n",
        table(header, rows)]) + "\n"
