"""The fairseq2 data pipeline that turns parallel text into batches by token count (see ``WMTDataModule``).

fairseq2 is imported inside the functions, so importing this module does not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from step_lightning._fairseq2 import import_fairseq2

# Batches held by the shuffle after bucketing. The pipeline yields its first batch once this many are made: 1,000
# (of ~1,000 per epoch of a 150k-pair corpus) delayed it by 28 s of a 33 s pass (benchmarks/RESULTS.md).
BATCH_SHUFFLE_WINDOW = 100


def bucket_sizes(max_tokens: int, max_seq_len: int, batch_size: int | None = None) -> list[tuple[int, int]]:
    """``(sentences, longest length)`` of each length bucket: ``max_tokens`` (rounded down to a multiple of
    ``max_seq_len``) split over lengths by fairseq2's ``create_bucket_sizes``, capped at ``batch_size``."""
    dp = import_fairseq2("fairseq2.data.data_pipeline")
    budget = max(max_tokens // max_seq_len, 1) * max_seq_len
    sizes = dp.create_bucket_sizes(max_num_elements=budget, max_seq_len=max_seq_len)
    if batch_size is not None:
        sizes = [(min(size, batch_size), length) for size, length in sizes]
    return sizes


def batch_pipeline(paths: Sequence[Path], encoders: dict[str, Any], buckets: list[tuple[int, int]], *, train: bool,
                   max_seq_len: int, shuffle_window: int, num_workers: int, pad_idx: int, seed: int, epoch: int = 0,
                   rank: int = 0, world_size: int = 1, stats: dict[str, int] | None = None) -> Any:
    """The fairseq2 pipeline of the batches of ``paths`` (source file, then target file if any) for one process.

    Args:
        paths: the source file, and the target file unless predicting.
        encoders: ``{"source": ..., "target": ...}``, the tokenizer's encoders of each side.
        buckets: :func:`bucket_sizes`.
        train: training (shuffle, drop pairs over ``max_seq_len``, shard batches) or evaluation (line numbers,
            cut sentences over ``max_seq_len`` keeping ``</s>``, shard lines).
        max_seq_len, shuffle_window, num_workers, pad_idx: as ``WMTDataModule``'s arguments.
        seed: the shuffling seed; epoch ``e`` shuffles with ``seed + e``.
        epoch, rank, world_size: the pass and the process it is for.
        stats: if given, counts the pairs read (``read``), dropped by the length filter (``dropped``) and
            truncated (``truncated``) as the pipeline runs.
    """
    dp = import_fairseq2("fairseq2.data.data_pipeline")
    text = import_fairseq2("fairseq2.data.text")
    sides = ("source", "target")[: len(paths)]
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
            if not train and len(ids) > max_seq_len:  # evaluation scores every sentence: cut, keeping </s>
                ids = torch.cat([ids[: max_seq_len - 1], ids[-1:]])
                counts["truncated"] += 1
            example[side] = ids
        return example

    def keep(example: dict[str, Any]) -> bool:
        if all(empty[side] < len(example[side]) <= max_seq_len for side in sides):
            return True
        counts["dropped"] += 1
        return False

    pipelines, names = [read(path) for path in paths], [f"{side}_text" for side in sides]
    if not train:  # line numbers: predictions are written back in file order
        pipelines, names = [dp.DataPipeline.count().and_return(), *pipelines], ["index", *names]
    builder = dp.DataPipeline.zip(pipelines, names=names)
    if not train and world_size > 1:  # evaluation: every rank reads and scores its share of the lines
        builder = builder.shard(rank, world_size, allow_uneven=True)
    if train:
        builder = builder.shuffle(shuffle_window, seed=seed + epoch)
    builder = builder.map(encode, num_parallel_calls=max(num_workers, 1))
    if train:
        builder = builder.filter(keep)
    builder = builder.bucket_by_length(buckets, selector=",".join(sides), skip_above_max_examples=train)
    if train:
        builder = builder.shuffle(BATCH_SHUFFLE_WINDOW, seed=seed + epoch)
    # Training shards batches, not lines: every rank builds the same batches (same seed), so each gets the
    # same count (the remainder dropped) and DDP never waits on a rank that ran out.
    if train and world_size > 1:
        builder = builder.shard(rank, world_size)
    builder = builder.map(dp.Collater(pad_value=pad_idx)).map(flatten)
    return builder.prefetch(4).and_return()


def flatten(batch: dict[str, Any]) -> dict[str, Any]:
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
