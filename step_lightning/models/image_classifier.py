"""Image classification: one LightningModule for every backbone; the recipe is a callback, not a model."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from step_lightning.models.components.small_cnn import SmallCNN

Backbone = Literal["small_cnn"]


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    from step_lightning.optim import StepAdamW

    return StepAdamW(params, lr=2e-3, weight_decay=0.0)


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification with top-1 accuracy (``train/loss``, ``val/loss``, ``val/acc``, ...).

    Args:
        backbone: the network, built from ``models/components``: ``"small_cnn"``.
        num_classes: classes to predict; linked from the data module by the CLI.
        in_channels: image channels; linked from the data module by the CLI.
        width: width of the backbone (``small_cnn``: channels of its first conv).
        label_smoothing: cross-entropy label smoothing.
        optimizer: builds the optimizer from the parameters (``class_path``/``init_args`` in YAML);
            default ``StepAdamW(lr=2e-3, weight_decay=0)``, which every recipe accepts.
        lr_scheduler: optional, builds a scheduler from the optimizer (stepped every optimizer step).
    """

    def __init__(
        self,
        backbone: Backbone = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if backbone != "small_cnn":
            raise ValueError(f"`--model.backbone`={backbone!r} is not available; expected one of ['small_cnn'].")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy
                     ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
