"""The vision configs through `python -m step_lightning fit`: CIFAR recipes, ASP from a dense run, image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_lightning import check_nm_sparse, nm_mask
from step_lightning.cli import main
from tests.conftest import make_cifar
from tests.data.test_image_folder import make_image_folder
from tests.test_cli import CONFIGS, DEBUG, fit_every_recipe

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.init_args.batch_size", "4"]


def _fit(config: str, *extra: str) -> object:
    return main(["fit", "--config", str(CONFIGS / config), "--config", str(DEBUG), *TINY, *extra])


@pytest.mark.slow
def test_cifar_every_recipe_with_asp_from_the_dense_run(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = fit_every_recipe("cifar10/resnet18.yaml", in_tmp, *TINY)
    assert "Initialised ImageClassifier from --init_from" in capsys.readouterr().out
    dense_ckpt = Path(runs["dense"].trainer.log_dir) / "checkpoints" / "last.ckpt"
    dense = torch.load(dense_ckpt, weights_only=False)["state_dict"]
    asp = runs["asp_2of4"]
    recipe = next(c for c in asp.trainer.callbacks if type(c).__name__ == "ASPCallback")
    masked = recipe.masked_state_dict(asp.model)
    for name in ("net.layer2.0.conv1.weight", "net.layer4.1.conv2.weight"):
        check_nm_sparse(masked[name], 2, 4, "conv")
        # Pruned by magnitude from the dense run's weights, then fine-tuned with that mask.
        assert torch.equal(masked[name] != 0, nm_mask(dense[name], 2, 4, "conv"))

    with pytest.warns(UserWarning, match="no `--init_from` checkpoint was given"):
        _fit("cifar10/resnet18.yaml", "--config", str(CONFIGS / "recipes" / "asp_2of4.yaml"), "--trainer.max_steps",
             "0")


@pytest.mark.slow
@pytest.mark.parametrize(("config", "recipe"), [("cifar10/vit.yaml", "srste_2of4"), ("cifar100/resnet18.yaml",
                                                                                      "step_1of8")])
def test_other_cifar_configs_fit(in_tmp: Path, config: str, recipe: str) -> None:
    make_cifar(in_tmp / "data", "cifar100" if "cifar100" in config else "cifar10")
    cli = _fit(config, "--config", str(CONFIGS / "recipes" / f"{recipe}.yaml"))
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.hparams.num_classes == (100 if "cifar100" in config else 10)


def test_image_folder_classes_and_size_are_linked_to_the_model(in_tmp: Path) -> None:
    make_image_folder(in_tmp / "images")
    config = in_tmp / "folder.yaml"
    config.write_text(f"""
recipe:
  class_path: step_lightning.STEPCallback
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
