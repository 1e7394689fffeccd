"""The vision configs through `python -m step_lightning fit`: CIFAR recipes, ASP from a dense run, image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_lightning import check_nm_sparse, nm_mask
from step_lightning.cli import main
from tests.conftest import make_cifar
from tests.data.test_image_folder import make_image_folder
from tests.test_cli import CONFIGS, DEBUG

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.init_args.batch_size", "4"]


def _fit(config: str, *extra: str) -> object:
    return main(["fit", "--config", str(CONFIGS / config), "--config", str(DEBUG), *TINY, *extra])


@pytest.mark.slow
def test_cifar_dense_then_asp_from_it_then_step(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_cifar(in_tmp / "data")
    _fit("cifar10/resnet18_dense_2of4.yaml")
    run = in_tmp / "logs" / "cifar10" / "resnet18_dense_2of4" / "version_0"
    dense = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    with pytest.warns(UserWarning, match="no `--init_from` checkpoint was given"):
        _fit("cifar10/resnet18_asp_2of4.yaml", "--trainer.max_steps", "0")
    capsys.readouterr()
    cli = _fit("cifar10/resnet18_asp_2of4.yaml", "--init_from", str(run / "checkpoints" / "last.ckpt"),
               "--trainer.limit_train_batches", "1")
    assert "Initialised ImageClassifier from --init_from" in capsys.readouterr().out
    recipe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ASPCallback")
    masked = recipe.masked_state_dict(cli.model)
    for name in ("net.layer2.0.conv1.weight", "net.layer4.1.conv2.weight"):
        check_nm_sparse(masked[name], 2, 4, "conv")
        # Pruned by magnitude from the dense run's weights, then fine-tuned one step with that mask.
        assert torch.equal(masked[name] != 0, nm_mask(dense[name], 2, 4, "conv"))

    cli = _fit("cifar10/resnet18_step_2of4.yaml", "--trainer.callbacks.init_args.switch", "1")
    assert (in_tmp / "logs" / "cifar10" / "resnet18_step_2of4" / "version_0" / "export" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cifar10/vit_srste_2of4.yaml", "cifar100/resnet18_step_1of8.yaml"])
def test_other_cifar_configs_fit(in_tmp: Path, config: str) -> None:
    make_cifar(in_tmp / "data", "cifar100" if "cifar100" in config else "cifar10")
    cli = _fit(config)
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.hparams.num_classes == (100 if "cifar100" in config else 10)


def test_image_folder_classes_and_size_are_linked_to_the_model(in_tmp: Path) -> None:
    make_image_folder(in_tmp / "images")
    config = in_tmp / "folder.yaml"
    config.write_text(f"""
trainer:
  callbacks:
    - class_path: step_lightning.STEPCallback
      init_args: {{n: 2, m: 4, switch: 2}}
model:
  class_path: step_lightning.models.ImageClassifier
  init_args: {{backbone: vit, width: 32, depth: 1, heads: 2}}
data:
  class_path: step_lightning.data.ImageFolderDataModule
  init_args: {{data_dir: {in_tmp / 'images'}, image_size: 16, batch_size: 3}}
""")
    cli = main(["fit", "--config", str(config), "--config", str(DEBUG), "--data.init_args.batch_size", "3",
                "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1"])
    assert cli.model.hparams.num_classes == 3 and cli.model.hparams.image_size == 16
    assert cli.model.net.heads.head.out_features == 3
    assert cli.trainer.global_step == 3
