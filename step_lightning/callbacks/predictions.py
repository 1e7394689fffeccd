"""``PredictionWriter``: what ``predict`` predicted, as one file per prediction loader, in dataset order.

A Lightning ``BasePredictionWriter`` (``write_interval="epoch"``). The model says what a file holds: a
LightningModule that can be written implements ``format_predictions(predictions, dataloader_idx) ->
PredictionTable`` (the batches its ``predict_step`` returned for that loader, in loader order); the writer adds
the row key: the example's index in the loader's dataset, or what the data module's
``prediction_keys(dataloader_idx) -> (column name, keys by index)`` maps it to (e.g. an image's path). It
gathers the rows of every rank, sorts them by dataset index, drops the duplicates a ``DistributedSampler``
pads with, and writes the file on rank 0, atomically.

``python -m step_lightning predict`` adds one (writing into the run's log directory) when the model has
``format_predictions`` and no prediction writer is configured; configure it yourself to choose the folder::

    trainer:
      callbacks:
        - class_path: step_lightning.callbacks.PredictionWriter
          init_args: {output_dir: predictions/}
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from step_lightning.files import write_atomically


@dataclass
class PredictionTable:
    """One predictions file: its name, column separator, header (the key column first) and rows (without key).

    ``rows[i]`` belongs to the ``i``-th example the loader yielded, in loader order.
    """

    file_name: str
    header: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    delimiter: str = ","


def _all_ranks(value: Any) -> list[Any]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, value)
    return parts


class PredictionWriter(BasePredictionWriter):
    """Write the model's predictions (``format_predictions``) to ``output_dir``, one file per prediction loader.

    Args:
        output_dir: the folder; ``None``: the run's log directory (``trainer.log_dir``), or
            ``trainer.default_root_dir`` without a logger.

    Raises:
        ValueError: at the end of ``predict``, when the model has no ``format_predictions``, or when rows cannot be
            matched to examples (a multi-process run whose loader does not report batch indices).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.written: list[Path] = []

    @override
    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        format_predictions = getattr(pl_module, "format_predictions", None)
        if not callable(format_predictions):
            raise ValueError(f"PredictionWriter: {type(pl_module).__name__} has no `format_predictions`, so there is "
                             "no file format for its predictions; remove the PredictionWriter callback or write your "
                             "own BasePredictionWriter.")
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: every rank asks
        # Predictions: a list of batches for one loader, one such list per loader for several. Batch indices:
        # always one list per loader (Lightning 2.x).
        several = len(trainer.num_predict_batches) > 1
        per_loader = list(predictions) if several else [predictions]
        indices = list(batch_indices)
        datamodule = getattr(trainer, "datamodule", None)
        self.written = []
        for loader_idx, (batches, loader_indices) in enumerate(zip(per_loader, indices, strict=True)):
            table = format_predictions(list(batches), loader_idx)
            flat = [int(i) for batch in loader_indices or [] for i in batch]
            if len(flat) != len(table.rows):
                if trainer.world_size > 1:
                    raise ValueError("PredictionWriter: the prediction loader reports no batch indices, so rows of "
                                     "several processes cannot be put in dataset order; predict on one device.")
                flat = list(range(len(table.rows)))  # one process, a sequential loader: rows are in dataset order
            rows = {i: row for part in _all_ranks(list(zip(flat, table.rows, strict=True))) for i, row in part}
            if not trainer.is_global_zero:
                continue
            keys_of = getattr(datamodule, "prediction_keys", None)
            key_name, keys = keys_of(loader_idx) if callable(keys_of) else (table.header[0], None)
            buffer = io.StringIO()
            writer = csv.writer(buffer, delimiter=table.delimiter, lineterminator="\n")
            writer.writerow((key_name, *table.header[1:]))
            for index in sorted(rows):
                writer.writerow((keys[index] if keys is not None else index, *rows[index]))
            path = folder / table.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = buffer.getvalue().encode("utf-8")
            write_atomically(path, lambda file, data=data: file.write(data))
            rank_zero_info(f"PredictionWriter: wrote {len(rows)} predictions to {path}")
            self.written.append(path)
