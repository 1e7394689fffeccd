"""`python -m step_lightning compare`: tasks x recipes, run order and ASP wiring, the report from TensorBoard
logs, user errors."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from step_lightning.cli import QUICKSTART
from step_lightning.tools.compare import Recipe, main, read_spec

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
STEP = {"class_path": "step_lightning.STEPCallback", "init_args": {"n": 2, "m": 4}}
ASP = {"class_path": "step_lightning.ASPCallback", "init_args": {"n": 2, "m": 4, "prune_at": 0}}
CHECKPOINT = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_task(path: Path, *callbacks: Any) -> Path:
    """A task config: trainer callbacks (a last checkpoint for ASP to fine-tune), no recipe."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [*callbacks, CHECKPOINT]}}))
    return path


def write_recipe(path: Path, recipe: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"recipe": recipe}))
    return path


def write_run(run_dir: Path, acc: list[float], steps: list[int], start: float, every: float,
              switch: float | None = None, record: dict[str, Any] | None = None) -> None:
    """TensorBoard events as Lightning writes them: ``val/acc`` at the given global steps, then maybe the switch."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    for i, (step, value) in enumerate(zip(steps, acc, strict=True)):
        writer.add_scalar("val/acc", value, global_step=step, walltime=start + every * i)
        writer.add_scalar("train/loss", 1.0 - value, global_step=step, walltime=start + every * i)
    if switch is not None:
        writer.add_scalar("sparsity/switch_step", switch, global_step=int(switch), walltime=start + every)
    writer.close()
    if record is not None:
        (run_dir / "run.json").write_text(json.dumps(record))


def read_table(output: Path) -> dict[str, list[str]]:
    """``results.md``'s rows by config name: the cells after the name."""
    rows = [line.strip("|").split("|") for line in (output / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def spec_recipe(tmp_path: Path, *configs: Any) -> Recipe:
    paths = []
    for i, config in enumerate(configs):
        paths.append(tmp_path / f"c{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(config))
    return read_spec(paths, "--configs").recipe


def test_recipe_is_read_from_the_recipe_key_as_the_cli_stacks_it(tmp_path: Path) -> None:
    assert spec_recipe(tmp_path, {}) == Recipe("dense")
    assert spec_recipe(tmp_path, {"recipe": None}) == Recipe("dense")
    assert spec_recipe(tmp_path, {"recipe": "step_lightning.SRSTECallback"}) == Recipe("srste", 2, 4)
    assert spec_recipe(tmp_path, {"recipe": {"class_path": "step_lightning.callbacks.step.STEPCallback",
                                             "init_args": {"n": 1, "m": 8}}}) == Recipe("step", 1, 8)
    assert spec_recipe(tmp_path, {"recipe": {"class_path": "step_lightning.ASPCallback"}}) == \
        Recipe("asp", 2, 4, finetunes_dense=True)
    late = {"class_path": "step_lightning.ASPCallback", "init_args": {"prune_at": 0.5}}
    assert spec_recipe(tmp_path, {"recipe": late}) == Recipe("asp", 2, 4, finetunes_dense=False)
    # Stacked: the last config that sets the recipe wins; the same class merges init_args; null is dense.
    assert spec_recipe(tmp_path, {"recipe": STEP}, {"trainer": {}},
                       {"recipe": {"class_path": STEP["class_path"], "init_args": {"m": 8}}}) == Recipe("step", 2, 8)
    assert spec_recipe(tmp_path, {"recipe": STEP}, {"recipe": None}) == Recipe("dense")
    assert spec_recipe(tmp_path, {"recipe": STEP}, {"recipe": ASP}) == Recipe("asp", 2, 4, finetunes_dense=True)
    # A recipe listed among the callbacks (the form before the `recipe` key) still counts.
    assert spec_recipe(tmp_path, {"trainer": {"callbacks": [CHECKPOINT, STEP]}}) == Recipe("step", 2, 4)
    assert read_spec([tmp_path / "c0.yaml"], "--configs").name == "c0/step_2of4"


def test_report_from_tensorboard_logs(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(in_tmp / "net.yaml")
    step = write_recipe(in_tmp / "r" / "step_1of4.yaml", {"class_path": "step_lightning.STEPCallback",
                                                          "init_args": {"n": 1}})
    out = in_tmp / "logs" / "compare"
    steps = [10, 20, 30]
    # dense: wall time from run.json (100 s, 200 s); STEP: from the events (20 s, 40 s between first and last).
    write_run(out / "net/dense" / "seed0", [0.5, 0.7, 0.6], steps, 1000.0, 10.0,
              record={"command": "...", "exit_code": 0, "wall_seconds": 100.0})
    write_run(out / "net/dense" / "seed1", [0.4, 0.8, 0.7], steps, 1000.0, 10.0,
              record={"command": "...", "exit_code": 0, "wall_seconds": 200.0})
    write_run(out / "net/step_1of4" / "seed0", [0.3, 0.9, 0.85], steps, 5000.0, 10.0, switch=12.0)
    write_run(out / "net/step_1of4" / "seed1", [0.5, 0.6, 0.95], steps, 5000.0, 20.0, switch=14.0)

    assert main(["--task", str(task), "--recipes", "dense", str(step), "--report_only"]) == 0  # rows by file name
    printed = capsys.readouterr().out
    table = read_table(out)
    # best: mean ± sample std of (0.7, 0.8) and (0.9, 0.95); final: of (0.6, 0.7) and (0.85, 0.95)
    assert table == {
        "net/dense": ["dense", "–", "2", "0.7500 ± 0.0707", "0.6500 ± 0.0707", "–", "2.5 min", "ok"],
        "net/step_1of4": ["step", "1:4", "2", "0.9250 ± 0.0354", "0.9000 ± 0.0707", "13", "30.0 s", "ok"],
    }
    assert "| net/step_1of4 | step | 1:4 | 2 | 0.9250 ± 0.0354 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "val/acc" and results["mode"] == "max"
    runs = {(r["name"], r["seed"]): r for r in results["runs"]}
    assert len(runs) == 4
    assert runs["net/step_1of4", 1]["best"] == pytest.approx(0.95) and runs["net/step_1of4", 1]["best_step"] == 30
    assert runs["net/step_1of4", 0]["final"] == pytest.approx(0.85) and runs["net/step_1of4", 0]["switch_step"] == 12
    assert runs["net/step_1of4", 1]["wall_seconds"] == pytest.approx(40.0)
    assert runs["net/step_1of4", 1]["wall_source"] == "events"
    assert runs["net/dense", 0]["wall_seconds"] == 100.0 and runs["net/dense", 0]["wall_source"] == "run.json"
    rows = {r["name"]: r for r in results["configs"]}
    assert rows["net/dense"]["best_mean"] == pytest.approx(0.75)
    assert rows["net/step_1of4"]["switch_step_mean"] == 13.0 and rows["net/step_1of4"]["seeds"] == [0, 1]
    assert rows["net/step_1of4"]["config"] == f"{task} + {step}"
    assert (out / "val_curves.png").stat().st_size > 1000

    # --mode min on another scalar; one seed only: no ± std.
    assert main(["--task", str(task), "--recipes", "dense", str(step), "--report_only", "--metric", "train/loss",
                 "--mode", "min", "--seeds", "1"]) == 0
    assert read_table(out)["net/dense"][3:5] == ["0.2000", "0.3000"]

    # Without --task: every run under --output, its recipe unknown without the config.yaml a real run saves.
    capsys.readouterr()
    assert main(["--report_only"]) == 0
    assert read_table(out)["net/step_1of4"] == ["?", "–", "2", "0.9250 ± 0.0354", "0.9000 ± 0.0707", "13", "30.0 s",
                                                "ok"]


def test_report_shows_failed_missing_and_metricless_runs(in_tmp: Path) -> None:
    task = write_task(in_tmp / "net.yaml")
    out = in_tmp / "logs" / "compare" / "net" / "srste_2of4"
    write_run(out / "seed0", [0.5], [10], 0.0, 1.0, record={"exit_code": 0, "wall_seconds": 3.0})
    write_run(out / "seed1", [0.1], [10], 0.0, 1.0, record={"exit_code": 1, "wall_seconds": 1.0})
    args = ["--task", str(task), "--recipes", "srste_2of4", "--report_only"]
    assert main([*args, "--seeds", "0", "1", "2"]) == 1
    assert read_table(in_tmp / "logs" / "compare")["net/srste_2of4"] == [
        "srste", "2:4", "1", "0.5000", "0.5000", "–", "3.0 s", "failed: seed 1; missing: seed 2"]

    # A run that logged no val/acc (e.g. no validation data) shows n/a rather than crashing.
    assert main([*args, "--seeds", "0", "--metric", "val/f1"]) == 0
    assert read_table(in_tmp / "logs" / "compare")["net/srste_2of4"] == [
        "srste", "2:4", "0", "n/a", "n/a", "–", "3.0 s", "no metric: seed 0"]
    assert (in_tmp / "logs" / "compare" / "val_curves.png").is_file()


def test_dry_run_is_a_task_x_recipe_grid_with_dense_first_and_asp_from_its_seed(
        in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net, other = write_task(in_tmp / "cfg" / "net.yaml"), write_task(in_tmp / "other.yaml")
    late_asp = write_recipe(in_tmp / "late.yaml", {"class_path": ASP["class_path"],  # prunes its own run
                                                   "init_args": {"n": 1, "m": 4, "prune_at": 0.5}})
    code = main(["--task", str(net), str(other), "--recipes", "step_2of4", "asp_2of4", str(late_asp), "dense",
                 "--seeds", "0", "1", "--output", "out dir", "--dry_run",
                 "--extra", "--config", "debug.yaml", "--trainer.max_epochs", "1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines]
    runs = [(c[16].split("=", 1)[1], c[c.index("--seed_everything") + 1]) for c in commands]
    assert runs == [(f"{task}/{recipe}", seed) for task, recipe in
                    [("net", "dense"), ("other", "dense"), ("net", "step_2of4"), ("net", "asp_2of4"),
                     ("net", "late"), ("other", "step_2of4"), ("other", "asp_2of4"), ("other", "late")]
                    for seed in ("0", "1")]
    for command, (name, seed) in zip(commands, runs, strict=True):
        task = net if name.startswith("net/") else other
        recipe = {"late": str(late_asp)}.get(name.rsplit("/", 1)[1],
                                                 f"configs/recipes/{name.rsplit('/', 1)[1]}.yaml")
        assert command[:8] == [sys.executable, "-m", "step_lightning", "fit", "--config", str(task), "--config",
                               command[7]]
        assert command[7].endswith(recipe)
        assert command[8:12] == ["--config", "debug.yaml", "--trainer.max_epochs", "1"]  # --extra, verbatim
        assert command[14:19] == ["--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                                  "--trainer.logger.save_dir=out dir", f"--trainer.logger.name={name}",
                                  f"--trainer.logger.version=seed{seed}", "--trainer.logger.default_hp_metric=false"]
        dense_ckpt = f"out dir/{name.rsplit('/', 1)[0]}/dense/seed{seed}/checkpoints/last.ckpt"
        assert command[19:] == (["--init_from", dense_ckpt] if name.endswith("asp_2of4") else [])
    assert "'out dir/net/dense/seed1/checkpoints/last.ckpt'" in lines[7]  # shell-quoted
    assert not (in_tmp / "out dir").exists()  # a dry run writes nothing


def test_warns_when_the_dense_run_keeps_no_last_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = in_tmp / "net.yaml"
    task.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks."
                                                                             "ModelCheckpoint"}]}}))
    assert main(["--task", task.name, "--recipes", "dense", "asp_2of4", "--dry_run"]) == 0
    err = capsys.readouterr().err
    assert "warning: 'net.yaml + " in err and "has no LastCheckpoint nor ModelCheckpoint(save_last=true)" in err
    write_task(task)
    assert main(["--task", task.name, "--recipes", "dense", "asp_2of4", "--dry_run"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_skip_finished_keeps_runs_that_finished(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(in_tmp / "net.yaml")
    finished = in_tmp / "logs" / "compare" / "net" / "dense" / "seed0"
    finished.mkdir(parents=True)
    (finished / "run.json").write_text(json.dumps({"exit_code": 0, "wall_seconds": 1.0}))
    args = ["--task", str(task), "--recipes", "dense", "--seeds", "0", "1"]
    assert main([*args, "--dry_run", "--if_exists", "skip_finished"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "--seed_everything 1" in lines[0]

    # Without --if_exists nothing runs: the old events would mix into the new run's.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"`--output` 'logs/compare' already holds the runs {Path('logs/compare/net/dense/seed0')}" in err
    assert "--if_exists overwrite" in err
    assert not (finished.parent / "seed1").exists()


@pytest.mark.parametrize(("argv", "message"), [
    ([], "nothing to run: give `--task CONFIG --recipes R [R ...]` or `--configs CONFIG [...]`"),
    (["--task", "net.yaml"], "`--task` and `--recipes` go together"),
    (["--recipes", "dense"], "`--task` and `--recipes` go together"),
    (["--task", "missing.yaml", "--recipes", "dense"], "`--task` 'missing.yaml' does not exist or is not a file."),
    (["--configs", "missing.yaml"], "`--configs` 'missing.yaml' does not exist or is not a file."),
    (["--task", "net.yaml", "--recipes", "step_3of4"],
     "`--recipes` 'step_3of4' is neither a file nor a recipe of configs/recipes/ (asp_1of4, asp_1of8, asp_2of4, "
     "dense,"),
    (["--task", "net.yaml", "--recipes", "dense", "--seeds", "1", "-2"], "`--seeds` -2 is negative"),
    (["--task", "net.yaml", "--recipes", "dense", "--seeds", "1", "1"], "`--seeds` 1 1 repeats a seed."),
    (["--task", "net.yaml", "--recipes", "dense", "--seeds", "one"], "argument --seeds: invalid int value: 'one'"),
    (["--task", "net.yaml", "--recipes", "dense", "--seed", "1"], "unrecognized arguments: --seed 1"),
    (["--task", "net.yaml", "--recipes", "dense", "--mode", "best"], "argument --mode: invalid choice: 'best'"),
    (["--task", "net.yaml", "--recipes", "dense", "--dry_run", "--report_only"], "not allowed with argument"),
    (["--task", "net.yaml", "--recipes", "asp_2of4"],
     "'net/asp_2of4' (ASP) fine-tunes a trained dense model of 'net', but no dense run of that task is among the "
     "rows: add `dense` to `--recipes`"),
    (["--task", "net.yaml", "cfg/net.yaml", "--recipes", "dense"],
     "'net.yaml + configs/recipes/dense.yaml' and 'cfg/net.yaml + configs/recipes/dense.yaml' have the same run "
     "name 'net/dense'"),
    (["--task", "net.yaml", "--recipes", "dense", "dense"], "is given twice."),
    (["--configs", "two.yaml"], "`--configs` 'two.yaml' has 2 recipe callbacks"),
    (["--configs", "broken.yaml"], "`--configs` 'broken.yaml' is not valid YAML"),
    (["--report_only", "--output", "nothing"], "`--output` 'nothing' holds no runs"),
])
def test_user_errors_exit_2_naming_the_flag(in_tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    write_task(in_tmp / "net.yaml")
    (in_tmp / "cfg").mkdir()
    write_task(in_tmp / "cfg" / "net.yaml")
    write_task(in_tmp / "two.yaml", STEP, ASP)
    (in_tmp / "broken.yaml").write_text("trainer: [unclosed\n")
    assert main(argv) == 2
    assert message in capsys.readouterr().err.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    assert not (in_tmp / "logs").exists()


def test_every_problem_is_reported_at_once(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--task", "gone.yaml", "--recipes", "nope", "--seeds", "-1"]) == 2
    err = capsys.readouterr().err
    assert "`--seeds` -1" in err and "'gone.yaml' does not exist" in err and "`--recipes` 'nope'" in err


def test_python_m_step_lightning_compare_dispatches(capsys: pytest.CaptureFixture[str]) -> None:
    from step_lightning.__main__ import main as entry

    with pytest.raises(SystemExit) as exit_info:
        entry(["compare", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m step_lightning compare") and "--recipes" in printed


@pytest.mark.slow
def test_compare_three_recipes_end_to_end(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--task", str(QUICKSTART), "--recipes", "asp_2of4", "step_2of4", "dense", "--quiet",
                 "--extra", "--config", str(DEBUG), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
                 "false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = in_tmp / "logs" / "compare"
    assert [line.split(":")[0] for line in captured.out.splitlines() if line.startswith("[")] == [
        "[1/3] quickstart/dense seed 0", "[1/3] quickstart/dense seed 0", "[2/3] quickstart/asp_2of4 seed 0",
        "[2/3] quickstart/asp_2of4 seed 0", "[3/3] quickstart/step_2of4 seed 0", "[3/3] quickstart/step_2of4 seed 0"]

    # The ASP run fine-tuned the dense run's last checkpoint.
    dense_ckpt = Path("logs/compare/quickstart/dense/seed0/checkpoints/last.ckpt")
    assert (in_tmp / dense_ckpt).is_file()
    asp_output = (out / "quickstart" / "asp_2of4" / "seed0" / "output.log").read_text()
    assert f"Initialised ImageClassifier from --init_from {dense_ckpt}." in asp_output

    table = read_table(out)
    assert list(table) == ["quickstart/asp_2of4", "quickstart/step_2of4", "quickstart/dense"]  # --recipes' order
    for name, cells in table.items():
        assert cells[2] == "1" and cells[-1] == "ok", (name, cells)
        assert 0.0 <= float(cells[3]) <= 1.0 and 0.0 <= float(cells[4]) <= 1.0  # best, final val/acc
        assert cells[6].endswith(" s")  # wall time
    assert [table[n][:2] for n in table] == [["asp", "2:4"], ["step", "2:4"], ["dense", "–"]]
    assert table["quickstart/step_2of4"][5].isdigit() and table["quickstart/dense"][5] == "–"
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        record = json.loads((out / run["name"] / "seed0" / "run.json").read_text())
        assert record["exit_code"] == 0 and record["wall_seconds"] > 0
        assert record["command"].startswith(shlex.join([sys.executable, "-m", "step_lightning", "fit"]))
    assert (out / "val_curves.png").is_file()
    # The report of the logs alone finds the recipes in the configs the runs saved.
    capsys.readouterr()
    assert main(["--report_only"]) == 0
    assert read_table(out)["quickstart/step_2of4"][:2] == ["step", "2:4"]


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(in_tmp / "net.yaml")
    task.write_text(task.read_text() + "  max_epoch: 1\n")  # a typo: `fit` exits with code 2 while parsing
    assert main(["--task", str(task), "--recipes", "asp_2of4", "dense", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "net/dense seed 0: FAILED (exit code 2; output: " in err and "max_epoch" in err
    assert "net/asp_2of4 seed 0: FAILED (not started: the dense checkpoint" in err
    table = read_table(in_tmp / "logs" / "compare")
    assert table["net/dense"][2:] == ["0", "n/a", "n/a", "–", "n/a", "failed: seed 0"]
    assert table["net/asp_2of4"][-1] == "failed: seed 0"
    record = json.loads((in_tmp / "logs" / "compare" / "net" / "asp_2of4" / "seed0" / "run.json").read_text())
    assert record["exit_code"] is None and "does not exist" in record["error"]
