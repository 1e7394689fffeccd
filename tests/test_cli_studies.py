"""The study configs (configs/studies/) through `python -m step_lightning fit`, on tiny local data and models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_cli import TASKS, fit_every_recipe

STUDIES = [task for task in TASKS if task.startswith("studies/")]
METRIC = {"studies/mnist_mlp.yaml": "val/acc", "studies/rotten_tomatoes_bert.yaml": "val/acc",
          "studies/shakespeare_gpt2.yaml": "val/ppl"}


def test_every_study_config_names_its_metric() -> None:
    assert sorted(METRIC) == STUDIES


@pytest.mark.parametrize("config", [pytest.param(c, marks=() if "mnist" in c else pytest.mark.slow) for c in STUDIES])
def test_study_config_fits_every_recipe(in_tmp: Path, config: str) -> None:
    cli = fit_every_recipe(config, in_tmp, "--data.init_args.batch_size", "4")["step_2of4"]
    recipe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "STEPCallback")
    assert recipe.switch_step == 2 and recipe.targets
    assert torch.isfinite(cli.trainer.callback_metrics[METRIC[config]])
    monitor = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint").monitor
    assert monitor == METRIC[config]
