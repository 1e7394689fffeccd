"""``WMTDataModule``: a WMT pair from plain parallel text, SentencePiece-tokenised, batched by token count.

The parts live beside it: :mod:`.corpus` (files, checks, download), :mod:`.tokenizer` (SentencePiece),
:mod:`.pipeline` (the fairseq2 batches) and :mod:`.loaders` (the views Lightning iterates). fairseq2 (the
``translation`` extra) and ``sentencepiece`` are imported inside the functions that need them, so importing
``step_lightning.data`` stays fast and works without them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from step_lightning.checks import (
    IntAtLeast4,
    IntAtLeast16,
    NonNegativeInt,
    PositiveInt,
    argument_problems,
    check_arguments,
)
from step_lightning.data.loading import global_seed
from step_lightning.data.wmt.corpus import (
    check_aligned,
    check_parallel_dir,
    count_lines,
    download_wmt,
    hub_pair,
    parallel_files,
)
from step_lightning.data.wmt.loaders import EvalBatches, ResumableBatches
from step_lightning.data.wmt.pipeline import batch_pipeline, bucket_sizes
from step_lightning.data.wmt.tokenizer import load_tokenizer, nllb_vocab_size, spm_model_path, train_sentencepiece


class WMTDataModule(pl.LightningDataModule):
    """A WMT language pair from plain parallel text, SentencePiece-tokenised, batched by token count.

    ``data_dir`` holds ``train``, ``valid`` and ``test`` files per language, one sentence per line, aligned by line:
    ``train.de`` / ``train.en`` and so on (the usual layout of the fairseq/Moses preparation scripts, before BPE).
    With ``data_dir`` unset, ``prepare_data`` downloads the Hub's ``wmt/<dataset>`` pair with ``datasets`` and
    writes it in this layout, once. ``prepare_data`` trains a joint unigram SentencePiece model of ``vocab_size``
    pieces on both training sides once, saved as ``<spm_dir>/spm-<vocab_size>-<key>.model`` (the key covers the
    training files' sizes and their first and last MiB, not their paths or times: a copy of the corpus elsewhere
    finds the same model), and loads it as fairseq2's NLLB tokenizer, which adds a ``__<lang>__``
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
        vocab_size: IntAtLeast16 = 32000,
        max_tokens: PositiveInt = 4096,
        max_seq_len: IntAtLeast4 = 256,
        batch_size: PositiveInt | None = None,
        eval_max_tokens: PositiveInt | None = None,
        shuffle_window: NonNegativeInt = 100_000,
        num_workers: NonNegativeInt = 4,
        spm_dir: str | None = None,
        predict_file: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_arguments(WMTDataModule, locals(), flag="--data.{}",
                        extra=[*_language_problems(src_lang, tgt_lang, dataset, data_dir),
                               *_token_budget_problems(max_tokens, eval_max_tokens, max_seq_len)])
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
        self.num_tokens = nllb_vocab_size(vocab_size)
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
        train_files = list(parallel_files(self._root(), self.src_lang, self.tgt_lang)["train"])
        root = Path(self.spm_dir) if self.spm_dir is not None else self._root() / "spm"
        return spm_model_path(root, self.vocab_size, train_files)

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
        return load_tokenizer(self.spm_path(), self.src_lang, self.tgt_lang, self.vocab_size)

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
        return bucket_sizes(self.max_tokens if train else self.eval_max_tokens, self.max_seq_len, self.batch_size)

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
        if split == "predict":
            if self.predict_file is None:
                raise ValueError("WMT: `predict` needs `--data.predict_file`, a file of source sentences (one per "
                                 "line).")
            paths: tuple[Path, ...] = (Path(self.predict_file),)
        else:
            paths = check_parallel_dir(self._root(), self.src_lang, self.tgt_lang, (split,))[split]
        encoders = {"source": self.tokenizer.create_encoder(task="translation", lang=self.src_lang, mode="source"),
                    "target": self.tokenizer.create_encoder(task="translation", lang=self.tgt_lang, mode="target")}
        return batch_pipeline(paths, encoders, self.bucket_sizes(train), train=train, max_seq_len=self.max_seq_len,
                              shuffle_window=self.shuffle_window, num_workers=self.num_workers, pad_idx=self.pad_idx,
                              seed=global_seed(self.seed) if seed is None else seed, epoch=epoch, rank=rank,
                              world_size=world_size, stats=stats)

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

        return ResumableBatches(build, first_epoch, batches_done, report)

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

        return EvalBatches(lambda: self.build_pipeline(split, False, 0, rank, world, stats=stats), report)

    def val_dataloader(self) -> Any:
        return self._eval_loader("valid")

    def test_dataloader(self) -> Any:
        return self._eval_loader("test")

    def predict_dataloader(self) -> Any:
        return self._eval_loader("predict")


def _language_problems(src_lang: str, tgt_lang: str, dataset: str, data_dir: str | None) -> list[str]:
    """What is wrong with the language pair, or with the WMT edition to download when ``data_dir`` is unset."""
    problems = [f"`--data.{flag}` must be a language code such as 'de', got {lang!r}"
                for flag, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang))
                if not isinstance(lang, str) or not lang.isidentifier()]
    if src_lang == tgt_lang:
        problems.append(f"`--data.src_lang` and `--data.tgt_lang` must differ, both are {src_lang!r}")
    if data_dir is None and (not isinstance(dataset, str) or not dataset.startswith("wmt")):
        problems.append(f"`--data.dataset` must name a WMT edition such as 'wmt17' when `--data.data_dir` is "
                        f"unset, got {dataset!r}")
    return problems


def _token_budget_problems(max_tokens: Any, eval_max_tokens: Any, max_seq_len: Any) -> list[str]:
    """A batch must hold one sentence of the longest length (skipped while a size is itself invalid)."""
    sizes = {"max_tokens": max_tokens, "eval_max_tokens": eval_max_tokens, "max_seq_len": max_seq_len}
    if argument_problems(WMTDataModule.__init__, sizes):
        return []  # check_arguments names the bad size itself
    return [f"`--data.{flag}`={value} must be at least `--data.max_seq_len`={max_seq_len} (a batch must hold one "
            "sentence of the longest length)"
            for flag, value in (("max_tokens", max_tokens), ("eval_max_tokens", eval_max_tokens))
            if value is not None and value < max_seq_len]
