"""Tiny models and data shared by the tests: CPU, seconds each, no network."""

from __future__ import annotations

import os

# No test may reach the network: Hugging Face libraries read these at import, so set them before anything imports.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from step_lightning import StepAdamW, is_nm_sparse

# fairseq2 (the translation extra) installs only on CPython 3.10-3.12, Linux x86_64 or macOS 14+ arm64 (fairseq2n's
# wheels); elsewhere `pip install -e ".[dev]"` leaves it out, and the translation tests skip with this reason.
HAS_TRANSLATION = all(importlib.util.find_spec(m) is not None for m in ("fairseq2", "sentencepiece", "sacrebleu"))
requires_translation = pytest.mark.skipif(
    not HAS_TRANSLATION,
    reason="needs the translation extra (fairseq2, sentencepiece, sacrebleu), which installs only on CPython "
           "3.10-3.12 on Linux x86_64 or macOS 14+ arm64: pip install -e '.[translation]'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TinyNet(nn.Module):
    """conv stem (1 input channel: never maskable) -> conv -> two Linear -> head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.norm(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


TARGETS = ["net.conv.weight", "net.fc1.weight", "net.fc2.weight"]


class TinyModule(pl.LightningModule):
    """A LightningModule around :class:`TinyNet`; records whether validation saw N:M weights."""

    def __init__(self, optimizer: str = "step_adamw", lr: float = 1e-2) -> None:
        super().__init__()
        self.net = TinyNet()
        self.optimizer_name = optimizer
        self.lr = lr
        self.val_nm: list[bool] = []
        self.train_weights: list[dict[str, torch.Tensor]] = []
        self.record_train_weights = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.record_train_weights:
            self.train_weights.append({n: p.detach().clone() for n, p in self.named_parameters() if n in TARGETS})
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            params = dict(self.named_parameters())
            self.val_nm.append(all(is_nm_sparse(params[n], 2, 4, "conv" if "conv" in n else "linear")
                                   for n in TARGETS))
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "step_adamw":
            return StepAdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def tiny_loaders(n: int = 64, batch_size: int = 8, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=16)


def tiny_trainer(tmp_path: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=12, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class MetricsLog(Logger):
    """A logger that keeps every ``log_metrics`` call (which tags were logged at which step) and the
    hyperparameters logged."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(params if isinstance(params, dict) else vars(params))

    def steps_of(self, tag: str) -> list[int | None]:
        return [step for step, metrics in self.rows if tag in metrics]


def assert_train_loss_per_step(log: MetricsLog, steps: int) -> None:
    """The task loss is logged as ``train/loss`` at every optimizer step (``log_every_n_steps=1``), every
    module alike, and under no ``train/loss_step`` / ``train/loss_epoch`` variant."""
    assert log.steps_of("train/loss") == list(range(steps))
    tags = {tag for _, metrics in log.rows for tag in metrics}
    assert not [tag for tag in tags if tag.startswith("train/loss_")], tags


def make_cifar(root: Any, dataset: str = "cifar10", n_train: int = 40, n_test: int = 16, seed: int = 0) -> None:
    """Write a tiny dataset in the official CIFAR layout (pickled batches of uint8 rows and labels) under ``root``."""
    import pickle
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(seed)
    if dataset == "cifar10":
        folder, names, test, key, classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            "test_batch", "labels", 10
    else:
        folder, names, test, key, classes = "cifar-100-python", ["train"], "test", "fine_labels", 100
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    for name in [*names, test]:
        count = n_test if name == test else n_train // len(names)
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, count).tolist()}
        with open(out / name, "wb") as f:
            pickle.dump(entry, f)


@pytest.fixture
def tiny_cifar(tmp_path: Any) -> Any:
    """A tiny CIFAR-10 (40 training, 16 test images) in ``tmp_path / "data"``; returns that folder."""
    root = tmp_path / "data"
    make_cifar(root)
    return root


@pytest.fixture
def in_tmp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run in ``tmp_path`` (where the CLI writes ``logs/``), with a clean ``sys.argv``."""
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["step_lightning"])
    return tmp_path
