"""The study configs (configs/studies/) through `python -m step_lightning fit`, on tiny local data and models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from step_lightning.cli import main
from tests.test_cli import CONFIGS, TASKS, fit_every_recipe

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


STUDY_RECIPES = sorted((Path(__file__).resolve().parents[1] / "studies" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", STUDY_RECIPES, ids=lambda p: p.stem)
def test_study_recipe_parses_as_its_name_says(in_tmp: Path, recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The ablation's recipes (studies/README.md): the file name says the switch; the parsed config must agree.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "studies/mnist_mlp.yaml"), "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    args = yaml.safe_load(capsys.readouterr().out)["recipe"]["init_args"]
    n, m = (1, 8) if "1of8" in recipe.stem else (2, 4)
    assert (args["n"], args["m"]) == (n, m)
    if "switch" in recipe.stem:
        assert args["switch"] == int(recipe.stem[-2:]) / 100
    else:
        assert args["switch"] == "auto" and args["autoswitch_window"] == 50
        statistic = next((s for s in ("reference", "relative") if s in recipe.stem), "log_drift")
        assert args["autoswitch_statistic"] == statistic
