"""``model.safetensors``: the exported weights without pickle, the N:M manifest in the header, and its proof.

The file is a plain safetensors file (``safetensors.torch.load_file`` reads it without step_lightning). Its
header metadata (safetensors metadata maps strings to strings, so the values are JSON) holds:

* ``format``: ``"pt"`` (what Hugging Face's loaders expect of a PyTorch safetensors file);
* ``step_lightning.manifest``: the content of ``sparsity.json`` (which weights are N:M, ``n``, ``m``, the
  grouping ``layout``, shape and kept fraction of each);
* ``step_lightning.aliases``: ``{name: stored_name}`` for tied weights. safetensors refuses tensors that share
  memory, so a tied weight (e.g. an output projection tied to the embedding) is stored once and its other
  names are listed here; :func:`load_safetensors` gives every name back, tied again.

:func:`verify_nm` proves from the file alone that every weight the manifest lists is N:M (a group-by-group
count of non-zeros, :func:`~step_lightning.sparsity.check_nm_sparse`); ``python -m step_lightning verify
FILE`` runs it from the shell.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from step_lightning.sparsity import check_nm_sparse

MANIFEST_KEY = "step_lightning.manifest"
ALIASES_KEY = "step_lightning.aliases"
LAYOUTS = ("linear", "conv", "conv1d_hf")


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that are the same memory viewed the same way (tied weights)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype)


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` with ``manifest`` (and the tied-weight aliases) in the header metadata.

    Tensors that are the same memory (tied weights) are stored once, under the first name in ``state`` order
    unless another of their names is an N:M target (then under the target's name): the same rule as
    ``safetensors.torch.save_model``, with the choice recorded instead of guessed at load. A tensor that
    overlaps another only in part is copied.
    """
    targets = set(manifest.get("targets", {}))
    by_storage: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault(storage_key(tensor) if tensor.numel() else ("empty", name), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_storage: set[int] = set()
    for names in by_storage.values():
        kept = next((n for n in names if n in targets), names[0])
        tensor = state[kept]
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        # A view into memory already stored under another name (not the same tensor): store a copy.
        tensors[kept] = tensor.clone().contiguous() if ptr in seen_storage else tensor.contiguous()
        if ptr is not None:
            seen_storage.add(ptr)
        aliases.update({n: kept for n in names if n != kept})
    from safetensors.torch import save_file

    metadata = {"format": "pt", MANIFEST_KEY: json.dumps(dict(manifest), sort_keys=True),
                ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The N:M manifest stored in the header of ``path`` (the content of ``sparsity.json``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``path`` is not a safetensors file, or one without a step_lightning manifest.
    """
    return _header(path)[0]


def _header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected model.safetensors written by `export`).")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError for a truncated or foreign file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}).") from None
    if MANIFEST_KEY not in metadata:
        raise ValueError(f"{str(path)!r} has no {MANIFEST_KEY!r} in its metadata: it was not written by "
                         "step_lightning's `export`, so nothing says which weights are N:M.")
    try:
        manifest, aliases = json.loads(metadata[MANIFEST_KEY]), json.loads(metadata.get(ALIASES_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r}: the metadata {MANIFEST_KEY!r} or {ALIASES_KEY!r} is not JSON ({err}).") \
            from None
    return manifest, aliases


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` by its ``state_dict`` name, tied weights given back under all their names (one
    tensor object), ready for ``module.load_state_dict``."""
    from safetensors.torch import load_file

    _, aliases = _header(path)
    state = load_file(str(path), device=str(device))
    for name, stored in aliases.items():
        state[name] = state[stored]
    return state


def verify_nm(path: str | Path) -> list[tuple[str, ...]]:
    """Prove from the file alone that every weight listed in the manifest of ``path`` is N:M.

    For each target in the header's manifest, the stored tensor must exist, have the recorded shape, and hold
    at most ``n`` non-zeros in every group of ``m`` along the reduction axis of its ``layout``; the recorded
    ``kept_fraction`` must match. Only the file is read: it needs no checkpoint, model class or
    step_lightning state, so a tampered weight or manifest is caught.

    Returns:
        The per-weight table rows ``(weight, shape, layout, "n:m", non-zero %)``, a header row first.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a step_lightning safetensors export, or a weight that is missing, reshaped or not N:M
            (the message names it and, for N:M, the first bad group).

    Example::

        python -m step_lightning verify out/model.safetensors
    """
    from safetensors import safe_open

    manifest, aliases = _header(path)
    targets = manifest.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise ValueError(f"{str(path)!r}: the manifest lists no N:M targets, so there is nothing to verify.")
    rows: list[tuple[str, ...]] = [("weight", "shape", "layout", "N:M", "non-zero %")]
    with safe_open(str(path), framework="pt") as file:
        stored = set(file.keys())
        for name, spec in targets.items():
            key = aliases.get(name, name)
            if key not in stored:
                raise ValueError(f"{str(path)!r}: the manifest lists {name!r} as N:M but the file holds no such "
                                 "tensor.")
            n, m, layout = spec.get("n"), spec.get("m"), spec.get("layout")
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m) or layout not in LAYOUTS:
                raise ValueError(f"{str(path)!r}: the manifest entry of {name!r} is not a valid N:M spec: n={n!r}, "
                                 f"m={m!r}, layout={layout!r} (need 0 < n < m and a layout in {LAYOUTS}).")
            weight = file.get_tensor(key)
            if list(weight.shape) != list(spec.get("shape", weight.shape)):
                raise ValueError(f"{str(path)!r}: {name!r} has shape {tuple(weight.shape)}, the manifest says "
                                 f"{tuple(spec['shape'])}.")
            try:
                check_nm_sparse(weight, n, m, layout, name=name)
            except ValueError as err:
                raise ValueError(f"{str(path)!r}: {err}") from None
            kept = float((weight != 0).sum()) / max(weight.numel(), 1)
            if "kept_fraction" in spec and abs(kept - float(spec["kept_fraction"])) > 1e-5:
                raise ValueError(f"{str(path)!r}: {name!r} keeps {kept:.6f} of its entries, the manifest says "
                                 f"{spec['kept_fraction']}.")
            rows.append((name, "x".join(map(str, weight.shape)), layout, f"{n}:{m}", f"{100 * kept:.1f}"))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
