"""`python -m step_lightning compare`: run order and ASP wiring, the report from TensorBoard logs, user errors."""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from step_lightning.cli import QUICKSTART
from step_lightning.compare import Recipe, main, recipe_of_config

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
STEP = {"class_path": "step_lightning.STEPCallback", "init_args": {"n": 2, "m": 4}}
ASP = {"class_path": "step_lightning.ASPCallback", "init_args": {"n": 2, "m": 4, "prune_at": 0}}
CHECKPOINT = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, *callbacks: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [*callbacks, CHECKPOINT]}}))
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
            if line.startswith("| ") and not line.startswith("| config ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_recipe_is_read_from_the_callbacks() -> None:
    assert recipe_of_config({}) == Recipe("dense")
    assert recipe_of_config({"trainer": {"callbacks": [CHECKPOINT]}}) == Recipe("dense")
    assert recipe_of_config({"trainer": {"callbacks": ["step_lightning.SRSTECallback"]}}) == Recipe("srste", 2, 4)
    assert recipe_of_config({"trainer": {"callbacks": [
        {"class_path": "step_lightning.callbacks.step.STEPCallback", "init_args": {"n": 1, "m": 8}}]}}) == \
        Recipe("step", 1, 8)
    assert recipe_of_config({"trainer": {"callbacks": [{"class_path": "step_lightning.ASPCallback"}]}}) == \
        Recipe("asp", 2, 4, finetunes_dense=True)
    late = {"class_path": "step_lightning.ASPCallback", "init_args": {"prune_at": 0.5}}
    assert recipe_of_config({"trainer": {"callbacks": late}}) == Recipe("asp", 2, 4, finetunes_dense=False)


def test_report_from_tensorboard_logs(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = write_config(in_tmp / "cfg" / "net_dense_2of4.yaml")
    step = write_config(in_tmp / "cfg" / "net_step_1of4.yaml",
                        {"class_path": "step_lightning.STEPCallback", "init_args": {"n": 1}})
    out = in_tmp / "logs" / "compare"
    steps = [10, 20, 30]
    # dense: wall time from run.json (100 s, 200 s); STEP: from the events (20 s, 40 s between first and last).
    write_run(out / "net_dense_2of4" / "seed0", [0.5, 0.7, 0.6], steps, 1000.0, 10.0,
              record={"command": "...", "exit_code": 0, "wall_seconds": 100.0})
    write_run(out / "net_dense_2of4" / "seed1", [0.4, 0.8, 0.7], steps, 1000.0, 10.0,
              record={"command": "...", "exit_code": 0, "wall_seconds": 200.0})
    write_run(out / "net_step_1of4" / "seed0", [0.3, 0.9, 0.85], steps, 5000.0, 10.0, switch=12.0)
    write_run(out / "net_step_1of4" / "seed1", [0.5, 0.6, 0.95], steps, 5000.0, 20.0, switch=14.0)

    assert main(["--configs", str(dense), str(step), "--report_only"]) == 0
    printed = capsys.readouterr().out
    table = read_table(out)
    # best: mean ± sample std of (0.7, 0.8) and (0.9, 0.95); final: of (0.6, 0.7) and (0.85, 0.95)
    assert table == {
        "net_dense_2of4": ["dense", "–", "2", "0.7500 ± 0.0707", "0.6500 ± 0.0707", "–", "2.5 min", "ok"],
        "net_step_1of4": ["step", "1:4", "2", "0.9250 ± 0.0354", "0.9000 ± 0.0707", "13", "30.0 s", "ok"],
    }
    assert "| net_step_1of4 | step | 1:4 | 2 | 0.9250 ± 0.0354 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "val/acc" and results["mode"] == "max"
    runs = {(r["name"], r["seed"]): r for r in results["runs"]}
    assert len(runs) == 4
    assert runs["net_step_1of4", 1]["best"] == pytest.approx(0.95) and runs["net_step_1of4", 1]["best_step"] == 30
    assert runs["net_step_1of4", 0]["final"] == pytest.approx(0.85) and runs["net_step_1of4", 0]["switch_step"] == 12
    assert runs["net_step_1of4", 1]["wall_seconds"] == pytest.approx(40.0)
    assert runs["net_step_1of4", 1]["wall_source"] == "events"
    assert runs["net_dense_2of4", 0]["wall_seconds"] == 100.0 and runs["net_dense_2of4", 0]["wall_source"] == "run.json"
    rows = {r["name"]: r for r in results["configs"]}
    assert rows["net_dense_2of4"]["best_mean"] == pytest.approx(0.75)
    assert rows["net_step_1of4"]["switch_step_mean"] == 13.0 and rows["net_step_1of4"]["seeds"] == [0, 1]
    assert (out / "val_curves.png").stat().st_size > 1000

    # --mode min on another scalar; one seed only: no ± std.
    assert main(["--configs", str(dense), str(step), "--report_only", "--metric", "train/loss", "--mode", "min",
                 "--seeds", "1"]) == 0
    assert read_table(out)["net_dense_2of4"][3:5] == ["0.2000", "0.3000"]

    # Without --configs: every run under --output, its recipe unknown without the config.yaml a real run saves.
    capsys.readouterr()
    assert main(["--report_only"]) == 0
    assert read_table(out)["net_step_1of4"] == ["?", "–", "2", "0.9250 ± 0.0354", "0.9000 ± 0.0707", "13", "30.0 s",
                                                "ok"]


def test_report_shows_failed_missing_and_metricless_runs(in_tmp: Path) -> None:
    config = write_config(in_tmp / "net_srste_2of4.yaml", "step_lightning.SRSTECallback")
    out = in_tmp / "logs" / "compare" / "net_srste_2of4"
    write_run(out / "seed0", [0.5], [10], 0.0, 1.0, record={"exit_code": 0, "wall_seconds": 3.0})
    write_run(out / "seed1", [0.1], [10], 0.0, 1.0, record={"exit_code": 1, "wall_seconds": 1.0})
    assert main(["--configs", str(config), "--seeds", "0", "1", "2", "--report_only"]) == 1
    assert read_table(in_tmp / "logs" / "compare")["net_srste_2of4"] == [
        "srste", "2:4", "1", "0.5000", "0.5000", "–", "3.0 s", "failed: seed 1; missing: seed 2"]

    # A run that logged no val/acc (e.g. no validation data) shows n/a rather than crashing.
    assert main(["--configs", str(config), "--seeds", "0", "--report_only", "--metric", "val/f1"]) == 0
    assert read_table(in_tmp / "logs" / "compare")["net_srste_2of4"] == [
        "srste", "2:4", "0", "n/a", "n/a", "–", "3.0 s", "no metric: seed 0"]
    assert (in_tmp / "logs" / "compare" / "val_curves.png").is_file()


def test_dry_run_order_init_from_and_extra(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = write_config(in_tmp / "cfg" / "net_step_2of4.yaml", STEP)
    asp = write_config(in_tmp / "cfg" / "net_asp_2of4.yaml", ASP)
    dense = write_config(in_tmp / "cfg" / "net_dense_2of4.yaml")
    late_asp = write_config(in_tmp / "other.yaml", {**ASP, "init_args": {"prune_at": 0.5}})  # prunes its own run
    code = main(["--configs", str(step), str(asp), str(late_asp), str(dense), "--seeds", "0", "1",
                 "--output", "out dir", "--dry_run", "--extra", "--config", "debug.yaml", "--trainer.max_epochs", "1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines]
    assert [(c[c.index("--config") + 1], c[c.index("--seed_everything") + 1]) for c in commands] == [
        (str(dense), "0"), (str(dense), "1"), (str(step), "0"), (str(step), "1"),
        (str(asp), "0"), (str(asp), "1"), (str(late_asp), "0"), (str(late_asp), "1")]
    for command in commands:
        assert command[:5] == [sys.executable, "-m", "step_lightning", "fit", "--config"]
        assert command[6:10] == ["--config", "debug.yaml", "--trainer.max_epochs", "1"]  # --extra, verbatim
        name, seed = Path(command[5]).stem, command[command.index("--seed_everything") + 1]
        assert command[12:16] == ["--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                                  "--trainer.logger.save_dir=out dir", f"--trainer.logger.name={name}",
                                  f"--trainer.logger.version=seed{seed}"]
        expected = [f"out dir/net_dense_2of4/seed{seed}/checkpoints/last.ckpt"] if name == "net_asp_2of4" else []
        assert command[16:] == (["--init_from", *expected] if expected else [])
    assert "'out dir/net_dense_2of4/seed1/checkpoints/last.ckpt'" in lines[5]  # shell-quoted
    assert not (in_tmp / "out dir").exists()  # a dry run writes nothing


def test_warns_when_the_dense_run_keeps_no_last_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = in_tmp / "net_dense_2of4.yaml"
    dense.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks."
                                                                              "ModelCheckpoint"}]}}))
    asp = write_config(in_tmp / "net_asp_2of4.yaml", ASP)
    assert main(["--configs", dense.name, asp.name, "--dry_run"]) == 0
    err = capsys.readouterr().err
    assert "warning: `--configs` 'net_dense_2of4.yaml' has no LastCheckpoint nor ModelCheckpoint(save_last=true)" in err
    write_config(dense)
    assert main(["--configs", dense.name, asp.name, "--dry_run"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_skip_finished_keeps_runs_that_finished(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(in_tmp / "net_dense_2of4.yaml")
    finished = in_tmp / "logs" / "compare" / "net_dense_2of4" / "seed0"
    finished.mkdir(parents=True)
    (finished / "run.json").write_text(json.dumps({"exit_code": 0, "wall_seconds": 1.0}))
    assert main(["--configs", str(config), "--seeds", "0", "1", "--dry_run", "--if_exists", "skip_finished"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "--seed_everything 1" in lines[0]

    # Without --if_exists nothing runs: the old events would mix into the new run's.
    assert main(["--configs", str(config), "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert f"`--output` 'logs/compare' already holds the runs {Path('logs/compare/net_dense_2of4/seed0')}" in err
    assert "--if_exists overwrite" in err
    assert not (finished.parent / "seed1").exists()


@pytest.mark.parametrize(("argv", "message"), [
    ([], "`--configs` is empty: give at least one config"),
    (["--configs", "missing.yaml"], "`--configs` 'missing.yaml' does not exist or is not a file."),
    (["--configs", "net_dense_2of4.yaml", "--seeds", "1", "-2"], "`--seeds` -2 is negative"),
    (["--configs", "net_dense_2of4.yaml", "--seeds", "1", "1"], "`--seeds` 1 1 repeats a seed."),
    (["--configs", "net_dense_2of4.yaml", "--seeds", "one"], "argument --seeds: invalid int value: 'one'"),
    (["--configs", "net_dense_2of4.yaml", "--seed", "1"], "unrecognized arguments: --seed 1"),
    (["--configs", "net_dense_2of4.yaml", "--mode", "best"], "argument --mode: invalid choice: 'best'"),
    (["--configs", "net_dense_2of4.yaml", "--dry_run", "--report_only"], "not allowed with argument"),
    (["--configs", "cfg/net_asp_2of4.yaml"],
     "`--configs` 'cfg/net_asp_2of4.yaml' (ASP) fine-tunes the dense model trained by 'cfg/net_dense_2of4.yaml': "
     "add 'cfg/net_dense_2of4.yaml' to `--configs`."),
    (["--configs", "net_dense_2of4.yaml", "cfg/net_asp_2of4.yaml"], "add 'cfg/net_dense_2of4.yaml' to `--configs`"),
    (["--configs", "asp.yaml"], "`--configs` 'asp.yaml' fine-tunes a dense model (ASPCallback with prune_at 0) but "
                                "its name does not follow `<model>_asp_<n>of<m>.yaml`"),
    (["--configs", "net_dense_2of4.yaml", "cfg/net_dense_2of4.yaml"],
     "`--configs` 'net_dense_2of4.yaml' and 'cfg/net_dense_2of4.yaml' have the same name 'net_dense_2of4'"),
    (["--configs", "net_dense_2of4.yaml", "./net_dense_2of4.yaml"],
     "`--configs` 'net_dense_2of4.yaml' is given twice."),
    (["--configs", "two.yaml"], "`--configs` 'two.yaml' has 2 recipe callbacks (step, asp)"),
    (["--configs", "broken.yaml"], "`--configs` 'broken.yaml' is not valid YAML"),
    (["--report_only", "--output", "nothing"], "`--output` 'nothing' holds no runs"),
])
def test_user_errors_exit_2_naming_the_flag(in_tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    write_config(in_tmp / "net_dense_2of4.yaml")
    write_config(in_tmp / "cfg" / "net_dense_2of4.yaml")
    write_config(in_tmp / "cfg" / "net_asp_2of4.yaml", ASP)
    write_config(in_tmp / "asp.yaml", ASP)
    write_config(in_tmp / "two.yaml", STEP, ASP)
    (in_tmp / "broken.yaml").write_text("trainer: [unclosed\n")
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (in_tmp / "logs").exists()


def test_every_problem_is_reported_at_once(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(in_tmp / "net_asp_2of4.yaml", ASP)
    assert main(["--configs", "net_asp_2of4.yaml", "gone.yaml", "--seeds", "-1"]) == 2
    err = capsys.readouterr().err
    assert "`--seeds` -1" in err and "'gone.yaml' does not exist" in err and "add 'net_dense_2of4.yaml'" in err


def test_script_wrapper(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_recipes.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m step_lightning compare") and "--report_only" in printed


def _quickstart_variants(directory: Path) -> list[Path]:
    """tiny_{dense,step,asp}_2of4.yaml: the quickstart without STEP, as is, and with ASP (prune_at 0) for STEP."""
    quickstart = yaml.safe_load(QUICKSTART.read_text())
    others = [c for c in quickstart["trainer"]["callbacks"] if not c["class_path"].endswith("STEPCallback")]
    paths = []
    for recipe, callbacks in (("dense", others), ("step", quickstart["trainer"]["callbacks"]),
                              ("asp", [ASP, *others])):
        config = copy.deepcopy(quickstart)
        config["trainer"]["callbacks"] = callbacks
        path = directory / f"tiny_{recipe}_2of4.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_compare_three_recipes_end_to_end(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, step, asp = _quickstart_variants(in_tmp)
    code = main(["--configs", str(asp), str(step), str(dense), "--quiet",
                 "--extra", "--config", str(DEBUG), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
                 "false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = in_tmp / "logs" / "compare"
    assert [line.split(":")[0] for line in captured.out.splitlines() if line.startswith("[")] == [
        "[1/3] tiny_dense_2of4 seed 0", "[1/3] tiny_dense_2of4 seed 0", "[2/3] tiny_asp_2of4 seed 0",
        "[2/3] tiny_asp_2of4 seed 0", "[3/3] tiny_step_2of4 seed 0", "[3/3] tiny_step_2of4 seed 0"]

    # The ASP run fine-tuned the dense run's last checkpoint.
    dense_ckpt = Path("logs/compare/tiny_dense_2of4/seed0/checkpoints/last.ckpt")
    assert (in_tmp / dense_ckpt).is_file()
    asp_output = (out / "tiny_asp_2of4" / "seed0" / "output.log").read_text()
    assert f"Initialised ImageClassifier from --init_from {dense_ckpt}." in asp_output

    table = read_table(out)
    assert list(table) == ["tiny_asp_2of4", "tiny_step_2of4", "tiny_dense_2of4"]  # the order of --configs
    for name, cells in table.items():
        assert cells[2] == "1" and cells[-1] == "ok", (name, cells)
        assert 0.0 <= float(cells[3]) <= 1.0 and 0.0 <= float(cells[4]) <= 1.0  # best, final val/acc
        assert cells[6].endswith(" s")  # wall time
    assert [table[n][:2] for n in table] == [["asp", "2:4"], ["step", "2:4"], ["dense", "–"]]
    assert table["tiny_step_2of4"][5].isdigit() and table["tiny_dense_2of4"][5] == "–"
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        record = json.loads((out / run["name"] / "seed0" / "run.json").read_text())
        assert record["exit_code"] == 0 and record["wall_seconds"] > 0
        assert record["command"].startswith(shlex.join([sys.executable, "-m", "step_lightning", "fit"]))
    assert (out / "val_curves.png").is_file()


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = write_config(in_tmp / "net_dense_2of4.yaml")
    dense.write_text(dense.read_text() + "  max_epoch: 1\n")  # a typo: `fit` exits with code 2 while parsing
    asp = write_config(in_tmp / "net_asp_2of4.yaml", ASP)
    assert main(["--configs", str(asp), str(dense), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "net_dense_2of4 seed 0: FAILED (exit code 2; output: " in err and "max_epoch" in err
    assert "net_asp_2of4 seed 0: FAILED (not started: the dense checkpoint" in err
    table = read_table(in_tmp / "logs" / "compare")
    assert table["net_dense_2of4"][2:] == ["0", "n/a", "n/a", "–", "n/a", "failed: seed 0"]
    assert table["net_asp_2of4"][-1] == "failed: seed 0"
    record = json.loads((in_tmp / "logs" / "compare" / "net_asp_2of4" / "seed0" / "run.json").read_text())
    assert record["exit_code"] is None and "does not exist" in record["error"]
