"""The joint SentencePiece model of a WMT pair: training it, the cache key that names it, loading it in fairseq2.

The model is trained once per corpus and ``vocab_size`` and saved as ``spm-<vocab_size>-<key>.model``; the key
covers the training files' contents (:func:`file_key`), so a copy of the corpus elsewhere finds the same model.
It is loaded as fairseq2's NLLB tokenizer, which adds one ``__<lang>__`` symbol per language and four others
(:data:`NLLB_EXTRA_SYMBOLS`). ``sentencepiece`` and fairseq2 are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from step_lightning._fairseq2 import import_fairseq2

# Symbols that fairseq2's NLLB tokenizer adds to the SentencePiece vocabulary besides one `__lang__` per
# language: <MINED_DATA>, <MMT_BT_DATA>, <SMT_BT_DATA> and <pad> (inserted at index 0).
NLLB_EXTRA_SYMBOLS = 4
# Bumped whenever the SentencePiece training options change, so old models are not reused.
SPM_FORMAT = 1


def nllb_vocab_size(vocab_size: int, num_langs: int = 2) -> int:
    """Size of the NLLB tokenizer's vocabulary over a SentencePiece model of ``vocab_size`` pieces."""
    return vocab_size + num_langs + NLLB_EXTRA_SYMBOLS


def spm_model_path(folder: Path, vocab_size: int, train_files: list[Path]) -> Path:
    """Where the model of ``vocab_size`` pieces trained on ``train_files`` is saved under ``folder``."""
    key = hashlib.sha256(f"{SPM_FORMAT}\n{vocab_size}\n{file_key(train_files)}".encode()).hexdigest()
    return folder / f"spm-{vocab_size}-{key[:16]}.model"


def file_key(paths: list[Path], sample: int = 1 << 20) -> str:
    """A key of the files' contents: sizes and the SHA-256 of their first and last MiB. Not their paths or times,
    so a copy of the corpus elsewhere (another node's disk, another mount point) finds the same model."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{size}\n".encode())
        with open(path, "rb") as file:
            digest.update(file.read(sample))
            file.seek(max(size - sample, 0))
            digest.update(file.read(sample))
    return digest.hexdigest()


def train_sentencepiece(inputs: list[Path], model_path: Path, vocab_size: int, max_sentences: int = 10_000_000,
                        seed: int = 0) -> Path:
    """Train a joint unigram SentencePiece model on ``inputs`` and write it to ``model_path`` (atomically).

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 and no ``<pad>`` (fairseq2's NLLB tokenizer inserts it at 0).
    ``max_sentences`` caps the sentences sampled for training (SentencePiece's ``input_sentence_size``).
    """
    import sentencepiece as spm

    if hasattr(spm, "set_random_generator_seed"):  # the sampling of `input_sentence_size` sentences
        spm.set_random_generator_seed(seed)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_path.stem}-", dir=model_path.parent))
    try:
        spm.SentencePieceTrainer.train(
            input=[os.fspath(p) for p in inputs], model_prefix=os.fspath(tmp / "spm"), vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            minloglevel=2, num_threads=max(1, min(16, os.cpu_count() or 1)))
        os.replace(tmp / "spm.model", model_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_path


def load_tokenizer(path: Path, src_lang: str, tgt_lang: str, vocab_size: int) -> Any:
    """fairseq2's NLLB tokenizer over the SentencePiece model at ``path`` (languages ``src_lang``, ``tgt_lang``).

    Raises:
        RuntimeError: no model at ``path``, or one whose vocabulary is not ``vocab_size`` pieces.
    """
    if not path.is_file():
        raise RuntimeError(f"WMTDataModule: no SentencePiece model at {path}; call prepare_data() first (the "
                           "Trainer does).")
    nllb = import_fairseq2("fairseq2.models.nllb")
    tokenizer = nllb.load_nllb_tokenizer(path, nllb.NllbTokenizerConfig(langs=[src_lang, tgt_lang],
                                                                        default_lang=tgt_lang))
    size, expected = tokenizer.vocab_info.size, nllb_vocab_size(vocab_size)
    if size != expected:
        raise RuntimeError(f"WMTDataModule: the tokenizer from {path} has {size} tokens, expected "
                           f"{expected} (`--data.vocab_size` + 6).")
    return tokenizer
