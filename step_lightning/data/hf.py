"""Helpers shared by the Hugging Face data modules (GLUE, WikiText): what identifies a tokenizer, the
model's context length."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes the token ids it produces.

    Its class, ``name_or_path``, vocabulary sizes and, for fast tokenizers, the serialised backend (vocabulary,
    normaliser, pre-tokeniser, post-processor; without the truncation/padding state that calling it changes);
    for slow tokenizers, the files ``save_pretrained`` writes.
    """
    digest = hashlib.sha256()
    cls = type(tokenizer)
    for part in (f"{cls.__module__}.{cls.__qualname__}", tokenizer.name_or_path, str(tokenizer.vocab_size),
                 str(len(tokenizer))):
        digest.update(part.encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for file in sorted(Path(tmp).rglob("*")):
                if file.is_file():
                    digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def model_context(model_name_or_path: str) -> tuple[int | None, int | None]:
    """``(positions, vocab_size)`` of the model's config (``n_positions`` or ``max_position_embeddings``).

    ``(None, None)`` when no config can be read (e.g. a tokenizer-only path).
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        return None, None
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return positions, getattr(config, "vocab_size", None)
