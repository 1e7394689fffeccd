"""Export the N:M model: weights with the zeros in place, a sparsity manifest, Hugging Face format.

``python -m step_lightning export --ckpt_path CKPT --output DIR`` writes

* ``DIR/model.pt``: the LightningModule's ``state_dict`` with every masked weight multiplied by its
  mask: plain tensors, ``torch.load(..., weights_only=True)`` reads it without step_lightning;
* ``DIR/sparsity.json``: ``{"targets": {param_name: {"n", "m", "layout", "kept_fraction"}}, ...}``;
  every ``param_name`` is a key of ``model.pt``;
* ``DIR/hf/`` for models holding a Hugging Face ``PreTrainedModel``: its ``save_pretrained`` output
  with the masked weights, loadable by ``AutoModel...from_pretrained`` without step_lightning;
* with ``--semi_structured`` (CUDA GPU with sparse tensor cores), ``DIR/semi_structured.pt``: the 2:4
  ``nn.Linear`` weights converted by ``torch.sparse.to_sparse_semi_structured``.

Every target is checked to be N:M before anything is written.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from step_lightning.callbacks.base import NMSparsityCallback, recipe_classes
from step_lightning.sparsity import check_nm_sparse


@dataclass
class ExportResult:
    output: Path
    files: list[Path]
    table: str


def semi_structured_support() -> str | None:
    """``None`` if 2:4 semi-structured conversion can run here, else why not (for the user)."""
    if not torch.cuda.is_available():
        return ("`--semi_structured` converts 2:4 weights for NVIDIA sparse tensor cores and needs a CUDA GPU of "
                "compute capability 8.0 or newer (A100, H100, ...); this machine has no CUDA GPU. Export without "
                "`--semi_structured`: model.pt holds the same N:M weights in dense format.")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return (f"`--semi_structured` needs compute capability >= 8.0 for sparse tensor cores; "
                f"{torch.cuda.get_device_name()} has {major}.{minor}. Export without `--semi_structured`.")
    return None


def _hf_submodule(pl_module: pl.LightningModule) -> tuple[str, Any] | None:
    for name, module in pl_module.named_modules():
        if name and callable(getattr(module, "save_pretrained", None)):
            return name, module
    return None


def export_model(pl_module: pl.LightningModule, recipe: NMSparsityCallback, output: str | Path,
                 semi_structured: bool = False, source: str | None = None) -> ExportResult:
    """Write the N:M form of ``pl_module`` (as defined by ``recipe``) to ``output``.

    Raises:
        ValueError: a target is not N:M (names the first bad group), or ``semi_structured`` is asked
            for where it cannot run (says why).
    """
    if semi_structured and (why := semi_structured_support()) is not None:
        raise ValueError(why)
    out = Path(output)
    state = recipe.masked_state_dict(pl_module)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    targets: dict[str, dict[str, Any]] = {}
    rows = [("weight", "shape", "layout", "N:M", "non-zero %")]
    for t in recipe.targets:
        weight = state[t.name]
        check_nm_sparse(weight, t.n, t.m, t.layout, name=t.name)
        kept = float((weight != 0).sum()) / weight.numel()
        targets[t.name] = {"n": t.n, "m": t.m, "layout": t.layout, "shape": list(weight.shape),
                           "kept_fraction": round(kept, 6)}
        rows.append((t.name, "x".join(map(str, weight.shape)), t.layout, f"{t.n}:{t.m}", f"{100 * kept:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "model.pt", out / "sparsity.json"]
    torch.save(state, files[0])
    manifest = {
        "format": "step_lightning.export/1",
        "recipe": type(recipe).__name__,
        "source": source,
        "n": recipe.n,
        "m": recipe.m,
        "targets": targets,
        "masked_entries": sum(state[t].numel() for t in targets),
        "kept_entries": sum(int((state[t] != 0).sum()) for t in targets),
    }
    files[1].write_text(json.dumps(manifest, indent=2) + "\n")

    hf = _hf_submodule(pl_module)
    if hf is not None:
        prefix, module = hf
        sub_state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        module.save_pretrained(out / "hf", state_dict=sub_state)
        files.append(out / "hf")

    if semi_structured:
        from torch.sparse import to_sparse_semi_structured

        converted = {}
        for t in recipe.targets:
            if t.layout == "linear" and (t.n, t.m) == (2, 4):
                dense = state[t.name].to("cuda", torch.float16)
                try:
                    sparse = to_sparse_semi_structured(dense)
                except RuntimeError as err:
                    raise RuntimeError(f"`--semi_structured`: {t.name} (shape {tuple(dense.shape)}) cannot be "
                                       f"converted by to_sparse_semi_structured: {err}") from None
                if not torch.equal(sparse.to_dense(), dense):
                    raise ValueError(f"Semi-structured conversion of {t.name} did not round-trip.")
                converted[t.name] = {"packed": sparse.packed.cpu(), "meta": sparse.meta.cpu(),
                                     "shape": list(dense.shape)}
        torch.save(converted, out / "semi_structured.pt")
        files.append(out / "semi_structured.pt")
    return ExportResult(out, files, table)


def load_for_export(ckpt_path: str | Path) -> tuple[pl.LightningModule, NMSparsityCallback]:
    """Rebuild the LightningModule and its recipe callback from a checkpoint written by the CLI.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ValueError: the checkpoint is unreadable, does not record its model class, or has no recipe.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"`--ckpt_path` {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated / not a checkpoint: say so instead of a pickle traceback
        raise ValueError(f"`--ckpt_path` {str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err}).") \
            from None
    hparams = checkpoint.get("hyper_parameters", {})
    if "_instantiator" not in hparams:
        raise ValueError(f"`--ckpt_path` {str(path)!r} does not record which LightningModule wrote it (it was not "
                         "saved by `python -m step_lightning fit`); build the model yourself and call "
                         "step_lightning.export.export_model(model, recipe, output).")
    recipe_keys = [k for k in checkpoint.get("callbacks", {}) if k.split("{")[0] in recipe_classes()]
    if not recipe_keys:
        raise ValueError(f"`--ckpt_path` {str(path)!r} holds no N:M recipe state (trained dense?): nothing to "
                         "export as N:M. Train with STEPCallback, SRSTECallback or ASPCallback.")
    state = checkpoint["callbacks"][recipe_keys[0]]
    cls = recipe_classes()[recipe_keys[0].split("{")[0]]
    class_path = hparams.get("_class_path")
    if isinstance(class_path, str) and class_path.startswith("step_lightning.models."):
        # Lightning instantiates only classes already imported; step_lightning.models imports a family on first use.
        getattr(importlib.import_module(class_path.rpartition(".")[0]), class_path.rpartition(".")[2], None)

    try:
        model = pl.LightningModule.load_from_checkpoint(path, map_location="cpu")
    except ValueError as err:
        raise ValueError(f"`--ckpt_path` {str(path)!r} was written by {hparams.get('_class_path', 'a model')!r}, which "
                         f"is not a step_lightning model: {err} Build that model yourself and call "
                         "step_lightning.export.export_model(model, recipe, output).") from None
    include = [f"^{re.escape(name)}$" for name in state["targets"]]
    recipe = cls(n=state["n"], m=state["m"], include=include)
    recipe.attach(model)
    recipe.load_state_dict(state)
    return model, recipe


def export_checkpoint(ckpt_path: str | Path, output: str | Path, semi_structured: bool = False) -> ExportResult:
    """Load ``ckpt_path`` and :func:`export_model` its N:M form to ``output``."""
    if semi_structured and (why := semi_structured_support()) is not None:
        raise ValueError(why)
    model, recipe = load_for_export(ckpt_path)
    return export_model(model, recipe, output, semi_structured=semi_structured, source=str(ckpt_path))
