"""Export the N:M model: weights with the zeros in place, a sparsity manifest, Hugging Face and translation folders.

``python -m step_lightning export --ckpt_path CKPT --output DIR`` (or :func:`export_checkpoint`; ``fit`` does it
at its end into ``<run>/export``) writes

* ``DIR/model.safetensors``: the LightningModule's ``state_dict`` with every masked weight multiplied by its
  mask, no pickle; the N:M manifest (``sparsity.json``'s content) is in its header, so ``python -m
  step_lightning verify DIR/model.safetensors`` (:func:`verify_nm`) proves from that file alone that every
  listed weight is N:M. Tied weights are stored once (:mod:`.safetensors_io`);
* ``DIR/model.pt``: the same ``state_dict`` as a ``torch.save`` pickle (``torch.load(..., weights_only=True)``);
* ``DIR/sparsity.json``: ``{"targets": {param_name: {"n", "m", "layout", "shape", "kept_fraction"}}, ...}``;
  every ``param_name`` is a key of both weight files;
* ``DIR/hf/`` for models holding a Hugging Face ``PreTrainedModel``: its ``save_pretrained`` output with the
  masked weights and the tokenizer, loadable by ``AutoModel...from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` without step_lightning;
* for translation models, ``DIR/sentencepiece.model`` and ``DIR/translation.json``, so that
  :func:`translate_from_export` translates from ``DIR`` alone;
* with ``--semi_structured`` (CUDA GPU of compute capability >= 8.0), ``DIR/semi_structured.json``: which 2:4
  ``nn.Linear`` weights convert to ``torch.sparse.SparseSemiStructuredTensor`` (converted and checked on the
  GPU); :func:`load_semi_structured` rebuilds a module with them and :func:`benchmark_semi_structured` times
  them against dense (:mod:`.semi_structured` says why the packed form itself is not saved).

Every target is checked to be N:M before anything is written.
"""

from step_lightning.export.core import ExportResult, export_checkpoint, export_model, load_for_export
from step_lightning.export.safetensors_io import load_safetensors, read_manifest, save_safetensors, verify_nm
from step_lightning.export.semi_structured import (
    benchmark_semi_structured,
    check_semi_structured,
    format_timings,
    load_semi_structured,
    plan_semi_structured,
    semi_structured_support,
)
from step_lightning.export.translation import translate_from_export

__all__ = [
    "ExportResult",
    "benchmark_semi_structured",
    "check_semi_structured",
    "export_checkpoint",
    "export_model",
    "format_timings",
    "load_for_export",
    "load_safetensors",
    "load_semi_structured",
    "plan_semi_structured",
    "read_manifest",
    "save_safetensors",
    "semi_structured_support",
    "translate_from_export",
    "verify_nm",
]
