"""WMT translation from plain parallel text: a joint SentencePiece model, batches by token count (fairseq2).

fairseq2 (the ``translation`` extra) and ``sentencepiece`` are imported inside the functions that need them,
so importing ``step_lightning.data`` stays fast and works without them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from step_lightning._fairseq2 import import_fairseq2
from step_lightning.data.loading import global_seed

SPLITS = ("train", "valid", "test")
# Symbols that fairseq2's NLLB tokenizer adds to the SentencePiece vocabulary besides one `__lang__` per
# language: <MINED_DATA>, <MMT_BT_DATA>, <SMT_BT_DATA> and <pad> (inserted at index 0).
_NLLB_EXTRA_SYMBOLS = 4
# Batches held by the shuffle after bucketing. The pipeline yields its first batch once this many are made: 1,000
# (of ~1,000 per epoch of a 150k-pair corpus) delayed it by 28 s of a 33 s pass (benchmarks/RESULTS.md).
BATCH_SHUFFLE_WINDOW = 100
# Bumped whenever the SentencePiece training options change, so old models are not reused.
SPM_FORMAT = 1


def parallel_files(data_dir: str | Path, src_lang: str, tgt_lang: str) -> dict[str, tuple[Path, Path]]:
    """``split -> (source file, target file)`` under ``data_dir``: ``{train,valid,test}.{src_lang,tgt_lang}``."""
    root = Path(data_dir)
    return {split: (root / f"{split}.{src_lang}", root / f"{split}.{tgt_lang}") for split in SPLITS}


def check_parallel_dir(data_dir: str | Path, src_lang: str, tgt_lang: str,
                       splits: tuple[str, ...] = ("train", "valid")) -> dict[str, tuple[Path, Path]]:
    """The files of ``splits`` under ``data_dir``, checked to exist (every missing one is named).

    Raises:
        FileNotFoundError: ``data_dir`` or one of the files is missing.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"WMT: `--data.data_dir`={str(data_dir)!r} is not a directory; it must hold "
                                f"train/valid/test.{{{src_lang},{tgt_lang}}} (one sentence per line).")
    files = parallel_files(root, src_lang, tgt_lang)
    missing = [path.name for split in splits for path in files[split] if not path.is_file()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_file())
        raise FileNotFoundError(f"WMT: `--data.data_dir`={str(data_dir)!r} lacks {missing} (found: {found}); "
                                f"expected {{train,valid,test}}.{{{src_lang},{tgt_lang}}} for `--data.src_lang`="
                                f"{src_lang!r}, `--data.tgt_lang`={tgt_lang!r}.")
    return {split: files[split] for split in splits}


def count_lines(path: Path) -> int:
    """Lines of a text file (a last line without a newline counts), read in 1 MiB blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def check_aligned(files: dict[str, tuple[Path, Path]]) -> None:
    """Each split's source and target files have as many lines (one sentence per line, aligned by line).

    Raises:
        ValueError: a pair of different lengths, with both counts.
    """
    for src, tgt in files.values():
        counts = count_lines(src), count_lines(tgt)
        if counts[0] != counts[1]:
            raise ValueError(f"WMT: {src} has {counts[0]:,} lines but {tgt} has {counts[1]:,}: parallel files hold "
                             "one sentence per line and must align line by line (is a file truncated, or does a "
                             "sentence contain a line break?).")


def hub_pair(src_lang: str, tgt_lang: str) -> str:
    """The config name of a pair in the Hub's ``wmt/wmt14``, ``wmt/wmt17``, ... datasets (English last: ``de-en``)."""
    return f"{tgt_lang}-{src_lang}" if src_lang == "en" else f"{src_lang}-{tgt_lang}"


def download_wmt(dataset: str, src_lang: str, tgt_lang: str, out_dir: str | Path) -> Path:
    """Write the Hub's ``wmt/<dataset>`` pair as ``{train,valid,test}.{src,tgt}`` text files under ``out_dir``.

    Loads with Hugging Face ``datasets`` (downloads unless cached); the ``validation`` split becomes ``valid``.
    Line breaks inside a sentence become spaces (one sentence per line). Written aside, then renamed.

    Raises:
        RuntimeError: ``datasets`` could not load the pair (no network, unknown edition or pair).
    """
    from datasets import load_dataset

    out = Path(out_dir)
    if _complete(out, src_lang, tgt_lang):
        return out
    name, pair = f"wmt/{dataset}", hub_pair(src_lang, tgt_lang)
    try:
        loaded = load_dataset(name, pair)
    except Exception as err:  # no network, offline mode without a cache, unknown config, ...
        raise RuntimeError(f"WMT: loading {name} ({pair}) with datasets failed ({type(err).__name__}: {err}). Set "
                           "`--data.data_dir` to a folder of {train,valid,test}.{src,tgt} text files to work "
                           "offline.") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
            if hub_split not in loaded:
                raise RuntimeError(f"WMT: {name} ({pair}) has no {hub_split!r} split (has {list(loaded)}).")
            with open(tmp / f"{split}.{src_lang}", "w", encoding="utf-8") as fs, \
                    open(tmp / f"{split}.{tgt_lang}", "w", encoding="utf-8") as ft:
                for row in loaded[hub_split]:
                    pair_text = row["translation"]
                    fs.write(" ".join(pair_text[src_lang].split()) + "\n")
                    ft.write(" ".join(pair_text[tgt_lang].split()) + "\n")
        # The whole folder is renamed into place (over an empty one too), so readers (other nodes on a shared
        # filesystem) see all files or none; a node that loses the race keeps the winner's identical files.
        try:
            os.rename(tmp, out)
        except OSError:
            if not _complete(out, src_lang, tgt_lang):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank_zero_info(f"WMTDataModule: wrote {name} ({pair}) as text files under {out}")
    return out


def _complete(folder: Path, src_lang: str, tgt_lang: str) -> bool:
    return all(p.is_file() for pair in parallel_files(folder, src_lang, tgt_lang).values() for p in pair)


def _file_key(paths: list[Path], sample: int = 1 << 20) -> str:
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


class _EvalBatches:
    """Re-iterable view of an evaluation pipeline, rebuilt for each pass (no ``state_dict``: never resumed)."""

    def __init__(self, build: Callable[[], Any], report: Callable[[], None] | None = None) -> None:
        self.build = build
        self.report = report
        self._reported = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.build()
        if self.report is not None and not self._reported:  # once: every pass reads the same sentences
            self._reported = True
            self.report()


class _Batches:
    """Re-iterable, resumable view of the training pipeline; each ``iter`` is the next epoch's pass.

    ``build(epoch)`` makes the pipeline of an epoch (its shuffle seed depends on the epoch, so an epoch's batches
    are a function of the seed and the epoch). ``state_dict`` holds the epoch of the current pass, how many of its
    batches training consumed and whether the pass ended; Lightning saves it in checkpoints (loaders with
    ``state_dict``/``load_state_dict``). After ``load_state_dict`` the next ``iter`` continues that pass (skipping
    the consumed batches, or yielding nothing if it had ended) and the one after starts the following epoch, so a
    resumed run sees the batches an uninterrupted run would see. Skipping re-reads the epoch up to that point (a
    fairseq2 pipeline's own ``state_dict`` would hold the whole shuffle buffer, too big to save at every
    checkpoint). The epoch is counted here, not read from the trainer: Lightning's epoch counter moves
    differently on a run resumed at an epoch's end.
    """

    # Lightning's fetcher pulls one batch ahead of the step it runs (to know the last batch in advance): when a
    # checkpoint is saved mid-epoch, the loader has yielded one batch more than training consumed (tested).
    LOOKAHEAD = 1

    def __init__(self, build: Callable[[int], Any], first_epoch: int = 0,
                 batches_done: Callable[[], int] | None = None, report: Callable[[int], None] | None = None) -> None:
        self.build = build
        self.batches_done = batches_done
        self.report = report
        self._epoch = first_epoch - 1  # the epoch of the current (or last) pass
        self._yielded = 0  # batches of that epoch handed out, skipped ones included
        self._skip = 0
        self._exhausted = False
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resume, self._resume = self._resume, None
        done = self.batches_done() if self.batches_done is not None else None
        if resume is None:
            epoch, skip = self._epoch + 1, 0
        elif done is None or done > 0 or (resume["consumed"] == 0 and not resume["done"]):
            # the saved pass goes on: Lightning restarts its epoch after `done` batches (mid-epoch resume)
            epoch, skip = resume["epoch"], resume["consumed"] if done is None else done
        else:  # Lightning starts a new epoch: the saved pass had ended (or hit `limit_train_batches`)
            epoch, skip, resume = resume["epoch"] + 1, 0, None
        self._epoch, self._yielded, self._skip, self._exhausted = epoch, skip, skip, False
        if resume is None or not resume["done"]:
            for index, batch in enumerate(self.build(epoch)):
                if index < skip:
                    continue
                self._yielded = index + 1
                yield batch
            if self.report is not None and skip == 0:
                self.report(epoch)
        self._exhausted = True

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # loaded but not iterated yet
            return dict(self._resume)
        if self._exhausted:
            return {"epoch": self._epoch, "consumed": self._yielded, "done": 1}
        return {"epoch": self._epoch, "consumed": max(self._yielded - self.LOOKAHEAD, self._skip), "done": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"]),
                        "done": int(state.get("done", 0))}


class WMTDataModule(pl.LightningDataModule):
    """A WMT language pair from plain parallel text, SentencePiece-tokenised, batched by token count.

    ``data_dir`` holds ``train``, ``valid`` and ``test`` files per language, one sentence per line, aligned by line:
    ``train.de`` / ``train.en`` and so on (the usual layout of the fairseq/Moses preparation scripts, before BPE).
    With ``data_dir`` unset, ``prepare_data`` downloads the Hub's ``wmt/<dataset>`` pair with ``datasets`` and
    writes it in this layout, once. ``prepare_data`` trains a joint unigram SentencePiece model of ``vocab_size``
    pieces on both training sides once, saved as ``<spm_dir>/spm-<vocab_size>-<hash>.model`` (the hash covers the
    training files' paths, sizes and times), and loads it as fairseq2's NLLB tokenizer, which adds a ``__<lang>__``
    symbol per language and ``<pad>`` at index 0. Source sentences are encoded as ``__src__ ... </s>``, target
    sentences as ``</s> __tgt__ ...  </s>`` (the decoder's prompt is the first two).

    Batching uses the fairseq2 data pipeline (C++, ``num_workers`` tokenising threads, batches prefetched in the
    background): pairs with an empty side or longer than ``max_seq_len`` tokens on either side are left out
    (counted in a log line after the epoch); the rest are shuffled (window ``shuffle_window``, seeded by ``seed``
    and the epoch, the same on every rank), grouped by length into batches of at most ``max_tokens`` tokens
    (padding included) and ``batch_size`` sentences, collated with padding and the batches shuffled again (a
    window of 100 batches). Under DDP every rank builds the same batches and takes every ``world_size``-th (the
    remainder dropped), so all ranks run the same number of steps. Validation, test and predict lines are split
    over the ranks before tokenising (each sentence is scored once; every rank needs one), neither shuffled nor
    filtered; a sentence over ``max_seq_len`` tokens is cut to it, keeping its ``</s>`` (with a warning).
    An epoch has no length known in advance: set ``max_steps`` (the Transformer recipes count updates) and
    validate every ``val_check_interval`` steps.

    A batch is a dict: ``source``/``target`` ``(batch, time)`` int64 token ids padded with 0,
    ``source_lens``/``target_lens`` the lengths as a list of ``int`` (host metadata: the model builds its layouts
    from them without a device sync), ``source_text``/``target_text`` the sentences, and ``index`` their line
    numbers in the file (in validation, test and predict batches). Predict batches hold no target.

    Args:
        src_lang: source language code (file suffix), e.g. ``de``.
        tgt_lang: target language code (file suffix), e.g. ``en``.
        dataset: the WMT edition on the Hugging Face Hub (``wmt14``, ``wmt17``, ...: ``wmt/<dataset>``), used
            when ``data_dir`` is unset.
        data_dir: folder of the parallel text files; ``None``: ``wmt/<dataset>`` is downloaded with ``datasets``
            in ``prepare_data`` and written as text files under ``download_dir``.
        download_dir: where downloaded pairs are written; ``None``:
            ``<datasets cache>/step_lightning/wmt/<dataset>-<pair>``.
        vocab_size: SentencePiece pieces; the model's vocabulary is this plus 2 language symbols and 4 others
            (:attr:`num_tokens`, linked into the model by the CLI).
        max_tokens: tokens per training batch (per process), padding included, rounded down to a multiple of
            ``max_seq_len`` (fairseq2's bucketing needs it). fairseq's ``--max-tokens``.
        max_seq_len: longest sentence kept, in tokens (training pairs above it are dropped, others truncated).
        batch_size: at most this many sentences per batch (fairseq's ``--batch-size``); ``None``: only
            ``max_tokens`` limits a batch.
        eval_max_tokens: tokens per validation/test/predict batch; ``None``: ``max_tokens``.
        shuffle_window: examples in the shuffle buffer (0: the whole corpus).
        num_workers: threads that tokenise in the pipeline (fairseq2's ``num_parallel_calls``; 0 or 1: one).
        spm_dir: where the SentencePiece model is saved; ``None``: ``spm/`` beside the text files.
        predict_file: source sentences (one per line) that ``predict`` translates; the model writes the
            translations in the same order (see :class:`~step_lightning.models.TranslationModule`).
        seed: seed of the shuffling; default: the run's ``seed_everything`` seed.

    Attributes:
        num_tokens: size of the tokenizer's vocabulary (``vocab_size + 6``).
        pad_idx: the padding index (0).

    Raises:
        ValueError: an invalid size or language; every problem is reported at once.

    Example::

        data:
          class_path: step_lightning.data.WMTDataModule
          init_args: {src_lang: de, tgt_lang: en, data_dir: data/wmt17_de_en, vocab_size: 32000, max_tokens: 4096}
    """

    def __init__(
        self,
        src_lang: str = "de",
        tgt_lang: str = "en",
        dataset: str = "wmt17",
        data_dir: str | None = None,
        download_dir: str | None = None,
        vocab_size: int = 32000,
        max_tokens: int = 4096,
        max_seq_len: int = 256,
        batch_size: int | None = None,
        eval_max_tokens: int | None = None,
        shuffle_window: int = 100_000,
        num_workers: int = 4,
        spm_dir: str | None = None,
        predict_file: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        problems = []
        for flag, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if not isinstance(lang, str) or not lang.isidentifier():
                problems.append(f"`--data.{flag}` must be a language code such as 'de', got {lang!r}")
        if src_lang == tgt_lang:
            problems.append(f"`--data.src_lang` and `--data.tgt_lang` must differ, both are {src_lang!r}")
        for flag, value, low in (("vocab_size", vocab_size, 16), ("max_tokens", max_tokens, 1),
                                 ("max_seq_len", max_seq_len, 4), ("num_workers", num_workers, 0),
                                 ("shuffle_window", shuffle_window, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"`--data.{flag}` must be an integer >= {low}, got {value!r}")
        for flag, value in (("eval_max_tokens", eval_max_tokens), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"`--data.{flag}` must be an integer >= 1 or null, got {value!r}")
        if not problems:
            for flag, value in (("max_tokens", max_tokens), ("eval_max_tokens", eval_max_tokens)):
                if value is not None and value < max_seq_len:
                    problems.append(f"`--data.{flag}`={value} must be at least `--data.max_seq_len`={max_seq_len} "
                                    "(a batch must hold one sentence of the longest length)")
        if data_dir is None and (not isinstance(dataset, str) or not dataset.startswith("wmt")):
            problems.append(f"`--data.dataset` must name a WMT edition such as 'wmt17' when `--data.data_dir` is "
                            f"unset, got {dataset!r}")
        if problems:
            raise ValueError("WMTDataModule: " + "; ".join(problems) + ".")
        self.save_hyperparameters()
        self.src_lang = src_lang
        self.tgt_lang = tgt_lang
        self.dataset = dataset
        self.data_dir = data_dir
        self.download_dir = download_dir
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.eval_max_tokens = eval_max_tokens or max_tokens
        self.shuffle_window = shuffle_window
        self.num_workers = num_workers
        self.spm_dir = spm_dir
        self.predict_file = predict_file
        self.seed = seed
        self.num_tokens = vocab_size + 2 + _NLLB_EXTRA_SYMBOLS
        self.pad_idx = 0
        self.tokenizer: Any = None

    def __str__(self) -> str:
        # LightningDataModule.__str__ iterates every loader (here: tokenising a whole epoch), and jsonargparse
        # formats the data module in a message when a CLI link does not apply to it.
        source = self.data_dir if self.data_dir is not None else f"hub:wmt/{self.dataset}"
        return (f"WMTDataModule({self.src_lang}->{self.tgt_lang}, {source}, vocab_size={self.vocab_size}, "
                f"max_tokens={self.max_tokens}, max_seq_len={self.max_seq_len})")

    # ---- tokenizer ----------------------------------------------------------------------------------------
    def _root(self) -> Path:
        """The folder of the text files: ``data_dir``, or where the download is written."""
        if self.data_dir is not None:
            return Path(self.data_dir)
        if self.download_dir is not None:
            return Path(self.download_dir)
        from datasets import config

        pair = hub_pair(self.src_lang, self.tgt_lang)
        return Path(config.HF_DATASETS_CACHE) / "step_lightning" / "wmt" / f"{self.dataset}-{pair}"

    def spm_path(self) -> Path:
        """Where the SentencePiece model for this corpus and ``vocab_size`` is (or will be) saved."""
        src, tgt = parallel_files(self._root(), self.src_lang, self.tgt_lang)["train"]
        key = hashlib.sha256(f"{SPM_FORMAT}\n{self.vocab_size}\n{_file_key([src, tgt])}".encode()).hexdigest()
        root = Path(self.spm_dir) if self.spm_dir is not None else self._root() / "spm"
        return root / f"spm-{self.vocab_size}-{key[:16]}.model"

    def prepare_data(self) -> None:
        if self.predict_file is not None and not Path(self.predict_file).is_file():
            raise FileNotFoundError(f"WMT: `--data.predict_file`={self.predict_file!r} is not a file.")
        if self.data_dir is None:
            download_wmt(self.dataset, self.src_lang, self.tgt_lang, self._root())
        files = check_parallel_dir(self._root(), self.src_lang, self.tgt_lang)
        test = parallel_files(self._root(), self.src_lang, self.tgt_lang)["test"]
        check_aligned({**files, **({"test": test} if all(p.is_file() for p in test) else {})})
        target = self.spm_path()
        if target.is_file():
            return
        try:
            train_sentencepiece(list(files["train"]), target, self.vocab_size, seed=global_seed(self.seed))
        except RuntimeError as err:  # e.g. "Vocabulary size is too high" on a small corpus
            raise ValueError(f"WMTDataModule: training SentencePiece with `--data.vocab_size`={self.vocab_size} on "
                             f"{[str(p) for p in files['train']]} failed: {err}") from err
        rank_zero_info(f"WMTDataModule: trained a {self.vocab_size}-piece SentencePiece model, {target}")

    def load_tokenizer(self) -> Any:
        """fairseq2's NLLB tokenizer over the trained SentencePiece model (languages ``src_lang``, ``tgt_lang``)."""
        path = self.spm_path()
        if not path.is_file():
            raise RuntimeError(f"WMTDataModule: no SentencePiece model at {path}; call prepare_data() first (the "
                               "Trainer does).")
        nllb = import_fairseq2("fairseq2.models.nllb")
        tokenizer = nllb.load_nllb_tokenizer(path, nllb.NllbTokenizerConfig(langs=[self.src_lang, self.tgt_lang],
                                                                            default_lang=self.tgt_lang))
        size = tokenizer.vocab_info.size
        if size != self.num_tokens:
            raise RuntimeError(f"WMTDataModule: the tokenizer from {path} has {size} tokens, expected "
                               f"{self.num_tokens} (`--data.vocab_size` + 6).")
        return tokenizer

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Nodes that do not share `spm_dir` each train their own model in prepare_data: the ranks must agree.
            digest = hashlib.sha256(self.spm_path().read_bytes()).hexdigest()
            same = trainer.strategy.broadcast(digest) == digest
            if not trainer.strategy.reduce_boolean_decision(same, all=True):
                raise RuntimeError(f"WMTDataModule: the ranks loaded different SentencePiece models (this rank: "
                                   f"{self.spm_path()}, sha256 {digest[:16]}): nodes trained their own. Put "
                                   "`--data.spm_dir` on a filesystem every node shares, or copy one model to each.")

    # ---- pipelines ----------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def bucket_sizes(self, train: bool) -> list[tuple[int, int]]:
        """``(sentences, longest length)`` of each length bucket: ``max_tokens`` (rounded down to a multiple of
        ``max_seq_len``) split over lengths by fairseq2's ``create_bucket_sizes``, capped at ``batch_size``."""
        dp = import_fairseq2("fairseq2.data.data_pipeline")
        max_tokens = self.max_tokens if train else self.eval_max_tokens
        budget = max(max_tokens // self.max_seq_len, 1) * self.max_seq_len
        sizes = dp.create_bucket_sizes(max_num_elements=budget, max_seq_len=self.max_seq_len)
        if self.batch_size is not None:
            sizes = [(min(size, self.batch_size), length) for size, length in sizes]
        return sizes

    def build_pipeline(self, split: str, train: bool, epoch: int = 0, rank: int = 0, world_size: int = 1,
                       seed: int | None = None, stats: dict[str, int] | None = None) -> Any:
        """The fairseq2 pipeline of ``split``'s batches for process ``rank`` of ``world_size`` (see the class doc).

        ``split`` is ``train``, ``valid``, ``test`` or ``predict`` (``predict_file``, source side only).
        ``seed``: the shuffling seed (default: ``seed`` or the run's). ``stats``, if given, counts the pairs
        read (``read``), dropped by the length filter (``dropped``) and truncated (``truncated``) as the
        pipeline runs.
        """
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
        dp = import_fairseq2("fairseq2.data.data_pipeline")
        text = import_fairseq2("fairseq2.data.text")
        if split == "predict":
            if self.predict_file is None:
                raise ValueError("WMT: `predict` needs `--data.predict_file`, a file of source sentences (one per "
                                 "line).")
            paths: tuple[Path, ...] = (Path(self.predict_file),)
        else:
            paths = check_parallel_dir(self._root(), self.src_lang, self.tgt_lang, (split,))[split]
        encoders = {"source": self.tokenizer.create_encoder(task="translation", lang=self.src_lang, mode="source"),
                    "target": self.tokenizer.create_encoder(task="translation", lang=self.tgt_lang, mode="target")}
        sides = ("source", "target")[: len(paths)]
        max_len = self.max_seq_len
        # An empty line encodes to its special tokens only: ``__src__ </s>``, ``</s> __tgt__ </s>``.
        empty = {side: len(enc.prefix_indices) + len(enc.suffix_indices) for side, enc in encoders.items()}
        counts = stats if stats is not None else {}
        for key in ("read", "dropped", "truncated"):
            counts.setdefault(key, 0)

        def read(path: Path) -> Any:
            return text.read_text(path, rtrim=True, ltrim=True, memory_map=True).and_return()

        def encode(example: dict[str, Any]) -> dict[str, Any]:
            counts["read"] += 1
            for side in sides:
                ids = encoders[side](example[f"{side}_text"])
                if not train and len(ids) > max_len:  # evaluation scores every sentence: cut, keeping </s>
                    ids = torch.cat([ids[: max_len - 1], ids[-1:]])
                    counts["truncated"] += 1
                example[side] = ids
            return example

        def keep(example: dict[str, Any]) -> bool:
            if all(empty[side] < len(example[side]) <= max_len for side in sides):
                return True
            counts["dropped"] += 1
            return False

        pipelines, names = [read(path) for path in paths], [f"{side}_text" for side in sides]
        if not train:  # line numbers: predictions are written back in file order
            pipelines, names = [dp.DataPipeline.count().and_return(), *pipelines], ["index", *names]
        builder = dp.DataPipeline.zip(pipelines, names=names)
        seed = global_seed(self.seed) if seed is None else seed
        if not train and world_size > 1:  # evaluation: every rank reads and scores its share of the lines
            builder = builder.shard(rank, world_size, allow_uneven=True)
        if train:
            builder = builder.shuffle(self.shuffle_window, seed=seed + epoch)
        builder = builder.map(encode, num_parallel_calls=max(self.num_workers, 1))
        if train:
            builder = builder.filter(keep)
        builder = builder.bucket_by_length(self.bucket_sizes(train), selector=",".join(sides),
                                           skip_above_max_examples=train)
        if train:
            builder = builder.shuffle(BATCH_SHUFFLE_WINDOW, seed=seed + epoch)
        # Training shards batches, not lines: every rank builds the same batches (same seed), so each gets the
        # same count (the remainder dropped) and DDP never waits on a rank that ran out.
        if train and world_size > 1:
            builder = builder.shard(rank, world_size)
        builder = builder.map(dp.Collater(pad_value=self.pad_idx)).map(_flatten)
        return builder.prefetch(4).and_return()

    def train_dataloader(self) -> Any:
        rank, world = self._rank_world()
        trainer = self.trainer
        seed = global_seed(self.seed)
        if trainer is not None and world > 1:  # `seed_everything: true` under torchrun draws one seed per rank
            seed = trainer.strategy.broadcast(seed)
        # Epochs finished so far (read now, before Lightning's loop counts the one starting).
        first_epoch = trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
        batches_done = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready) if trainer else None
        stats: dict[str, int] = {}

        def build(epoch: int) -> Any:
            stats.clear()
            return self.build_pipeline("train", True, epoch, rank, world, seed, stats)

        def report(epoch: int) -> None:
            if stats.get("dropped"):
                rank_zero_info(f"WMTDataModule: epoch {epoch} left out {stats['dropped']:,} of {stats['read']:,} "
                               f"training pairs (a side empty or longer than `--data.max_seq_len`={self.max_seq_len} "
                               "tokens).")

        return _Batches(build, first_epoch, batches_done, report)

    def _eval_loader(self, split: str) -> Any:
        rank, world = self._rank_world()
        if world > 1:
            source = Path(self.predict_file) if split == "predict" and self.predict_file else \
                parallel_files(self._root(), self.src_lang, self.tgt_lang)[split][0]
            if source.is_file() and (lines := count_lines(source)) < world:
                raise ValueError(f"WMT: {source} has {lines} lines for {world} processes; every process needs one "
                                 "(DDP synchronises on each process's first batch). Evaluate on fewer devices.")
        stats: dict[str, int] = {}

        def report() -> None:
            if stats.get("truncated"):
                rank_zero_warn(f"WMTDataModule: {stats['truncated']} {split} sentences on this rank were longer "
                               f"than `--data.max_seq_len`={self.max_seq_len} tokens and were cut to it.")

        return _EvalBatches(lambda: self.build_pipeline(split, False, 0, rank, world, stats=stats), report)

    def val_dataloader(self) -> Any:
        return self._eval_loader("valid")

    def test_dataloader(self) -> Any:
        return self._eval_loader("test")

    def predict_dataloader(self) -> Any:
        return self._eval_loader("predict")


def _flatten(batch: dict[str, Any]) -> dict[str, Any]:
    """Collater output (``{"seqs", "seq_lens", "is_ragged"}`` per sequence field) as a flat dict."""
    out: dict[str, Any] = {}
    for side in ("source", "target"):
        if side in batch:
            out[side] = batch[side]["seqs"]
            lens = batch[side]["seq_lens"]
            out[f"{side}_lens"] = lens.tolist() if isinstance(lens, torch.Tensor) else [int(n) for n in lens]
            out[f"{side}_text"] = [str(s) for s in batch[f"{side}_text"]]
    if "index" in batch:
        index = batch["index"]
        out["index"] = index.tolist() if isinstance(index, torch.Tensor) else [int(i) for i in index]
    return out
