"""GLUE (all nine tasks) from Hugging Face ``datasets`` or the official TSV folders, tokenised once and cached.

``transformers`` and ``datasets`` are imported inside the functions that need them, so importing
``step_lightning.data`` stays fast and works without the ``nlp`` extra.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

from step_lightning.checks import IntAtLeast4, NonEmptyStr, NonNegativeInt, PositiveInt, check_arguments
from step_lightning.data.hf import model_context, tokenizer_fingerprint
from step_lightning.data.loading import global_seed, stateful_loader
from step_lightning.tasks.glue import TASKS, GLUETask, TaskSpec

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

HUB_DATASET = "nyu-mll/glue"
# Bumped whenever the tokenised format changes, so old caches are not reused.
CACHE_FORMAT = 1


def _check_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"GLUE: `--data.task`={task!r} is not a GLUE task; expected one of {list(TASKS)}.")
    return TASKS[task]


def task_files(data_dir: str | Path, task: str) -> dict[str, Path]:
    """The official files of ``task`` under the GLUE root ``data_dir``: split name -> path (train first)."""
    spec = _check_task(task)
    folder = Path(data_dir) / spec.folder
    return {"train": folder / "train.tsv", **{split: folder / name for split, name in spec.dev}}


def _parse_label(value: str, spec: TaskSpec, where: str) -> int | float:
    if spec.labels is None:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"GLUE: {where}: the score {value!r} is not a number.") from None
    if value in spec.labels:
        return spec.labels.index(value)
    if value.strip().isdigit() and int(value) < len(spec.labels):
        return int(value)
    accepted = [*spec.labels, *map(str, range(len(spec.labels)))]
    raise ValueError(f"GLUE: {where}: label {value!r} is not one of {accepted}.")


def read_glue_tsv(path: str | Path, task: str) -> dict[str, list[Any]]:
    """One split of ``task`` from its official TSV file, as columns named like ``nyu-mll/glue``'s.

    Text columns get ``datasets``' names (MNLI's ``sentence1``/``sentence2`` become ``premise``/``hypothesis``)
    and ``label`` holds class indices in ``datasets``' order (a float score for STS-B), so a model fine-tuned
    from these files and one fine-tuned from the Hub data see the same labels. Fields are split on tabs only
    (``csv.QUOTE_NONE``: GLUE sentences hold unmatched quotes). Rows with too few fields (a handful in QQP)
    are skipped with a warning, as the reference GLUE processors do.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a column the task needs is missing from the header, or a label is not one of the task's.
    """
    spec = _check_task(task)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE: {path} is missing (task {task!r}, `--data.data_dir`).")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # QUOTE_NONE lines can be long; C long on Windows
    columns: dict[str, list[Any]] = {name: [] for name in (*spec.text, "label")}
    skipped = 0
    # utf-8-sig: some copies of MRPC start with a byte-order mark.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        wanted = (*spec.tsv_text, spec.tsv_label)
        if isinstance(spec.tsv_label, int):
            first_line, positions = 1, [int(c) for c in wanted]
        else:
            header = next(rows, [])
            missing = [c for c in wanted if c not in header]
            if missing:
                raise ValueError(f"GLUE: {path} has no column(s) {missing} (header: {header}); is it task "
                                 f"{task!r}'s official file?")
            first_line, positions = 2, [header.index(str(c)) for c in wanted]
        needed = max(positions) + 1
        for line, row in enumerate(rows, start=first_line):
            if not row:
                continue
            if len(row) < needed:
                skipped += 1
                continue
            for name, pos in zip(spec.text, positions, strict=False):
                columns[name].append(row[pos])
            columns["label"].append(_parse_label(row[positions[-1]], spec, f"{path}:{line}"))
    if skipped:
        rank_zero_warn(f"GLUE: skipped {skipped} malformed row(s) of {path} (fewer than {needed} tab-separated "
                       "fields).")
    return columns


def _features(spec: TaskSpec) -> Any:
    from datasets import ClassLabel, Features, Value

    label = Value("float32") if spec.labels is None else ClassLabel(names=list(spec.labels))
    return Features({**{name: Value("string") for name in spec.text}, "label": label})


def check_glue_dir(data_dir: str | Path, task: str) -> dict[str, Path]:
    """The files of ``task`` under the GLUE root ``data_dir`` (see :func:`task_files`), checked to exist.

    Raises:
        FileNotFoundError: ``data_dir``, the task's folder or one of its files is missing (all are named).
    """
    spec = _check_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"GLUE: `--data.data_dir`={str(data_dir)!r} is not a directory; give the root of "
                                "the official GLUE download, or leave it unset to load nyu-mll/glue with datasets.")
    if not (root / spec.folder).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"GLUE: `--data.data_dir`={str(data_dir)!r} has no {spec.folder}/ folder for "
                                f"`--data.task`={task!r} (found: {found}); expected the official GLUE layout "
                                f"({', '.join(s.folder + '/' for s in TASKS.values())}).")
    files = task_files(root, task)
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"GLUE: {root / spec.folder} lacks {missing}; `--data.task`={task!r} needs "
                                f"{[path.name for path in files.values()]} there (the official GLUE files).")
    return files


def load_glue_dir(data_dir: str | Path, task: str) -> DatasetDict:
    """``task``'s training and validation splits from the official GLUE folder ``data_dir`` (offline)."""
    from datasets import Dataset, DatasetDict

    features = _features(_check_task(task))
    return DatasetDict({split: Dataset.from_dict(read_glue_tsv(path, task), features=features)
                        for split, path in check_glue_dir(data_dir, task).items()})


def load_glue_hub(task: str) -> DatasetDict:
    """``task``'s training and validation splits of ``nyu-mll/glue`` (downloads unless cached)."""
    from datasets import DatasetDict, load_dataset

    spec = _check_task(task)
    try:
        loaded = load_dataset(HUB_DATASET, task)
    except Exception as err:  # no network, offline mode without a cache, ...
        raise RuntimeError(f"GLUE: loading {HUB_DATASET}/{task} with datasets failed ({type(err).__name__}: {err}). "
                           "Set `--data.data_dir` to the root of the official GLUE download to work offline.") from err
    keep = ["train", *spec.val_splits]
    return DatasetDict({split: loaded[split].select_columns([*spec.text, "label"]) for split in keep})


def tokenize_splits(splits: DatasetDict, task: str, tokenizer: PreTrainedTokenizerBase, max_length: int
                    ) -> DatasetDict:
    """Token ids of every split, truncated to ``max_length`` and not padded; the label column becomes ``labels``."""
    spec = _check_task(task)

    def encode(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(*(batch[name] for name in spec.text), truncation=True, max_length=max_length)

    out = splits.map(encode, batched=True, remove_columns=list(spec.text), keep_in_memory=True,
                     desc=f"Tokenizing GLUE {task}")
    return out.rename_column("label", "labels")


class GLUEDataModule(pl.LightningDataModule):
    """One GLUE task, tokenised with the model's tokenizer, batched with dynamic padding.

    Data comes from ``nyu-mll/glue`` with Hugging Face ``datasets`` (``data_dir`` unset; downloaded in
    ``prepare_data``) or from the official GLUE download (``data_dir``: the folder holding ``CoLA/``,
    ``SST-2/``, ``MRPC/``, ``STS-B/``, ``QQP/``, ``MNLI/``, ``QNLI/``, ``RTE/``, ``WNLI/``; each task's
    ``train.tsv`` and ``dev.tsv``, MNLI's ``dev_matched.tsv`` and ``dev_mismatched.tsv``), read fully offline
    with the labels in ``datasets``' order, so both sources train the same model.

    ``prepare_data`` tokenises every split once (truncation to ``max_length``, no padding) and saves the
    result under ``cache_dir``, in a folder named by the task, ``max_length`` and a hash of the tokenizer and
    of the data source (the TSV files' sizes and times); ``setup`` only loads it. Batches are padded to their
    longest sequence by ``transformers.DataCollatorWithPadding`` and are dicts of ``input_ids``,
    ``attention_mask`` (``token_type_ids`` for BERT-like tokenizers) and ``labels`` (float scores for STS-B).

    Validation uses the dev set (two loaders for MNLI: matched, then mismatched); ``test`` and ``predict`` use
    the dev set(s) too, since GLUE's test labels are hidden. Loaders are ``torchdata``'s
    ``StatefulDataLoader``, which Lightning checkpoints, so a run resumes mid-epoch.

    Args:
        task: ``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``, ``qnli``, ``rte`` or ``wnli``.
        model_name_or_path: the tokenizer (``AutoTokenizer.from_pretrained``): a Hub name or a local folder;
            the CLI links it from ``--model.model_name_or_path``.
        data_dir: root of the official GLUE download; ``None``: ``nyu-mll/glue`` from the Hugging Face Hub.
        max_length: tokens per example after truncation, at least 4 (``[CLS] a [SEP] b [SEP]`` needs room for the
            special tokens and one token of text), at most the tokenizer's ``model_max_length``.
        batch_size: training examples per batch (per process under DDP).
        eval_batch_size: validation/test examples per batch; ``None``: ``batch_size``.
        num_workers: DataLoader worker processes.
        cache_dir: where tokenised data is kept; ``None``: ``<data_dir>/tokenized``, or
            ``<datasets cache>/step_lightning/tokenized`` when ``data_dir`` is unset.
        seed: seed of the shuffling under DDP; default: the run's ``seed_everything`` seed.

    Attributes:
        num_labels: 1 for STS-B (regression), 3 for MNLI, 2 otherwise; linked into the model by the CLI.
        task: the task name.

    Raises:
        ValueError: an unknown task or an invalid size; every problem is reported at once.

    Example::

        data:
          class_path: step_lightning.data.GLUEDataModule
          init_args: {task: mnli, data_dir: data/glue_data, max_length: 128, batch_size: 32}
    """

    def __init__(
        self,
        task: GLUETask = "sst2",
        model_name_or_path: NonEmptyStr = "bert-base-uncased",
        data_dir: str | None = None,
        max_length: IntAtLeast4 = 128,
        batch_size: PositiveInt = 32,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
        cache_dir: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_arguments(GLUEDataModule, locals(), flag="--data.{}")
        self.save_hyperparameters()
        self.task = task
        self.spec = TASKS[task]
        self.num_labels = self.spec.num_labels
        self.model_name_or_path = model_name_or_path
        self.data_dir = data_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.seed = seed
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: DatasetDict | None = None
        self.collator: Any = None

    # ---- tokenizer and cache ----------------------------------------------------------------------------
    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"GLUEDataModule: no tokenizer could be loaded from `--data.model_name_or_path`="
                               f"{self.model_name_or_path!r} ({type(err).__name__}: {err}); give a Hub name or a "
                               "folder written by `save_pretrained`.") from err
        limit = tokenizer.model_max_length
        if limit is not None and limit < 1_000_000 and self.max_length > limit:
            raise ValueError(f"GLUEDataModule: `--data.max_length`={self.max_length} exceeds the tokenizer's "
                             f"model_max_length {limit} (from {self.model_name_or_path!r}); use at most {limit}.")
        positions, _ = model_context(self.model_name_or_path)
        if positions is not None and self.max_length > positions:
            raise ValueError(f"GLUEDataModule: `--data.max_length`={self.max_length} exceeds the {positions} positions "
                             f"of the model {self.model_name_or_path!r}; use at most {positions}.")
        if tokenizer.pad_token is None:
            raise ValueError(f"GLUEDataModule: the tokenizer of `--data.model_name_or_path`="
                             f"{self.model_name_or_path!r} has no padding token, which dynamic padding needs.")
        return tokenizer

    def _source_key(self) -> str:
        if self.data_dir is None:
            return f"hub:{HUB_DATASET}/{self.task}"
        parts = []
        for split, path in task_files(self.data_dir, self.task).items():
            stat = path.stat() if path.is_file() else None
            parts.append(f"{split}={path.resolve()}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}")
        return "|".join(parts)

    def cache_root(self) -> Path:
        """The folder holding tokenised caches (``cache_dir``, or its default)."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        if self.data_dir is not None:
            return Path(self.data_dir) / "tokenized"
        from datasets import config

        return Path(config.HF_DATASETS_CACHE) / "step_lightning" / "tokenized"

    def cache_path(self, tokenizer: PreTrainedTokenizerBase) -> Path:
        """Where the tokenised splits for this task, ``max_length``, tokenizer and data source are saved."""
        key = hashlib.sha256("\n".join([str(CACHE_FORMAT), tokenizer_fingerprint(tokenizer), self.task,
                                        str(self.max_length), self._source_key()]).encode()).hexdigest()
        return self.cache_root() / f"glue-{self.task}-len{self.max_length}-{key[:16]}"

    # ---- data on disk -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.data_dir is not None:  # fail on a missing folder or file before loading anything
            check_glue_dir(self.data_dir, self.task)
        tokenizer = self._load_tokenizer()
        target = self.cache_path(tokenizer)  # before tokenising: calling a fast tokenizer changes its state
        if target.is_dir():
            return
        splits = load_glue_hub(self.task) if self.data_dir is None else load_glue_dir(self.data_dir, self.task)
        tokenized = tokenize_splits(splits, self.task, tokenizer, self.max_length)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then renamed: a crash or a second process never leaves a half-written cache in place.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            tokenized.save_to_disk(str(tmp / "data"))
            os.replace(tmp / "data", target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sizes = ", ".join(f"{split}: {len(rows)}" for split, rows in tokenized.items())
        rank_zero_info(f"GLUEDataModule: tokenised {self.task} ({sizes}) into {target}")

    def setup(self, stage: str) -> None:
        if self.datasets is not None:
            return
        from datasets import load_from_disk
        from transformers import DataCollatorWithPadding

        tokenizer = self._load_tokenizer()
        target = self.cache_path(tokenizer)
        if not target.is_dir():
            raise RuntimeError(f"GLUEDataModule: no tokenised data at {target}; call prepare_data() first (the "
                               "Trainer does) on every node.")
        self.tokenizer = tokenizer
        self.datasets = load_from_disk(str(target))
        # Lengths in multiples of 8: tensor-core friendly, and few distinct shapes for torch.compile.
        self.collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    # ---- loaders ----------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> StatefulDataLoader:
        if self.datasets is None:
            raise RuntimeError(f"GLUEDataModule: call setup() before asking for the {split} loader.")
        return stateful_loader(self.datasets[split], self.trainer, self.batch_size if train else self.eval_batch_size,
                               train, global_seed(self.seed), num_workers=self.num_workers, collate_fn=self.collator)

    def _eval_loaders(self) -> StatefulDataLoader | list[StatefulDataLoader]:
        loaders = [self._loader(split, train=False) for split in self.spec.val_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    @property
    def val_splits(self) -> Sequence[str]:
        """The validation split names, in loader order (``validation``; MNLI: matched, then mismatched)."""
        return self.spec.val_splits

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> StatefulDataLoader | list[StatefulDataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> StatefulDataLoader | list[StatefulDataLoader]:
        return self._eval_loaders()

    def predict_dataloader(self) -> StatefulDataLoader | list[StatefulDataLoader]:
        return self._eval_loaders()
