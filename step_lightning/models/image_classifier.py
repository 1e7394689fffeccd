"""Image classification: one LightningModule for every backbone; the recipe is a callback, not a model."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from step_lightning.callbacks.predictions import PredictionTable
from step_lightning.checks import ClosedUnitInterval, PositiveInt, check_arguments
from step_lightning.extras import import_extra
from step_lightning.models.components.mlp import MLP
from step_lightning.models.components.small_cnn import SmallCNN
from step_lightning.models.optimization import configure_optimization

Backbone = Literal["small_cnn", "mlp", "resnet18", "resnet50", "vit"]
BACKBONES = ("small_cnn", "mlp", "resnet18", "resnet50", "vit")
# The size knobs each backbone has, with their defaults; any other knob set for it is an error.
_KNOBS: dict[str, dict[str, int]] = {
    "small_cnn": {"width": 32},
    "mlp": {"width": 512, "depth": 3},
    "resnet18": {},
    "resnet50": {},
    "vit": {"width": 384, "depth": 6, "heads": 6, "patch_size": 4},
}


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    from step_lightning.optim import StepAdamW

    return StepAdamW(params, lr=2e-3, weight_decay=0.0)


def build_backbone(backbone: str, num_classes: int, in_channels: int, image_size: int,
                   **knobs: int | None) -> nn.Module:
    """The ``nn.Module`` named ``backbone``, with the size knobs it accepts (``None``: its default)."""
    if backbone not in _KNOBS:
        raise ValueError(f"`--model.backbone`={backbone!r} is not available; expected one of {list(BACKBONES)}.")
    allowed = _KNOBS[backbone]
    wrong = sorted(k for k, v in knobs.items() if v is not None and k not in allowed)
    if wrong:
        raise ValueError(f"`--model.{wrong[0]}`={knobs[wrong[0]]!r} does not apply to backbone {backbone!r} "
                         f"(its size knobs: {sorted(allowed) or 'none'}); remove it.")
    size = {k: knobs.get(k) if knobs.get(k) is not None else default for k, default in allowed.items()}
    if backbone == "small_cnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, **size)
    if backbone == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, **size)
    # The ResNets and the ViT are torchvision's, imported here: the quickstart's CNN runs with the `cli` extra alone.
    what = f"`--model.backbone`={backbone!r}"
    if backbone in ("resnet18", "resnet50"):
        resnet = import_extra("step_lightning.models.components.resnet", "vision", what)
        return resnet.cifar_resnet(18 if backbone == "resnet18" else 50, num_classes, in_channels)
    return import_extra("step_lightning.models.components.vit", "vision", what).small_vit(
        num_classes, in_channels, image_size, **size)


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification with top-1 accuracy (``train/loss``, ``val/loss``, ``val/acc``, ...).

    Args:
        backbone: the network, from ``models/components``: ``"small_cnn"`` (the quickstart's),
            ``"mlp"`` (a multilayer perceptron on the flattened image: MNIST on a CPU),
            ``"resnet18"``/``"resnet50"`` (torchvision's ResNets with the CIFAR stem: 3x3 conv, no
            max-pool) or ``"vit"`` (torchvision's Vision Transformer, 4x4 patches, 6 blocks of width 384).
        num_classes: classes to predict; linked from the data module by the CLI.
        in_channels: image channels; linked from the data module by the CLI.
        image_size: side of the (square) input images; linked from the data module (the ViT needs it).
        width: ``small_cnn``: channels of its first conv (default 32); ``mlp``: hidden units (512); ``vit``:
            embedding width (384).
        depth: ``mlp``: hidden layers (default 3); ``vit``: number of Transformer blocks (default 6).
        heads: ``vit``: attention heads (default 6).
        patch_size: ``vit``: side of the square patches (default 4).
        label_smoothing: cross-entropy label smoothing.
        channels_last: run the network in ``torch.channels_last`` memory format: faster convolutions on
            tensor-core GPUs (with bf16 mixed precision above all), slower backward passes on CPUs.
            ``"auto"``: on for the CNN backbones when the trainer runs on CUDA, off otherwise.
        optimizer: builds the optimizer from the parameters (``class_path``/``init_args`` in YAML);
            default ``StepAdamW(lr=2e-3, weight_decay=0)``, which every recipe accepts.
        lr_scheduler: optional, builds a scheduler from the optimizer, stepped every optimizer step;
            :class:`~step_lightning.optim.WarmupDecayLR` takes its length from the trainer.
    """

    def __init__(
        self,
        backbone: Backbone = "small_cnn",
        num_classes: PositiveInt = 10,
        in_channels: PositiveInt = 3,
        image_size: PositiveInt = 32,
        width: PositiveInt | None = None,
        depth: PositiveInt | None = None,
        heads: PositiveInt | None = None,
        patch_size: PositiveInt | None = None,
        label_smoothing: ClosedUnitInterval = 0.0,
        channels_last: bool | Literal["auto"] = "auto",
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_arguments(ImageClassifier, locals(), flag="--model.{}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_backbone(backbone, num_classes, in_channels, image_size, width=width, depth=depth,
                                  heads=heads, patch_size=patch_size)
        self.channels_last_arg = channels_last
        self.channels_last = False
        if channels_last is True:
            self._to_channels_last()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def _to_channels_last(self) -> None:
        self.net = self.net.to(memory_format=torch.channels_last)
        self.channels_last = True

    def setup(self, stage: str) -> None:
        # Before the optimizer exists: the conversion swaps each parameter's storage, not the parameter.
        if self.channels_last_arg == "auto" and not self.channels_last:
            cnn = self.hparams["backbone"] not in ("vit", "mlp")
            if cnn and self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
                self._to_channels_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy
                     ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        metric(logits, y)
        # Training: `train/loss` per step, the tag every module logs (Lightning would suffix `_step`/`_epoch`
        # to a value logged both ways); evaluation: the epoch mean.
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=stage != "test")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Class probabilities ``(batch, num_classes)``: the softmax of the logits, in fp32."""
        return self(batch[0]).float().softmax(dim=-1)

    def format_predictions(self, predictions: list[torch.Tensor], dataloader_idx: int = 0) -> PredictionTable:
        """``predictions.csv`` for :class:`~step_lightning.callbacks.PredictionWriter`: ``index`` (``path`` for
        image folders), the most probable ``class`` (its name when the data module has ``classes``) and its
        ``probability``."""
        classes = getattr(getattr(self.trainer, "datamodule", None), "classes", None)
        table = PredictionTable("predictions.csv", ("index", "class", "probability"))
        for probabilities in predictions:
            best, label = probabilities.max(dim=-1)
            table.rows += [(classes[c] if classes else c, f"{p:.6f}") for c, p in zip(label.tolist(), best.tolist(),
                                                                                       strict=True)]
        return table

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.parameters(), self.optimizer_factory, self.scheduler_factory)
