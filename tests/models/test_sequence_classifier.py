"""SequenceClassifier: GLUE metrics against scipy/sklearn, and a tiny BERT fine-tuned under every recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from step_lightning import ASPCallback, SRSTECallback, StepAdamW, STEPCallback, check_nm_sparse
from step_lightning.data.glue import GLUEDataModule
from step_lightning.models.sequence_classifier import SequenceClassifier
from step_lightning.tasks.glue import TASKS
from tests.conftest import MetricsLog, assert_train_loss_per_step, tiny_trainer
from tests.hf_tiny import make_glue, make_tiny_bert

RECIPES: dict[str, Any] = {
    "dense": lambda: None,
    "asp": lambda: ASPCallback(prune_at=1),
    "srste": lambda: SRSTECallback(),
    "step": lambda: STEPCallback(switch=1),
}
# Per encoder layer: the attention projections and the feed-forward layers.
LAYER_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    make_glue(root, tasks=["sst2", "mnli", "stsb", "cola"], n_train=16, n_dev=8)
    return root


def _model(tiny_bert: Path, task: str, **kwargs: Any) -> SequenceClassifier:
    return SequenceClassifier(str(tiny_bert), task, TASKS[task].num_labels, **kwargs)  # type: ignore[arg-type]


# ---- metrics ------------------------------------------------------------------------------------------------
def _reference(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task == "cola":
        values = {"mcc": matthews_corrcoef(labels, preds)}
    elif task == "stsb":
        stats = pytest.importorskip("scipy.stats", reason="the STS-B reference needs scipy (the `test` extra)")
        values = {"pearson": stats.pearsonr(preds, labels)[0], "spearman": stats.spearmanr(preds, labels)[0]}
    elif task in ("mrpc", "qqp"):
        values = {"f1": f1_score(labels, preds), "acc": accuracy_score(labels, preds)}
    else:
        values = {"acc": accuracy_score(labels, preds)}
    return {name: float(v) for name, v in values.items()}


def _fixed_batch(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = TASKS[task].num_labels
    if task == "stsb":
        labels = torch.rand(n, generator=g) * 5
        return (labels + torch.randn(n, generator=g)).unsqueeze(1), labels
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n)[: n // 2], labels[: n // 2]] += 5.0  # half right for sure: the metrics are informative
    return logits, labels


@pytest.mark.parametrize("task", list(TASKS))
def test_metrics_match_scipy_and_sklearn(tiny_bert: Path, task: str) -> None:
    model = _model(tiny_bert, task)
    loaders = 2 if task == "mnli" else 1
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(loaders)]
    for idx in range(loaders):
        for seed in range(3):  # three batches of different sizes per loader
            logits, labels = _fixed_batch(task, 7 + 3 * seed, seed + 10 * idx)
            model.update_metrics("val", idx, logits, labels)
            seen[idx].append((logits, labels))
    values = model.compute_metrics("val")

    refs = []
    for idx, suffix in enumerate(["_matched", "_mismatched"] if task == "mnli" else [""]):
        logits = torch.cat([b[0] for b in seen[idx]])
        labels = torch.cat([b[1] for b in seen[idx]])
        preds = logits.squeeze(1) if task == "stsb" else logits.argmax(1)
        ref = _reference(task, preds.numpy(), labels.numpy())
        for name, expected in ref.items():
            assert float(values[f"val/{name}{suffix}"]) == pytest.approx(expected, abs=1e-5), (task, name)
        refs.append(float(np.mean(list(ref.values()))))
    assert float(values["val/score"]) == pytest.approx(float(np.mean(refs)), abs=1e-5)

    all_logits = torch.cat([b[0] for batches in seen for b in batches])
    all_labels = torch.cat([b[1] for batches in seen for b in batches])
    loss = torch.nn.functional.mse_loss(all_logits.squeeze(1), all_labels) if task == "stsb" else \
        torch.nn.functional.cross_entropy(all_logits, all_labels)
    assert float(values["val/loss"]) == pytest.approx(float(loss), abs=1e-5)
    names = {"cola": ["mcc"], "stsb": ["pearson", "spearman"], "mrpc": ["f1", "acc"], "qqp": ["f1", "acc"],
             "mnli": ["acc_matched", "acc_mismatched"]}.get(task, ["acc"])
    assert set(values) == {"val/loss", "val/score", *(f"val/{name}" for name in names)}
    assert model.compute_metrics("val") == {}  # reset for the next epoch


def test_model_head_and_weight_decay_groups(tiny_bert: Path) -> None:
    model = _model(tiny_bert, "stsb")
    assert all(module.training for module in model.modules())  # from_pretrained leaves eval mode: dropout off
    assert model.model.config.problem_type == "regression" and model.model.config.num_labels == 1
    mnli = _model(tiny_bert, "mnli")
    assert mnli.model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    optimizer = mnli.configure_optimizers()
    assert isinstance(optimizer, StepAdamW) and optimizer.defaults["lr"] == 2e-5
    names = {id(p): n for n, p in mnli.named_parameters()}
    decay, plain = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"model.bert.embeddings.LayerNorm.weight",
                                                        "model.classifier.bias"}


def test_errors_name_the_flags(tiny_bert: Path) -> None:
    with pytest.raises(ValueError, match=r"`--model.task` must be one of 'cola', .*got 'squad'"):
        SequenceClassifier(str(tiny_bert), "squad", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`--model.num_labels`=2 does not fit task 'mnli', which needs 3"):
        SequenceClassifier(str(tiny_bert), "mnli", 2)
    with pytest.raises(ValueError, match=r"`--model.weight_decay_exclude` must be a list .*write \['bias'\]"):
        SequenceClassifier(str(tiny_bert), "sst2", 2, weight_decay_exclude="bias")


# ---- training under every recipe ------------------------------------------------------------------------
class ValidationWeights(pl.Callback):
    """Copies the weights the model is validated with (after every recipe has put its masks in place)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit(tmp_path: Path, tiny_bert: Path, glue_root: Path, task: str, recipe: Any, **kwargs: Any
         ) -> tuple[pl.Trainer, SequenceClassifier, ValidationWeights]:
    model = _model(tiny_bert, task, optimizer=lambda p: StepAdamW(p, lr=1e-4))
    dm = GLUEDataModule(task, str(tiny_bert), data_dir=str(glue_root), max_length=32, batch_size=4,
                        cache_dir=str(tmp_path / "cache"))
    seen = ValidationWeights()
    trainer = tiny_trainer(tmp_path, [c for c in (recipe, seen) if c is not None], max_steps=2,
                           val_check_interval=2, **kwargs)
    trainer.fit(model, dm)
    return trainer, model, seen


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sst2_trains_under_recipe(tmp_path: Path, tiny_bert: Path, glue_root: Path, recipe: str) -> None:
    callback = RECIPES[recipe]()
    log = MetricsLog()
    trainer, _, seen = _fit(tmp_path, tiny_bert, glue_root, "sst2", callback, logger=log)
    assert_train_loss_per_step(log, 2)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and torch.isfinite(metrics["val/loss"]) and torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0 and float(metrics["val/score"]) == float(metrics["val/acc"])
    if callback is None:
        return
    names = [t.name for t in callback.targets]
    for layer in range(2):
        for part in LAYER_TARGETS:
            assert f"model.bert.encoder.layer.{layer}.{part}.weight" in names
    assert "model.classifier.weight" not in names  # the head stays dense
    assert not any("embeddings" in name for name in names)
    for target in callback.targets:  # validation saw the N:M model
        check_nm_sparse(seen.weights[target.name], 2, 4, target.layout, name=target.name)
    if recipe == "step":
        assert callback.switch_step == 1


def test_mnli_logs_matched_and_mismatched(tmp_path: Path, tiny_bert: Path, glue_root: Path) -> None:
    trainer, model, _ = _fit(tmp_path, tiny_bert, glue_root, "mnli", STEPCallback(switch=1))
    metrics = trainer.callback_metrics
    assert {"val/acc_matched", "val/acc_mismatched", "val/score", "val/loss"} <= set(metrics)
    assert not any("dataloader_idx" in key for key in metrics)
    mean = (float(metrics["val/acc_matched"]) + float(metrics["val/acc_mismatched"])) / 2
    assert float(metrics["val/score"]) == pytest.approx(mean)
    results = trainer.test(model, datamodule=trainer.datamodule, verbose=False)
    assert {"test/acc_matched", "test/acc_mismatched", "test/score", "test/loss"} <= set(results[0])


@pytest.mark.parametrize("task", ["stsb", "cola"])
def test_regression_and_mcc_tasks_train(tmp_path: Path, tiny_bert: Path, glue_root: Path, task: str) -> None:
    trainer, model, _ = _fit(tmp_path, tiny_bert, glue_root, task, None)
    metrics = trainer.callback_metrics
    keys = {"val/pearson", "val/spearman"} if task == "stsb" else {"val/mcc"}
    assert keys | {"val/score", "val/loss"} <= set(metrics)
    predictions = trainer.predict(model, datamodule=trainer.datamodule)
    assert predictions is not None
    first = predictions[0]
    assert isinstance(first, torch.Tensor)
    assert first.dtype == (torch.float32 if task == "stsb" else torch.int64) and first.shape == (4,)
