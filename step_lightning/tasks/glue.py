"""The GLUE task table: what the data module and the model both need to know about each task.

``GLUEDataModule`` reads the columns, files and label names from here; ``SequenceClassifier`` the number of
labels, the label names and the validation splits. Neither imports the other: they meet only through the
CLI's links (``--data.task`` -> ``--model.task``, ``--data.num_labels`` -> ``--model.num_labels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GLUETask = Literal["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task looks in Hugging Face ``datasets`` and in the official download.

    ``text``/``label`` are the column names of the ``nyu-mll/glue`` dataset; ``tsv_text``/``tsv_label`` the
    header names in the official TSV files (an ``int`` is a column position, for CoLA's header-less files).
    ``labels`` lists the class names in the order of ``datasets``' ``ClassLabel`` (``None``: regression).
    ``dev`` maps each validation split name of ``datasets`` to its official file. ``named_labels``: the official
    files (and GLUE's submission format) spell labels by name, not by number.
    """

    folder: str
    text: tuple[str, ...]
    tsv_text: tuple[str | int, ...]
    tsv_label: str | int
    labels: tuple[str, ...] | None
    dev: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)
    named_labels: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def val_splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.dev)


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("CoLA", ("sentence",), (3,), 1, ("unacceptable", "acceptable")),
    "sst2": TaskSpec("SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive")),
    "mrpc": TaskSpec("MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("not_equivalent", "equivalent")),
    "stsb": TaskSpec("STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None),
    "qqp": TaskSpec("QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("not_duplicate", "duplicate")),
    "mnli": TaskSpec("MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"),
                     (("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv")),
                     named_labels=True),
    "qnli": TaskSpec("QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), named_labels=True),
    "rte": TaskSpec("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                    ("entailment", "not_entailment"), named_labels=True),
    "wnli": TaskSpec("WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                     ("not_entailment", "entailment")),
}
