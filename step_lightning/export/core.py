"""The N:M export: ``export_model`` (from a LightningModule) and ``export_checkpoint`` (from a ``fit`` checkpoint).

What is written is listed in :mod:`step_lightning.export`. Every target is checked to be N:M before anything is
written.
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
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from step_lightning.callbacks.base import NMSparsityCallback, recipe_classes
from step_lightning.export.safetensors_io import format_table, save_safetensors, storage_key
from step_lightning.export.semi_structured import check_semi_structured, semi_structured_support
from step_lightning.sparsity import check_nm_sparse


@dataclass
class ExportResult:
    output: Path
    files: list[Path]
    table: str


def _hf_submodule(pl_module: pl.LightningModule) -> tuple[str, Any] | None:
    for name, module in pl_module.named_modules():
        if name and callable(getattr(module, "save_pretrained", None)):
            return name, module
    return None


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` detached on the CPU, tied tensors still one tensor (one copy each, not one per name), so that
    ``model.safetensors`` stores them once."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        key = storage_key(tensor) if tensor.numel() else ("empty", name)
        if key not in copies:
            copies[key] = tensor.detach().cpu().contiguous()
        out[name] = copies[key]
    return out


def export_model(pl_module: pl.LightningModule, recipe: NMSparsityCallback, output: str | Path,
                 semi_structured: bool = False, source: str | None = None) -> ExportResult:
    """Write the N:M form of ``pl_module`` (as defined by ``recipe``) to ``output``.

    Besides the weights (``model.safetensors``, ``model.pt``) and ``sparsity.json``: ``hf/`` with the tokenizer
    for a model holding a Hugging Face ``PreTrainedModel``; whatever ``pl_module.export_artifacts(output)``
    writes, if the model defines it (the translation model: its SentencePiece model and config); with
    ``semi_structured``, ``semi_structured.json`` (:func:`~step_lightning.export.check_semi_structured`).

    Raises:
        ValueError: a target is not N:M (names the first bad group), or ``semi_structured`` is asked
            for where it cannot run (says why).
    """
    if semi_structured and (why := semi_structured_support()) is not None:
        raise ValueError(why)
    out = Path(output)
    state = _to_cpu(recipe.masked_state_dict(pl_module))
    targets: dict[str, dict[str, Any]] = {}
    rows = [("weight", "shape", "layout", "N:M", "non-zero %")]
    for t in recipe.targets:
        weight = state[t.name]
        check_nm_sparse(weight, t.n, t.m, t.layout, name=t.name)
        kept = float((weight != 0).sum()) / weight.numel()
        targets[t.name] = {"n": t.n, "m": t.m, "layout": t.layout, "shape": list(weight.shape),
                           "kept_fraction": round(kept, 6)}
        rows.append((t.name, "x".join(map(str, weight.shape)), t.layout, f"{t.n}:{t.m}", f"{100 * kept:.1f}"))
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

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "model.pt", out / "sparsity.json"]
    torch.save(state, files[0])
    files[1].write_text(json.dumps(manifest, indent=2) + "\n")
    files.append(save_safetensors(state, out / "model.safetensors", manifest))

    hf = _hf_submodule(pl_module)
    if hf is not None:
        prefix, module = hf
        sub_state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        module.save_pretrained(out / "hf", state_dict=sub_state)
        _save_tokenizer(pl_module, out / "hf")
        files.append(out / "hf")
    export_artifacts = getattr(pl_module, "export_artifacts", None)
    if callable(export_artifacts):
        files += export_artifacts(out)

    if semi_structured:
        files.append(check_semi_structured(state, manifest, out))
    return ExportResult(out, files, format_table(rows))


def _save_tokenizer(pl_module: pl.LightningModule, folder: Path) -> None:
    """The tokenizer of the model's ``model_name_or_path`` into ``folder``, beside its weights (Hugging Face's
    layout: ``AutoTokenizer.from_pretrained(folder)`` loads it). Training tokenised with the same path (the CLI
    links ``--data.model_name_or_path`` to the model's). If it cannot be loaded here, the export goes on
    without it and says so."""
    name = pl_module.hparams.get("model_name_or_path")
    if not name:
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        rank_zero_warn(f"export: {folder} has no tokenizer: none could be loaded from model_name_or_path={name!r} "
                       f"({type(err).__name__}: {err}). Save it there with tokenizer.save_pretrained({str(folder)!r}).")
        return
    tokenizer.save_pretrained(folder)


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
