"""ImageClassifier: every backbone trains under every recipe on tiny CIFAR data; the evaluated model is N:M."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from step_lightning import ASPCallback, SRSTECallback, StepAdamW, STEPCallback, check_nm_sparse
from step_lightning.data import CIFARDataModule
from step_lightning.models import ImageClassifier
from step_lightning.models.image_classifier import build_backbone
from tests.conftest import MetricsLog, assert_train_loss_per_step, tiny_trainer

RECIPES: dict[str, Any] = {
    "dense": lambda: None,
    "asp": lambda: ASPCallback(prune_at=1),
    "srste": lambda: SRSTECallback(),
    "step": lambda: STEPCallback(switch=1),
}
KNOBS: dict[str, dict[str, int]] = {"small_cnn": {"width": 16}, "mlp": {"width": 32, "depth": 2},
                                    "vit": {"width": 64, "depth": 2, "heads": 2}}
FAST = {("resnet18", "step"), ("mlp", "step"), ("small_cnn", "dense"), ("small_cnn", "asp"), ("small_cnn", "srste"),
        ("small_cnn", "step"), ("vit", "step")}


class ValidationWeights(pl.Callback):
    """Copies the weights the model is validated with (after every recipe has put its masks in place)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit(tmp_path: Path, data: Path, backbone: str, recipe: Any, **trainer_kwargs: Any) -> tuple[Any, Any]:
    # A small lr: STEP switching after one step freezes a one-sample second moment (raw, as the reference).
    model = ImageClassifier(backbone, num_classes=10, optimizer=lambda p: StepAdamW(p, lr=1e-4),
                            **KNOBS.get(backbone, {}))
    dm = CIFARDataModule(data_dir=str(data), batch_size=2, num_workers=0, gpu_augment=True)
    seen = ValidationWeights()
    callbacks = [c for c in (recipe, seen) if c is not None]
    trainer = tiny_trainer(tmp_path, callbacks, max_steps=2, limit_val_batches=1, val_check_interval=2,
                           **trainer_kwargs)
    trainer.fit(model, dm)
    return trainer, seen


@pytest.mark.parametrize(
    ("backbone", "recipe"),
    [pytest.param(b, r, marks=() if (b, r) in FAST else pytest.mark.slow)
     for b in ("small_cnn", "mlp", "resnet18", "resnet50", "vit") for r in RECIPES],
)
def test_backbone_trains_under_recipe(tmp_path: Path, tiny_cifar: Path, backbone: str, recipe: str) -> None:
    callback = RECIPES[recipe]()
    log = MetricsLog()
    trainer, seen = _fit(tmp_path, tiny_cifar, backbone, callback, logger=log)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert_train_loss_per_step(log, 2)
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    if callback is None:
        return
    assert callback.targets, "no layer of the backbone was masked"
    for target in callback.targets:  # validation saw the N:M model
        check_nm_sparse(seen.weights[target.name], 2, 4, target.layout, name=target.name)
    if backbone == "vit":
        assert any(t.name.endswith("self_attention.in_proj_weight") for t in callback.targets)
    if recipe == "step":
        assert callback.switch_step == 1


def test_channels_last_and_bf16_mixed(tmp_path: Path, tiny_cifar: Path) -> None:
    model = ImageClassifier("small_cnn", num_classes=10, width=16, channels_last=True)
    assert model.net.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    dm = CIFARDataModule(data_dir=str(tiny_cifar), batch_size=4, num_workers=0, gpu_augment=True)
    step = STEPCallback(switch=1)
    formats: list[bool] = []

    class Format(pl.Callback):
        def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            formats.append(pl_module.net.block1[0].weight.is_contiguous(memory_format=torch.channels_last))

    trainer = tiny_trainer(tmp_path, [step, Format()], max_steps=2, limit_val_batches=1, val_check_interval=2,
                           precision="bf16-mixed")
    trainer.fit(model, dm)
    assert formats == [True]  # the masked weights swapped in for validation kept the memory format
    masked = step.masked_state_dict(model)["net.block1.0.weight"]
    check_nm_sparse(masked, 2, 4, "conv")


def test_warmup_cosine_schedule_follows_the_trainer(tmp_path: Path, tiny_cifar: Path) -> None:
    from step_lightning.optim import WarmupDecayLR

    lrs: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = ImageClassifier("small_cnn", width=16, optimizer=lambda p: StepAdamW(p, lr=1.0),
                            lr_scheduler=lambda o: WarmupDecayLR(o, warmup=0.2, decay="cosine"))
    dm = CIFARDataModule(data_dir=str(tiny_cifar), batch_size=4, num_workers=0, gpu_augment=True)
    tiny_trainer(tmp_path, [RecordLR()], max_steps=-1, max_epochs=1, limit_val_batches=0).fit(model, dm)
    assert len(lrs) == 10  # 40 images / 4; warm-up 2 steps, then cosine to 0 at step 10
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))


def test_backbone_errors() -> None:
    with pytest.raises(ValueError, match=r"`--model.width`=64 does not apply to backbone 'resnet18'"):
        ImageClassifier("resnet18", width=64)
    with pytest.raises(ValueError, match=r"`--model.backbone` must be one of 'small_cnn', .*got 'resnet34'"):
        ImageClassifier("resnet34")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`--model.backbone`='resnet34' is not available"):
        build_backbone("resnet34", 10, 3, 32)
    with pytest.raises(ValueError, match=r"`--model.channels_last` must be true or false or 'auto', got 'yes'"):
        ImageClassifier(channels_last="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image size 30 is not a multiple of the patch size 4"):
        ImageClassifier("vit", image_size=30)
    with pytest.raises(ValueError, match=r"MLP `width` must be a multiple of 16 .*got 40"):
        ImageClassifier("mlp", width=40)
    with pytest.raises(ValueError, match=r"MLP `depth` must be at least 2 .*got 1"):
        ImageClassifier("mlp", depth=1)
    with pytest.raises(ValueError, match=r"`--model.heads`=2 does not apply to backbone 'mlp'"):
        ImageClassifier("mlp", heads=2)


def test_mlp_masks_the_hidden_layers_only() -> None:
    from step_lightning.sparsity.targets import select_targets

    model = ImageClassifier("mlp", in_channels=1, image_size=28, width=32, depth=3)
    targets, _ = select_targets(model, 2, 4)
    names = [t.name for t in targets]
    assert names == ["net.body.3.weight", "net.body.5.weight"]  # not the first layer (raw pixels), not the head
