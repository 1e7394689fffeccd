"""``torch.compile``d kernels that announce their compiles and never break a run.

The fused N:M mask (:mod:`step_lightning.sparsity.nm_compiled`) and StepAdamW's fused watched/frozen steps
(:mod:`step_lightning.optim.fused`) are small elementwise functions that Inductor turns into one kernel:
one read of each input, one write of each output, where the eager reference makes one pass per op.
:class:`CompiledKernel` wraps such a function with what a training run needs around it:

* **Shape-polymorphic.** The caller marks the sizes that vary between weights dynamic
  (:func:`mark_dynamic`), so one compile serves every weight shape; the others stay static, which lets
  Inductor vectorise (``dynamic=True`` made every stride symbolic and the C++ loops scalar). What still
  compiles anew (another N:M, dtype, device, or a size-1 dimension, which Dynamo specialises) is named
  by the caller's ``key``, and each new key is announced with one
  ``INFO`` line on the ``step_lightning`` logger, then one with the time the first call took. A compile
  costs seconds on a GPU and 20-60 s on a small CPU (measured: benchmarks/RESULTS.md), so it must not
  land on the first training step unannounced.
* **Its own compile cache.** Dynamo keeps its cache, and its recompile limit (8), per code object; each
  kernel gets a copy of its function's code, so kernels never evict each other or fall silently into
  eager execution after the limit.
* **Never fatal.** Any exception from compiling or running the compiled function (no C++ compiler, no
  Triton, an Inductor bug) disables this kernel for the rest of the process with one ``UserWarning``,
  and the call returns ``None``: the caller then runs its eager reference, which computes the same
  values.
"""

from __future__ import annotations

import logging
import time
import types
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

log = logging.getLogger("step_lightning")
# As Lightning does for its own logger: without it, INFO lines (the compile announcements) are dropped where the
# application configured no logging, which is the common case; where it did (root has handlers), leave it alone.
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.propagate = False


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can target ``device`` here: CPU (Inductor's C++ backend) or CUDA with Triton.

    Only an import check; a compile can still fail (e.g. no C++ compiler), which :class:`CompiledKernel`
    turns into its eager fallback.
    """
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def dtype_and_device(tensor: torch.Tensor) -> str:
    """What a kernel's compile depends on beyond the shapes, for its ``key``: e.g. ``"float32 on cuda"``."""
    return f"{str(tensor.dtype).removeprefix('torch.')} on {tensor.device.type}"


def mark_dynamic(tensor: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Mark ``dims`` of ``tensor`` dynamic for Dynamo, except those of size 0 or 1 (which it specialises)."""
    for dim in dims:
        if tensor.shape[dim] > 1:
            torch._dynamo.mark_dynamic(tensor, dim)
    return tensor


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with a code object of its own (Dynamo's cache lives on the code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledKernel:
    """``torch.compile(fn)`` (dims marked dynamic by the caller) with compile announcements and an eager fallback.

    Args:
        name: what the log lines and the warning call the kernel (e.g. ``"nm_mask 2:4"``).
        fn: the function to compile (pure tensor code, traceable by Dynamo without graph breaks).

    Call it as ``kernel(key, *args)``: ``key`` names what a new compile depends on beyond the shapes
    (dtype, device, ...); the result is ``fn(*args)`` compiled, or ``None`` once compiling failed.
    """

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self._fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._seen: set[Hashable] = set()
        self.failed = False

    def __call__(self, key: Hashable, *args: Any) -> Any:
        if self.failed:
            return None
        new = key not in self._seen
        if new:
            log.info("step_lightning: compiling the fused %s kernel for %s (torch.compile, shape-polymorphic: once "
                     "per process and kind; seconds on a GPU, up to a minute on a small CPU).", self.name, key)
        start = time.perf_counter()
        try:
            if self._compiled is None:
                self._compiled = torch.compile(_own_code(self._fn), fullgraph=True)
            out = self._compiled(*args)
        except Exception as error:
            self.failed = True
            warnings.warn(f"step_lightning: the compiled {self.name} kernel failed ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); using the eager "
                          "implementation (same results, slower) for the rest of this process.", stacklevel=3)
            return None
        if new:
            self._seen.add(key)
            log.info("step_lightning: the fused %s kernel for %s compiled in %.1f s.", self.name, key,
                     time.perf_counter() - start)
        return out
