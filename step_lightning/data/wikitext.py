"""WikiText-2 / WikiText-103 for causal language modelling: tokenised once, cut into fixed-length blocks."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from step_lightning.checks import IntAtLeast2, NonEmptyStr, NonNegativeInt, PositiveInt, check_arguments
from step_lightning.data.hf import model_context, tokenizer_fingerprint
from step_lightning.data.loading import global_seed, stateful_loader
from step_lightning.files import write_atomically

Variant = Literal["wikitext-2", "wikitext-103"]
VARIANTS: tuple[str, ...] = ("wikitext-2", "wikitext-103")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
HF_DATASET = "Salesforce/wikitext"  # the Hub id of "wikitext"; its configs are "<variant>-raw-v1"
_HF_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
# `predict` reads `predict_file` (prompts), not WikiText.
_STAGE_SPLITS = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ()}
_CACHE_VERSION = 1
_PIECE_CHARS = 1 << 20  # characters per tokenizer call: bounds memory on WikiText-103's 540 MB training file
_PIECES_PER_BATCH = 8  # pieces per batched call (fast tokenizers encode a batch on several threads)


def raw_files(data_dir: str | Path, variant: str) -> dict[str, Path]:
    """The ``wiki.{train,valid,test}.raw`` files of ``variant`` under ``data_dir`` or ``data_dir/<variant>-raw/``.

    Raises:
        FileNotFoundError: neither folder holds all three files; the message lists every path looked for.
    """
    root = Path(data_dir)
    folders = [root, root / f"{variant}-raw"]
    for folder in folders:
        files = {split: folder / f"wiki.{split}.raw" for split in SPLITS}
        if all(path.is_file() for path in files.values()):
            return files
    looked = [str(folder / f"wiki.{split}.raw") for folder in folders for split in SPLITS]
    raise FileNotFoundError(
        f"WikiTextDataModule: `--data.data_dir`={str(data_dir)!r} does not hold the raw {variant} files "
        f"(`--data.variant`={variant!r}); looked for {looked}. Extract the official {variant}-raw-v1.zip there "
        "(its wiki.train.raw, wiki.valid.raw, wiki.test.raw), or set `--data.data_dir` to null to download "
        "with Hugging Face datasets."
    )


def _safe_cut(text: str) -> int:
    # Last position after a non-space character and before a space: byte-level BPE (GPT-2's pre-tokenizer
    # regex) and Metaspace(prepend_scheme="first") never build a token across it, so tokenising the two sides
    # separately gives the same ids as tokenising the whole. A normaliser that prepends "▁" to every call
    # (Llama-2 style) adds one token per ~1 MB piece: negligible, but not identical.
    i = len(text) - 1
    while i > 0:
        if text[i].isspace() and not text[i - 1].isspace():
            return i
        i -= 1
    return 0


def text_pieces(lines: Iterable[str], piece_chars: int | None = None) -> Iterator[str]:
    """The concatenation of ``lines`` (newlines kept) in pieces of about ``piece_chars`` characters (default 1M).

    Each cut falls between a non-space and a whitespace character, so tokenising the pieces one by one and
    concatenating the ids matches tokenising the whole text at once (for GPT-2-style byte-level BPE).
    """
    piece_chars = piece_chars or _PIECE_CHARS
    buffer: list[str] = []
    size = 0
    for line in lines:
        if not line:
            continue
        buffer.append(line)
        size += len(line)
        if size >= piece_chars:
            text = "".join(buffer)
            cut = _safe_cut(text)
            if cut > 0:
                yield text[:cut]
                text = text[cut:]
            buffer, size = [text], len(text)
    text = "".join(buffer)
    if text:
        yield text


def tokenize_lines(tokenizer: Any, lines: Iterable[str], piece_chars: int | None = None) -> np.ndarray:
    """Token ids of the concatenated ``lines``, without special tokens, as a 1-D ``uint16``/``int32`` array."""
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    arrays: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        # verbose=False: the "longer than the model's maximum length" warning does not apply, blocks are cut later.
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            arrays.append(np.asarray(ids, dtype=np.int64).astype(dtype))
        batch.clear()

    for piece in text_pieces(lines, piece_chars):
        batch.append(piece)
        if len(batch) == _PIECES_PER_BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def to_blocks(ids: np.ndarray, block_size: int) -> np.ndarray:
    """``ids`` cut into rows of ``block_size`` tokens, ``(len(ids) // block_size, block_size)``; the rest dropped."""
    n = len(ids) // block_size
    return np.ascontiguousarray(ids[: n * block_size].reshape(n, block_size))


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": the text as written, "\r\n" included
        for line in f:
            # As the Hugging Face builder stores them: whitespace-only lines are empty, so the raw files and
            # the Hub give the same token stream.
            yield line if line.strip() else ""


class TokenBlocks(Dataset):
    """Rows of a ``(num_blocks, block_size)`` ``.npy`` file as ``{"input_ids", "labels"}`` int64 tensors.

    The file is memory-mapped on first access in each process (workers open their own map, nothing large is
    pickled). ``labels`` is ``input_ids``: Hugging Face causal LMs shift them inside the loss.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._blocks: np.ndarray | None = None
        self._len = int(np.load(self.path, mmap_mode="r").shape[0])

    @property
    def blocks(self) -> np.ndarray:
        if self._blocks is None:
            self._blocks = np.load(self.path, mmap_mode="r")
        return self._blocks

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_blocks": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[index].astype(np.int64))
        return {"input_ids": ids, "labels": ids}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[np.asarray(indices)].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def _prompt_batch(batch: list[tuple[int, str]]) -> dict[str, list[Any]]:
    return {"index": [index for index, _ in batch], "prompt": [prompt for _, prompt in batch]}


def _identity(batch: Any) -> Any:
    return batch


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "step_lightning" / "wikitext"


class WikiTextDataModule(pl.LightningDataModule):
    """WikiText-2 or WikiText-103 (raw, i.e. untokenised text) as blocks of ``block_size`` tokens.

    The text of a split is concatenated (newlines kept), tokenised with the model's tokenizer
    (``AutoTokenizer.from_pretrained(model_name_or_path)``, no special tokens added) and cut into blocks of
    exactly ``block_size`` tokens; the remainder is dropped. A batch is ``{"input_ids", "labels"}``, both
    ``(batch, block_size)``, the labels equal to the inputs (the model shifts them). ``val`` is the valid
    split, ``test`` the test split; loaders are ``torchdata``'s ``StatefulDataLoader`` (the training one
    shuffles), which Lightning checkpoints, so a run resumes mid-epoch.

    ``prepare_data`` (one process per node) tokenises each split once into ``cache_dir``, as ``.npy`` files
    named by a hash of the tokenizer (name or path, class, vocabulary size, its JSON), the variant,
    ``block_size`` and the source; ``setup`` memory-maps them. Where the text comes from:

    * ``data_dir=None``: Hugging Face ``datasets`` (``load_dataset("Salesforce/wikitext", "<variant>-raw-v1")``,
      the Hub's ``wikitext``), downloaded in ``prepare_data`` only.
    * ``data_dir`` set: the files of the official distribution, ``wiki.train.raw``, ``wiki.valid.raw`` and
      ``wiki.test.raw``, in ``data_dir`` or in ``data_dir/wikitext-2-raw/`` (``wikitext-103-raw/``), as the
      official zip extracts; fully offline.

    Args:
        variant: ``"wikitext-2"`` (2M training tokens) or ``"wikitext-103"`` (103M).
        model_name_or_path: the tokenizer: a Hub name or a local directory (the model's own, normally).
        data_dir: folder of the raw files; ``None``: Hugging Face ``datasets``.
        block_size: tokens per block (the training context); at most the model's ``n_positions`` /
            ``max_position_embeddings``.
        batch_size: training blocks per batch (per process under DDP).
        eval_batch_size: validation and test blocks per batch; ``None``: ``batch_size``.
        num_workers: loader worker processes.
        cache_dir: where the tokenised blocks are kept; ``None``: ``$XDG_CACHE_HOME/step_lightning/wikitext``
            (``~/.cache/...``).
        seed: seed of the training order under DDP (a ``DistributedSampler``, so a resumed run sees the
            batches of an uninterrupted one); default: the run's ``seed_everything`` seed.
        predict_file: prompts for ``predict`` to continue, one per line (UTF-8; empty lines are kept as empty
            prompts, so output row ``i`` is line ``i``); batches of ``eval_batch_size`` ``{"index", "prompt"}``.
            ``predict`` needs it and reads no WikiText.

    Raises:
        ValueError: an invalid argument, a ``block_size`` larger than the model's context, or a split
            shorter than one block.
        FileNotFoundError: ``data_dir`` without the raw files.

    Example::

        data:
          class_path: step_lightning.data.WikiTextDataModule
          init_args: {variant: wikitext-103, model_name_or_path: gpt2, block_size: 1024, batch_size: 8}
    """

    def __init__(
        self,
        variant: Variant = "wikitext-2",
        model_name_or_path: NonEmptyStr = "gpt2",
        data_dir: str | None = None,
        block_size: IntAtLeast2 = 512,
        batch_size: PositiveInt = 8,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
        cache_dir: str | None = None,
        seed: int | None = None,
        predict_file: str | None = None,
    ) -> None:
        super().__init__()
        check_arguments(WikiTextDataModule, locals(), flag="--data.{}")
        self.save_hyperparameters()
        self.variant = variant
        self.model_name_or_path = model_name_or_path
        self.data_dir = data_dir
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self.seed = seed
        self.predict_file = predict_file
        self.datasets: dict[str, TokenBlocks] = {}
        self._tokenizer: Any = None

    # ---- tokenizer and cache -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The ``AutoTokenizer`` of ``model_name_or_path`` (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
            except (OSError, ValueError) as err:
                raise RuntimeError(
                    f"WikiTextDataModule: cannot load the tokenizer of `--data.model_name_or_path`="
                    f"{self.model_name_or_path!r} ({type(err).__name__}: {err}); pass a Hugging Face model name "
                    "(downloaded once) or a local directory saved with `save_pretrained`."
                ) from err
        return self._tokenizer

    def _source(self, split: str) -> dict[str, Any]:
        if self.data_dir is None:
            return {"hf": HF_DATASET, "config": f"{self.variant}-raw-v1", "split": _HF_SPLIT[split]}
        path = raw_files(self.data_dir, self.variant)[split].resolve()
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def cache_path(self, split: str) -> Path:
        """The ``.npy`` file of ``split``'s blocks for this tokenizer, variant, ``block_size`` and source."""
        key = {"version": _CACHE_VERSION, "tokenizer": tokenizer_fingerprint(self.tokenizer),
               "variant": self.variant, "block_size": self.block_size, "source": self._source(split)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
        return self.cache_dir / f"{self.variant}-{split}-block{self.block_size}-{digest}.npy"

    def _split_lines(self, split: str, hf: Any) -> Iterator[str]:
        if hf is None:
            yield from _read_lines(raw_files(self.data_dir, self.variant)[split])  # type: ignore[arg-type]
            return
        for rows in hf[_HF_SPLIT[split]].iter(batch_size=10_000):
            yield from rows["text"]

    def _load_hf(self) -> Any:
        config = f"{self.variant}-raw-v1"
        try:
            import datasets
        except ImportError as err:
            raise RuntimeError("WikiTextDataModule: `--data.data_dir` is null, which reads WikiText with Hugging Face "
                               "`datasets`, and that package is not installed: `pip install datasets`, or set "
                               "`--data.data_dir` to a folder with the raw files.") from err
        try:
            return datasets.load_dataset(HF_DATASET, config)
        except Exception as err:  # offline, proxy, hub errors...
            raise RuntimeError(
                f"WikiTextDataModule: loading {HF_DATASET!r} ({config}) with Hugging Face datasets failed "
                f"({type(err).__name__}: {err}). Offline, set `--data.data_dir` to a folder holding wiki.train.raw, "
                "wiki.valid.raw and wiki.test.raw (the official raw zip)."
            ) from err

    def _predicting(self) -> bool:
        return self.trainer is not None and self.trainer.predicting

    @override
    def prepare_data(self) -> None:
        if self._predicting():  # prompts only: no WikiText to read or tokenise
            if self.predict_file is not None and not Path(self.predict_file).is_file():
                raise FileNotFoundError(f"WikiTextDataModule: `--data.predict_file`={self.predict_file!r} does not "
                                        "exist (the prompts to continue, one per line).")
            return
        todo = [split for split in SPLITS if not self.cache_path(split).is_file()]
        if not todo:
            return
        self._check_model()  # a block_size the model cannot take fails now, not after tokenising WikiText-103
        hf = self._load_hf() if self.data_dir is None else None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for split in todo:
            path = self.cache_path(split)
            rank_zero_info(f"WikiTextDataModule: tokenising the {split} split of {self.variant} into {path}")
            ids = tokenize_lines(self.tokenizer, self._split_lines(split, hf))
            if len(ids) < self.block_size:
                raise ValueError(f"WikiTextDataModule: the {split} split of {self.variant} has {len(ids)} tokens, "
                                 f"fewer than one block of `--data.block_size`={self.block_size}; lower it.")
            # Nodes sharing a filesystem may run this at once: a reader never sees half a file.
            blocks = to_blocks(ids, self.block_size)
            write_atomically(path, lambda f, blocks=blocks: np.save(f, blocks))

    @override
    def setup(self, stage: str) -> None:
        self._check_model()
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            if split in self.datasets:
                continue
            path = self.cache_path(split)
            if not path.is_file():
                raise RuntimeError(f"WikiTextDataModule: the tokenised {split} split is not in `--data.cache_dir` "
                                   f"({path}); call prepare_data() first (the Trainer does, once per node unless "
                                   "`prepare_data_per_node` is off and the cache is not shared).")
            self.datasets[split] = TokenBlocks(path)

    def _check_model(self) -> None:
        positions, vocab_size = model_context(self.model_name_or_path)
        if positions is not None and self.block_size > positions:
            raise ValueError(f"WikiTextDataModule: `--data.block_size`={self.block_size} exceeds the "
                             f"{positions} positions of `--data.model_name_or_path`={self.model_name_or_path!r}; "
                             f"use a `--data.block_size` <= {positions}.")
        if vocab_size is not None and len(self.tokenizer) > vocab_size:
            raise ValueError(f"WikiTextDataModule: the tokenizer of `--data.model_name_or_path`="
                             f"{self.model_name_or_path!r} has {len(self.tokenizer)} tokens, more than the model's "
                             f"vocab_size {vocab_size}; the tokenizer and the model do not belong together.")

    # ---- loaders -----------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"WikiTextDataModule: call setup() before asking for the {split} loader.")
        return stateful_loader(self.datasets[split], self.trainer, batch_size, shuffle, global_seed(self.seed),
                                num_workers=self.num_workers, collate_fn=_identity)

    @override
    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("valid", self.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> StatefulDataLoader:
        """The prompts of ``predict_file`` as ``{"index", "prompt"}`` batches, in file order."""
        if self.predict_file is None:
            raise ValueError("WikiTextDataModule: `predict` continues prompts and WikiText has none; give a file of "
                             "prompts, one per line, with `--data.init_args.predict_file PATH`.")
        lines = Path(self.predict_file).read_text(encoding="utf-8").splitlines()
        return stateful_loader(list(enumerate(lines)), self.trainer, self.eval_batch_size, False, 0,
                               num_workers=0, collate_fn=_prompt_batch)
