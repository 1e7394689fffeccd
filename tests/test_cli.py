"""`python -m step_lightning`: the quickstart end to end, every shipped config, export, and user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from step_lightning import check_nm_sparse
from step_lightning.cli import QUICKSTART, StepLightningCLI, main
from tests.conftest import requires_translation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBUG = CONFIGS / "debug.yaml"
RECIPES = sorted(p.stem for p in (CONFIGS / "recipes").glob("*.yaml"))
TASKS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "recipes")
# The translation configs need the translation extra (fairseq2), which does not install everywhere.
TASK_PARAMS = [pytest.param(t, marks=requires_translation) if t.startswith("wmt") else t for t in TASKS]


def test_quickstart_fit_summary_export_and_validate(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(DEBUG)])
    out = capsys.readouterr().out
    fit_acc = float(cli.trainer.callback_metrics["val/acc"])
    assert f"final val/acc: {fit_acc:.4f}" in out
    assert "switch step: " in out and "tensorboard --logdir logs/quickstart/step_2of4" in out
    run_dir = in_tmp / "logs" / "quickstart" / "step_2of4" / "version_0"
    export = Path("logs/quickstart/step_2of4/version_0/export")
    assert f"exported N:M model: {export / 'model.safetensors'}" in out
    assert f"python -m step_lightning verify {export}" in out
    for name in ("config.yaml", "autoswitch.png", "sparsity_layers.md"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "| net.fc.0.weight | 128x64 | 2:4 | 0.500 |" in (run_dir / "sparsity_layers.md").read_text()

    # The exported files: every listed target is a key of model.pt and is N:M.
    state = torch.load(run_dir / "export" / "model.pt", weights_only=True)
    manifest = json.loads((run_dir / "export" / "sparsity.json").read_text())
    assert set(manifest["targets"]) == {"net.block1.0.weight", "net.block2.0.weight", "net.fc.0.weight"}
    for name, spec in manifest["targets"].items():
        check_nm_sparse(state[name], spec["n"], spec["m"], spec["layout"], name=name)

    # validate from the last checkpoint evaluates the same N:M model: the same accuracy.
    last = run_dir / "checkpoints" / "last.ckpt"
    val = main(["validate", "--config", str(QUICKSTART), "--config", str(DEBUG), "--ckpt_path", str(last)])
    assert float(val.trainer.callback_metrics["val/acc"]) == pytest.approx(fit_acc, abs=1e-6)

    # export from the checkpoint writes the same N:M weights.
    capsys.readouterr()
    main(["export", "--ckpt_path", str(last), "--output", "out"])
    printed = capsys.readouterr().out
    assert "net.block2.0.weight  64x64x3x3  conv    2:4  50.0" in printed and "Every listed weight is N:M" in printed
    exported = torch.load(in_tmp / "out" / "model.pt", weights_only=True)
    for name in manifest["targets"]:
        assert torch.equal(exported[name], state[name])


def test_fit_without_config_is_the_quickstart(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "step_lightning.data.DigitsDataModule" in printed and "step_lightning.STEPCallback" in printed
    assert "step_lightning.StepAdamW" in printed


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "step_lightning", "fit", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--trainer.max_epochs" in result.stdout


def test_configs_are_tasks_and_recipes() -> None:
    assert RECIPES == ["asp_1of4", "asp_1of8", "asp_2of4", "dense", "srste_1of4", "srste_1of8", "srste_2of4",
                       "step_1of4", "step_1of8", "step_2of4"]
    assert TASKS == ["cifar10/resnet18.yaml", "cifar10/vit.yaml", "cifar100/resnet18.yaml", "glue/bert_base.yaml",
                     "studies/mnist_mlp.yaml", "studies/rotten_tomatoes_bert.yaml", "studies/shakespeare_gpt2.yaml",
                     "wikitext/gpt2.yaml", "wmt17_de_en/transformer_base.yaml"]
    for recipe in RECIPES:  # a recipe file holds the recipe only, and says what it trains
        text = (CONFIGS / "recipes" / f"{recipe}.yaml").read_text()
        assert text.startswith("# ") and "--config configs/recipes/" in text
        assert set(yaml.safe_load(text)) == {"recipe"}
    for task in TASKS:  # a task file holds no recipe
        assert "recipe" not in yaml.safe_load((CONFIGS / task).read_text())


@pytest.mark.parametrize("task", [*TASK_PARAMS, "quickstart.yaml"])
def test_every_task_config_instantiates_with_the_debug_overlay(in_tmp: Path, task: str) -> None:
    text = (CONFIGS / task).read_text()
    assert text.startswith("# ") and "python -m step_lightning fit" in text  # says what it trains and how
    cli = StepLightningCLI(args=["--config", str(CONFIGS / task), "--config", str(DEBUG),
                                 *offline_overrides(task, in_tmp)], run=False)
    assert cli.trainer.max_epochs == 2 and cli.trainer.limit_train_batches == 6
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("task", TASK_PARAMS)
def test_every_task_x_recipe_parses(in_tmp: Path, task: str, capsys: pytest.CaptureFixture[str]) -> None:
    for recipe in RECIPES:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(CONFIGS / task), "--config", str(CONFIGS / "recipes" / f"{recipe}.yaml"),
                  "--print_config"])
        assert exit_info.value.code == 0, (task, recipe, capsys.readouterr().err[-2000:])
        printed = yaml.safe_load(capsys.readouterr().out)
        if recipe == "dense":
            assert printed["recipe"] is None
        else:
            kind, nm = recipe.split("_")
            assert printed["recipe"]["class_path"].lower().endswith(f"{kind}callback")
            assert f"{printed['recipe']['init_args']['n']}of{printed['recipe']['init_args']['m']}" == nm


def test_recipe_key_from_the_command_line(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def recipe_of(*argv: str) -> dict:
        with pytest.raises(SystemExit):
            main(["fit", *argv, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)["recipe"]

    assert recipe_of("--recipe.init_args.m", "8")["init_args"]["m"] == 8  # the quickstart's STEP at 2:8
    short = recipe_of("--config", str(CONFIGS / "cifar10/resnet18.yaml"), "--recipe", "STEPCallback", "--recipe.m", "8")
    assert short["class_path"].endswith("STEPCallback") and short["init_args"]["m"] == 8
    assert recipe_of("--recipe", "null") is None
    replaced = recipe_of("--config", str(CONFIGS / "recipes" / "srste_1of8.yaml"))  # stacked on the quickstart
    assert replaced["class_path"].endswith("SRSTECallback")
    assert (replaced["init_args"]["n"], replaced["init_args"]["m"]) == (1, 8)


def test_dense_run_has_no_recipe_and_logs_under_task_model_recipe(in_tmp: Path) -> None:
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(DEBUG), "--config",
                str(CONFIGS / "recipes" / "dense.yaml"), "--trainer.max_epochs", "1"])
    from step_lightning.callbacks import NMSparsityCallback

    assert not any(isinstance(cb, NMSparsityCallback) for cb in cli.trainer.callbacks)
    assert Path(cli.trainer.log_dir) == Path("logs") / "quickstart" / "dense" / "version_0"
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(DEBUG), "--trainer.max_epochs", "1",
                "--recipe.init_args.m", "8", "--recipe.init_args.switch", "2"])
    assert Path(cli.trainer.log_dir) == Path("logs") / "quickstart" / "step_2of8" / "version_0"


def fit_every_recipe(task: str, root: Path, *extra: str) -> dict[str, object]:
    """``fit`` the task with every recipe at 2:4 (ASP from the dense run's last checkpoint), on the debug overlay:
    each run ends with an N:M export of its model. Returns the CLI objects by recipe."""
    base = ["fit", "--config", str(CONFIGS / task), "--config", str(DEBUG), *offline_overrides(task, root), *extra]
    runs: dict[str, object] = {}
    for recipe in ("dense", "asp_2of4", "srste_2of4", "step_2of4"):
        args = [*base[:3], "--config", str(CONFIGS / "recipes" / f"{recipe}.yaml"), *base[3:]]
        if recipe == "step_2of4":
            args += ["--recipe.init_args.switch", "2"]
        if recipe == "asp_2of4":
            args += ["--init_from", str(Path(runs["dense"].trainer.log_dir) / "checkpoints" / "last.ckpt")]
        cli = main(args)
        run_dir = Path(cli.trainer.log_dir)
        assert run_dir.parts[-2:] == (recipe, "version_0") and run_dir.parts[1:-2] == Path(task).with_suffix("").parts
        assert cli.trainer.global_step > 0
        if recipe != "dense":
            state = torch.load(run_dir / "export" / "model.pt", weights_only=True)
            manifest = json.loads((run_dir / "export" / "sparsity.json").read_text())
            assert manifest["targets"]
            for name, spec in manifest["targets"].items():
                check_nm_sparse(state[name], spec["n"], spec["m"], spec["layout"], name=name)
        runs[recipe] = cli
    return runs


def offline_overrides(config: str, root: Path) -> list[str]:
    """Tiny local data (and, for the language models, a tiny local model) in ``root`` instead of downloads."""
    if config.startswith(("cifar10/", "cifar100/")):
        from tests.conftest import make_cifar

        make_cifar(root / "data", config.split("/")[0])
        return ["--data.init_args.data_dir", str(root / "data")]
    if config == "studies/mnist_mlp.yaml":
        from tests.data.test_mnist import write_mnist

        return ["--data.init_args.data_dir", str(write_mnist(root / "mnist", {"train": 200, "val": 40, "test": 40}))]
    if config.startswith(("glue/", "studies/rotten_tomatoes")):
        from tests.hf_tiny import make_glue, make_tiny_bert

        model, data = make_tiny_bert(root / "bert"), root / "glue"
        make_glue(data)
        return ["--model.init_args.model_name_or_path", str(model), "--data.init_args.data_dir", str(data),
                "--data.init_args.max_length", "64"]
    if config.startswith(("wikitext/", "studies/shakespeare")):
        from tests.hf_tiny_lm import build_gpt2, write_wikitext

        model, data = build_gpt2(root / "gpt2"), root / "wiki"
        write_wikitext(data)
        return ["--model.init_args.model_name_or_path", str(model), "--data.init_args.data_dir", str(data),
                "--data.init_args.block_size", "32", "--data.init_args.cache_dir", str(root / "cache")]
    if config.startswith("wmt17_de_en/"):
        from tests.wmt_tiny import TINY_DATA, make_parallel

        data = make_parallel(root / "wmt")
        return ["--model.init_args.arch", "tiny", "--data.init_args.data_dir", str(data),
                *(arg for key, value in TINY_DATA.items() for arg in (f"--data.init_args.{key}", str(value)))]
    return []


def test_typo_in_a_key(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.max_epoch", "1"])
    assert "max_epoch" in capsys.readouterr().err


def test_wrong_type(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.max_epochs", "many"])
    err = capsys.readouterr().err
    assert "trainer.max_epochs" in err and "many" in err


def test_checkpoint_from_a_different_model(in_tmp: Path) -> None:
    # A checkpoint written by the CLI carries its model's arguments, which LightningCLI applies; one
    # without them (saved by other code) is checked against the configured model.
    main(["fit", "--config", str(QUICKSTART), "--config", str(DEBUG), "--trainer.max_epochs", "1",
          "--model.init_args.width", "48"])
    ckpt = torch.load(in_tmp / "logs" / "quickstart" / "step_2of4" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=False)
    del ckpt["hyper_parameters"]
    torch.save(ckpt, in_tmp / "other.ckpt")
    with pytest.raises(ValueError, match=r"`--ckpt_path` 'other.ckpt' was saved from a different model than the "
                                         r"configured ImageClassifier: .*size mismatch"):
        main(["validate", "--config", str(QUICKSTART), "--config", str(DEBUG), "--ckpt_path", "other.ckpt"])


def test_export_errors(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", "missing.ckpt", "--output", "out"])
    assert exit_info.value.code == 2
    assert "`--ckpt_path` 'missing.ckpt' does not exist" in capsys.readouterr().err
    (in_tmp / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", "broken.ckpt", "--output", "out"])
    assert "is not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA GPU")
def test_semi_structured_explains_without_gpu(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "any.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", "any.ckpt", "--output", "out", "--semi_structured"])
    assert "needs a CUDA GPU of compute capability 8.0 or newer" in capsys.readouterr().err


@pytest.mark.slow
def test_full_quickstart_learns_an_accurate_2of4_model(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = main(["fit"])
    recipe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "STEPCallback")
    assert recipe.autoswitch.switched_by == "threshold"  # AutoSwitch decided, before its t_max
    assert recipe.switch_step < recipe.autoswitch.t_max
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.95
    assert "exported N:M model" in capsys.readouterr().out


@pytest.mark.slow
def test_quickstart_under_two_process_ddp(in_tmp: Path) -> None:
    # CPU, gloo: the end-of-fit report and summary must not wait on a collective only rank 0 joins.
    cmd = [sys.executable, "-m", "step_lightning", "fit", "--config", str(QUICKSTART), "--config", str(DEBUG),
           "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=in_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step_lightning fit finished.") == 1
    assert (in_tmp / "logs" / "quickstart" / "step_2of4" / "version_0" / "export" / "model.pt").is_file()


def test_print_config_keeps_a_fractional_switch(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `switch: PositiveInt | OpenUnitInterval`: the int type's serializer once dumped 0.5 as 0, so --print_config
    # and the run's config.yaml said `switch: 0`, a config that no longer parses.
    for value, expected in (("0.5", 0.5), ("0.05", 0.05), ("300", 300)):
        with pytest.raises(SystemExit):
            main(["fit", "--recipe.init_args.switch", value, "--recipe.init_args.autoswitch_t_max", "0.25",
                  "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)["recipe"]["init_args"]
        assert (printed["switch"], printed["autoswitch_t_max"]) == (expected, 0.25)
