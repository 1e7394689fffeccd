"""Sequence classification / regression with a Hugging Face encoder (GLUE); the recipe is a callback."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from step_lightning.callbacks.predictions import PredictionTable
from step_lightning.checks import PositiveInt, check_arguments
from step_lightning.models.evaluation import any_updated, updated_on_any_rank
from step_lightning.models.optimization import configure_optimization, parameter_groups
from step_lightning.tasks.glue import TASKS, GLUETask

# The headline number of each task (GLUE's leaderboard convention); `val/score` logs it for every task.
_HEADLINE: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "stsb": ("pearson", "spearman"),
    "mrpc": ("f1", "acc"),
    "qqp": ("f1", "acc"),
}


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    from step_lightning.optim import StepAdamW

    return StepAdamW(params, lr=2e-5, weight_decay=0.01)


def glue_metrics(task: str) -> nn.ModuleDict:
    """The official metrics of ``task`` for one evaluation set, by name (``acc``, ``f1``, ``mcc``, ...).

    CoLA: Matthews correlation; STS-B: Pearson and Spearman correlations; MRPC and QQP: F1 (of the positive
    class) and accuracy; the others: accuracy. They take predicted labels (predicted scores for STS-B).
    """
    spec = TASKS[task]
    if task == "cola":
        return nn.ModuleDict({"mcc": BinaryMatthewsCorrCoef(validate_args=False)})
    if task == "stsb":
        with warnings.catch_warnings():  # "will save all targets and predictions": 1,500 pairs in STS-B's dev set
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions", category=UserWarning)
            return nn.ModuleDict({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    if task in ("mrpc", "qqp"):
        return nn.ModuleDict({"f1": BinaryF1Score(validate_args=False), "acc": BinaryAccuracy(validate_args=False)})
    return nn.ModuleDict({"acc": MulticlassAccuracy(spec.num_labels, average="micro", validate_args=False)})


def glue_score(task: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The headline number of ``task`` from the values of :func:`glue_metrics` (mean where there are two)."""
    return torch.stack([values[name].float() for name in _HEADLINE.get(task, ("acc",))]).mean()


def _label_problems(task: str, num_labels: int, weight_decay_exclude: Sequence[str]) -> list[str]:
    """``num_labels`` must fit ``task``; ``weight_decay_exclude`` must be a list (a string is a sequence too)."""
    problems = []
    if task in TASKS and num_labels != TASKS[task].num_labels:
        problems.append(f"`--model.num_labels`={num_labels!r} does not fit task {task!r}, which needs "
                        f"{TASKS[task].num_labels} (linked from `--data.num_labels` by the CLI)")
    if isinstance(weight_decay_exclude, str):
        problems.append(f"`--model.weight_decay_exclude` must be a list of name parts, got the string "
                        f"{weight_decay_exclude!r}; write [{weight_decay_exclude!r}]")
    return problems


class SequenceClassifier(pl.LightningModule):
    """A Hugging Face ``AutoModelForSequenceClassification`` fine-tuned on one GLUE task.

    The encoder comes from ``model_name_or_path`` (a Hub name such as ``bert-base-uncased`` or a folder written
    by ``save_pretrained``) with a fresh head of ``num_labels`` outputs; STS-B uses a regression head (mean
    squared error). Biases and normalisation weights get no weight decay (:func:`parameter_groups`).

    Logged: ``train/loss`` every step; per validation (and ``test/...``) epoch ``val/loss`` and the task's
    official metrics: ``val/mcc`` (CoLA), ``val/pearson`` and ``val/spearman`` (STS-B), ``val/f1`` and
    ``val/acc`` (MRPC, QQP), ``val/acc`` (SST-2, QNLI, RTE, WNLI), ``val/acc_matched`` and
    ``val/acc_mismatched`` (MNLI, its two dev loaders); and for every task ``val/score``, the GLUE headline
    number (the mean of the task's two metrics for STS-B, MRPC, QQP and MNLI), a single key for
    ``ModelCheckpoint(monitor="val/score", mode="max")``.

    Args:
        model_name_or_path: the pretrained encoder and its config; the CLI links it to the data module's tokenizer.
        task: the GLUE task (``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``, ``qnli``, ``rte``,
            ``wnli``); linked from the data module by the CLI.
        num_labels: outputs of the head: 1 for STS-B, 3 for MNLI, 2 otherwise; linked from the data module.
        optimizer: builds the optimizer from the parameter groups (``class_path``/``init_args`` in YAML);
            default ``StepAdamW(lr=2e-5, weight_decay=0.01)``, which every recipe accepts.
        lr_scheduler: optional, builds a scheduler from the optimizer, stepped every optimizer step;
            :class:`~step_lightning.optim.WarmupDecayLR` takes its length from the trainer.
        weight_decay_exclude: parameters whose name contains one of these (case-insensitive) get no weight
            decay, besides every 1-D parameter (biases, LayerNorm weights).

    Raises:
        ValueError: an unknown task, or ``num_labels`` that does not fit it.

    Example::

        model:
          class_path: step_lightning.models.SequenceClassifier
          init_args:
            model_name_or_path: bert-base-uncased
            optimizer:
              class_path: step_lightning.optim.StepAdamW
              init_args: {lr: 2.0e-05, weight_decay: 0.01}
            lr_scheduler:
              class_path: step_lightning.optim.WarmupDecayLR
              init_args: {warmup: 0.1, decay: linear}
    """

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        task: GLUETask = "sst2",
        num_labels: PositiveInt = 2,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        weight_decay_exclude: Sequence[str] = ("bias", "norm"),
    ) -> None:
        super().__init__()
        check_arguments(SequenceClassifier, locals(), flag="--model.{}",
                        extra=_label_problems(task, num_labels, weight_decay_exclude))
        spec = TASKS[task]
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        from transformers import AutoModelForSequenceClassification

        labels = spec.labels or ("score",)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, num_labels=num_labels,
            problem_type="regression" if spec.labels is None else "single_label_classification",
            id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
        # from_pretrained returns the model in eval mode and Lightning keeps a module's mode: without this,
        # fine-tuning would run without dropout.
        self.model.train()
        self.task = task
        self.regression = spec.labels is None
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.weight_decay_exclude = tuple(key.lower() for key in weight_decay_exclude)
        # One metric set per evaluation loader (MNLI: matched, mismatched), and per stage.
        self.eval_suffixes = ("_matched", "_mismatched") if len(spec.val_splits) == 2 else ("",)
        self.val_metrics = nn.ModuleList([glue_metrics(task) for _ in self.eval_suffixes])
        self.test_metrics = nn.ModuleList([glue_metrics(task) for _ in self.eval_suffixes])
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` of a tokenised batch (the ``labels`` key, if any, is ignored)."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return self.model(**inputs).logits

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class indices, or predicted scores for regression (STS-B)."""
        return logits.squeeze(-1).float() if self.regression else logits.argmax(dim=-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        loss = self.loss(self(batch), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=labels.shape[0])
        return loss

    # ---- evaluation -------------------------------------------------------------------------------------
    def update_metrics(self, stage: str, dataloader_idx: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate one batch of ``stage`` (``"val"``/``"test"``) from evaluation loader ``dataloader_idx``."""
        loss_metric = self.val_loss if stage == "val" else self.test_loss
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[dataloader_idx]
        loss_metric.update(self.loss(logits, labels), weight=labels.shape[0])
        preds = self.predictions(logits)
        for metric in metrics.values():
            metric.update(preds, labels.float() if self.regression else labels)

    def compute_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """The epoch's values of ``stage`` by logged name (``val/acc``, ..., ``val/score``); resets the metrics."""
        values: dict[str, torch.Tensor] = {}
        scores = []
        loss_metric = self.val_loss if stage == "val" else self.test_loss
        groups = self.val_metrics if stage == "val" else self.test_metrics
        seen = updated_on_any_rank(self, [any_updated(m.values()) for m in groups] + [any_updated([loss_metric])])
        for suffix, metrics, updated in zip(self.eval_suffixes, groups, seen[:-1], strict=True):
            if not updated:
                continue
            computed = {name: metric.compute() for name, metric in metrics.items()}
            values.update({f"{stage}/{name}{suffix}": value for name, value in computed.items()})
            scores.append(glue_score(self.task, computed))
            for metric in metrics.values():
                metric.reset()
        if scores:
            values[f"{stage}/score"] = torch.stack(scores).mean()
        if seen[-1]:
            values[f"{stage}/loss"] = loss_metric.compute()
        loss_metric.reset()
        return values

    def _eval_step(self, stage: str, batch: Mapping[str, torch.Tensor], dataloader_idx: int) -> None:
        self.update_metrics(stage, dataloader_idx, self(batch), batch["labels"])

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _log_epoch(self, stage: str) -> None:
        for name, value in self.compute_metrics(stage).items():
            # Values are already reduced across processes by torchmetrics; sync_dist averages equal numbers.
            self.log(name, value, prog_bar=name.endswith(("/score", "/loss")) and stage == "val", sync_dist=True,
                     add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
                     ) -> torch.Tensor:
        return self.predictions(self(batch))

    def format_predictions(self, predictions: list[torch.Tensor], dataloader_idx: int = 0) -> PredictionTable:
        """GLUE's submission format for :class:`~step_lightning.callbacks.PredictionWriter`: ``<Task>.tsv``
        (``MNLI-m.tsv``/``MNLI-mm.tsv``) with ``index\tprediction`` rows.

        The prediction is written as GLUE's files and server spell labels: the label name for MNLI, QNLI and RTE
        (``entailment``, ...), the class number for CoLA, SST-2, MRPC, QQP and WNLI (whose files use 0/1, so a
        name there would be rejected), the score for STS-B. ``GLUEDataModule`` predicts on the dev set(s) (the
        test sets have no labels to train on, but the format is the same).
        """
        spec = TASKS[self.task]
        suffix = ("-m", "-mm")[dataloader_idx] if len(self.eval_suffixes) == 2 else ""
        table = PredictionTable(f"{spec.folder}{suffix}.tsv", ("index", "prediction"), delimiter="\t")
        for batch in predictions:
            for value in batch.tolist():
                if spec.labels is None:
                    table.rows.append((f"{value:.3f}",))
                else:
                    table.rows.append((spec.labels[value] if spec.named_labels else value,))
        return table

    def configure_optimizers(self) -> Any:
        groups = parameter_groups(self, no_decay=self.weight_decay_exclude)
        return configure_optimization(self, groups, self.optimizer_factory, self.scheduler_factory)
