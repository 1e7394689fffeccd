"""2:4 ``nn.Linear`` weights on NVIDIA sparse tensor cores: check at export, rebuild at load, time against dense.

The portable artefact is ``model.safetensors``: the N:M weights with their zeros, in any dtype, on any machine.
``torch.sparse.to_sparse_semi_structured`` packs a 2:4 weight into values plus metadata whose layout depends on
the backend (cuSPARSELt by default, CUTLASS when ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set), the
dtype and the torch version, and torch offers no way to load a saved packing back. So the packing is not
saved: ``export --semi_structured`` converts every eligible weight on the GPU once, checks that it unpacks to
the same values, and writes ``semi_structured.json`` (which weights convert, which do not and why);
:func:`load_semi_structured` rebuilds a module from ``model.safetensors`` with ``SparseSemiStructuredTensor``
weights (packing takes milliseconds per layer); :func:`benchmark_semi_structured` times each against its dense
copy.

Eligible: a 2:4 target of layout ``linear`` whose weight ``(out, in)`` is a multiple of the backend's minimum
sparse block for the dtype (cuSPARSELt fp16/bf16: 16x16; CUTLASS fp16/bf16: 32x64). Everything needs a CUDA
GPU of compute capability 8.0 or newer (A100, H100, ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from step_lightning.export.safetensors_io import format_table, load_safetensors, read_manifest

SEMI_STRUCTURED_FILE = "semi_structured.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def semi_structured_support(what: str = "`--semi_structured`") -> str | None:
    """``None`` if 2:4 semi-structured tensors can run here, else why not (for the user; ``what`` is named)."""
    if not torch.cuda.is_available():
        return (f"{what} runs 2:4 weights on NVIDIA sparse tensor cores and needs a CUDA GPU of compute capability "
                "8.0 or newer (A100, H100, ...); this machine has no CUDA GPU. model.safetensors holds the same N:M "
                "weights in dense format.")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return (f"{what} needs a CUDA GPU of compute capability 8.0 or newer for sparse tensor cores; "
                f"{torch.cuda.get_device_name()} has {major}.{minor}.")
    return None


def _backend() -> Any:
    """The ``SparseSemiStructuredTensor`` subclass ``to_sparse_semi_structured`` builds (its own rule)."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def _backend_name() -> str:
    return str(getattr(_backend(), "BACKEND", _backend().__name__))


@dataclass
class SemiStructuredLayer:
    """One N:M target and whether it runs as a ``SparseSemiStructuredTensor`` (``reason``: why not)."""

    name: str
    shape: list[int]
    converted: bool
    reason: str = ""


def plan_semi_structured(manifest: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> list[SemiStructuredLayer]:
    """Which targets of an export ``manifest`` can become ``SparseSemiStructuredTensor`` weights in ``dtype``.

    Pure bookkeeping (no GPU): 2:4, layout ``linear``, two dims, each a multiple of the current backend's
    minimum sparse block for ``dtype`` (``converted`` then means "eligible").

    Raises:
        ValueError: ``dtype`` is not float16 or bfloat16.
    """
    if dtype not in DTYPES.values():
        raise ValueError(f"semi-structured dtype must be torch.float16 or torch.bfloat16, got {dtype}.")
    backend = _backend()
    backend_name = _backend_name()
    limits = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    # torch keeps the table on the backend class; should a release move it, the strictest block (CUTLASS's).
    rows_min, cols_min = (limits.sparse_min_rows, limits.sparse_min_cols) if limits is not None else (32, 64)
    layers = []
    for name, spec in manifest.get("targets", {}).items():
        shape = list(spec["shape"])
        reason = ""
        if (spec["n"], spec["m"]) != (2, 4):
            reason = f"{spec['n']}:{spec['m']} (sparse tensor cores run 2:4 only)"
        elif spec["layout"] != "linear" or len(shape) != 2:
            reason = f"layout {spec['layout']!r} (only nn.Linear weights)"
        elif shape[0] % rows_min or shape[1] % cols_min:
            reason = f"shape {shape[0]}x{shape[1]} is not a multiple of {rows_min}x{cols_min} ({backend_name}, {dtype})"
        layers.append(SemiStructuredLayer(name, shape, not reason, reason))
    return layers


def _linear_of(module: nn.Module, weight_name: str) -> nn.Linear:
    owner_name, _, attr = weight_name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr != "weight" or not isinstance(owner, nn.Linear):
        raise ValueError(f"{weight_name!r} is not the weight of an nn.Linear in {type(module).__name__} "
                         f"(found {type(owner).__name__}); pass the module the export was written from.")
    return owner


def _sparsify(linear: nn.Linear, name: str) -> None:
    from torch.sparse import to_sparse_semi_structured

    dense = linear.weight.detach().contiguous()
    try:
        sparse = to_sparse_semi_structured(dense)
    except RuntimeError as err:
        raise RuntimeError(f"{name} (shape {tuple(dense.shape)}, {dense.dtype}) cannot be converted by "
                           f"torch.sparse.to_sparse_semi_structured ({_backend_name()}): {err} If cuSPARSELt is "
                           "missing from this torch build, set torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS "
                           "= True.") from None
    if not torch.equal(sparse.to_dense(), dense):
        raise ValueError(f"{name}: the 2:4 packing did not unpack to the same weight (not 2:4 along its rows?).")
    linear.weight = nn.Parameter(sparse, requires_grad=False)


def load_semi_structured(module: nn.Module, export_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                         prefix: str = "") -> list[SemiStructuredLayer]:
    """Load ``export_dir/model.safetensors`` into ``module`` on the GPU in ``dtype``, with every eligible 2:4
    ``nn.Linear`` weight a ``SparseSemiStructuredTensor``; for inference (those weights take no gradient).

    ``module`` is the architecture the export came from, built without its weights: the LightningModule (e.g.
    ``step_lightning.export.load_for_export(ckpt)[0]``), or its inner model with ``prefix`` the part of the
    exported names to drop (``"model."`` for the Hugging Face model of ``hf/``). The module is moved to
    ``cuda`` and ``dtype`` and put in ``eval()`` mode.

    Returns:
        One :class:`SemiStructuredLayer` per N:M target: converted, or why not.

    Raises:
        RuntimeError: no CUDA GPU of compute capability 8.0 or newer, or a conversion the backend refuses.
        ValueError: a bad ``dtype``, or a module whose names or shapes differ from the export.
    """
    if (why := semi_structured_support("load_semi_structured")) is not None:
        raise RuntimeError(why)
    path = Path(export_dir) / "model.safetensors"
    manifest = read_manifest(path)
    layers = plan_semi_structured(manifest, dtype)
    state = load_safetensors(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"load_semi_structured: {path} does not fit {type(module).__name__} (prefix={prefix!r}): "
                         f"{str(err).splitlines()[0]} ...") from None
    module.to(device="cuda", dtype=dtype).eval()
    for layer in layers:
        if layer.converted:
            if not layer.name.startswith(prefix):
                raise ValueError(f"load_semi_structured: target {layer.name!r} does not start with prefix {prefix!r}.")
            _sparsify(_linear_of(module, layer.name[len(prefix):]), layer.name)
    return layers


def check_semi_structured(state: dict[str, torch.Tensor], manifest: dict[str, Any], output: Path,
                          dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert each eligible 2:4 weight of ``state`` on the GPU (a round trip), write ``semi_structured.json``.

    What ``export --semi_structured`` runs: it proves that :func:`load_semi_structured` will work on this
    GPU and torch, and records which layers run sparse.
    """
    layers = plan_semi_structured(manifest, dtype)
    for layer in layers:
        if layer.converted:
            linear = nn.Linear(layer.shape[1], layer.shape[0], bias=False, device="cuda", dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(state[layer.name])
            _sparsify(linear, layer.name)
    path = output / SEMI_STRUCTURED_FILE
    path.write_text(json.dumps({
        "format": "step_lightning.semi_structured/1", "weights": "model.safetensors",
        "dtype": str(dtype).removeprefix("torch."), "backend": _backend_name(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "layers": [asdict(layer) for layer in layers],
        "load": "step_lightning.export.load_semi_structured(module, export_dir)"}, indent=2) + "\n")
    return path


@dataclass
class LinearTiming:
    """Median time of one ``F.linear`` over ``tokens`` inputs, dense and 2:4 sparse, in milliseconds."""

    name: str
    shape: tuple[int, int]
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def _linears_of_export(export_dir: Path, dtype: torch.dtype) -> list[tuple[str, nn.Linear]]:
    """One ``nn.Linear`` per eligible 2:4 weight of an export (with its bias if saved), sparsified."""
    path = export_dir / "model.safetensors"
    state = load_safetensors(path)
    linears = []
    for layer in plan_semi_structured(read_manifest(path), dtype):
        if layer.converted:
            bias = state.get(layer.name.removesuffix("weight") + "bias")
            linear = nn.Linear(layer.shape[1], layer.shape[0], bias=bias is not None, device="cuda", dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(state[layer.name])
                if bias is not None:
                    linear.bias.copy_(bias)
            _sparsify(linear, layer.name)
            linears.append((layer.name, linear))
    return linears


def benchmark_semi_structured(module_or_export_dir: nn.Module | str | Path, tokens: int = 4096,
                              dtype: torch.dtype = torch.bfloat16, min_run_time: float = 0.2) -> list[LinearTiming]:
    """Time every 2:4 ``SparseSemiStructuredTensor`` linear against its dense copy (``torch.utils.benchmark``,
    CUDA-synchronised, median of blocked runs) on ``tokens`` random input rows. A measurement, never a pass/fail.

    Args:
        module_or_export_dir: a module returned by :func:`load_semi_structured`, or an export folder (each
            eligible weight of its ``model.safetensors`` is timed as a standalone ``nn.Linear``).
        tokens: rows of the input (batch x sequence length): sparse tensor cores pay off on large matmuls.
        dtype: the dtype of export folders' layers and of the inputs.
        min_run_time: seconds each measurement runs at least.

    Raises:
        RuntimeError: no capable GPU.
        ValueError: nothing to time (no 2:4 semi-structured linear).
    """
    if (why := semi_structured_support("benchmark_semi_structured")) is not None:
        raise RuntimeError(why)
    from torch.sparse import SparseSemiStructuredTensor
    from torch.utils.benchmark import Timer

    if isinstance(module_or_export_dir, nn.Module):
        linears = [(n, m) for n, m in module_or_export_dir.named_modules()
                   if isinstance(m, nn.Linear) and isinstance(m.weight, SparseSemiStructuredTensor)]
    else:
        linears = _linears_of_export(Path(module_or_export_dir), dtype)
    if not linears:
        raise ValueError("benchmark_semi_structured: no nn.Linear with a SparseSemiStructuredTensor weight to time; "
                         "load the module with step_lightning.export.load_semi_structured, or pass an export folder "
                         "with 2:4 Linear targets.")
    timings = []
    with torch.inference_mode():
        for name, linear in linears:
            sparse = linear.weight
            x = torch.randn(tokens, linear.in_features, device=sparse.device, dtype=sparse.dtype)
            env = {"F": nn.functional, "x": x, "b": linear.bias, "dense": sparse.to_dense(), "sparse": sparse}
            dense_s = Timer("F.linear(x, dense, b)", globals=env).blocked_autorange(min_run_time=min_run_time).median
            sparse_s = Timer("F.linear(x, sparse, b)", globals=env).blocked_autorange(min_run_time=min_run_time).median
            timings.append(LinearTiming(name.removesuffix(".weight"), (linear.out_features, linear.in_features),
                                        dense_s * 1e3, sparse_s * 1e3))
    return timings


def format_timings(timings: list[LinearTiming], tokens: int | None = None) -> str:
    """The per-layer table ``layer, out x in, dense ms, 2:4 ms, speed-up``."""
    rows = [("layer", "out x in", "dense ms", "2:4 ms", "speed-up")]
    rows += [(t.name, f"{t.shape[0]}x{t.shape[1]}", f"{t.dense_ms:.4f}", f"{t.sparse_ms:.4f}", f"{t.speedup:.2f}x")
             for t in timings]
    head = f"F.linear on {tokens} input rows, {torch.cuda.get_device_name()}\n" if tokens else ""
    return head + format_table(rows)
