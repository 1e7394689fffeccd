"""Lightning's conventions through the real CLI: `default_root_dir`, a clean console, one-line errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from step_lightning import cli as cli_module
from step_lightning.cli import QUICKSTART, StepLightningCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBUG = CONFIGS / "debug.yaml"
SHORT = ["fit", "--config", str(QUICKSTART), "--config", str(DEBUG), "--trainer.max_epochs", "1"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_default_root_dir_holds_logs_and_checkpoints(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = main([*SHORT, "--trainer.default_root_dir", "runs"])
    run_dir = Path("runs") / "logs" / "quickstart" / "step_2of4" / "version_0"
    assert Path(cli.trainer.log_dir) == run_dir
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert (run_dir / "export" / "model.pt").is_file() and (run_dir / "autoswitch.png").is_file()
    out = capsys.readouterr().out
    assert f"last checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in out
    assert f"tensorboard --logdir {run_dir.parent}" in out
    assert not (in_tmp / "logs").exists()  # nothing in the working directory's default folder

    # An explicit logger still wins.
    cli = main([*SHORT, "--trainer.default_root_dir", "runs", "--trainer.logger",
                "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "elsewhere"])
    assert Path(cli.trainer.log_dir) == Path("elsewhere") / "lightning_logs" / "version_0"
    assert (Path("elsewhere") / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_a_csv_logger_run_keeps_the_figure_the_table_and_the_export(in_tmp: Path) -> None:
    cli = main([*SHORT, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "csv"])
    run_dir = Path("csv") / "lightning_logs" / "version_0"
    assert Path(cli.trainer.log_dir) == run_dir
    for name in ("autoswitch.png", "sparsity_layers.md", "metrics.csv", "export/model.pt", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "autoswitch.png").read_bytes().startswith(b"\x89PNG")
    assert "| net.fc.0.weight | 128x64 | 2:4 | 0.500 |" in (run_dir / "sparsity_layers.md").read_text()
    assert "train/loss" in (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")


def test_the_default_is_logs_in_the_working_directory(in_tmp: Path) -> None:
    cli = main(SHORT)
    assert Path(cli.trainer.log_dir) == Path("logs") / "quickstart" / "step_2of4" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"] and "hp_metric" not in events.Tags()["scalars"]  # no -1 placeholder


def test_a_short_fit_prints_no_weights_only_notice(in_tmp: Path) -> None:
    records = _Records()
    lightning_log = logging.getLogger("lightning.pytorch")  # it does not propagate
    lightning_log.addHandler(records)
    previous = lightning_log.level
    lightning_log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(SHORT)  # LastCheckpoint saves after the validation: each save used to log the notice
    finally:
        lightning_log.removeHandler(records)
        lightning_log.setLevel(previous)
    assert (Path("logs") / "quickstart" / "step_2of4" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert any("max_epochs=1" in m for m in records.messages)  # the handler does see Lightning's messages
    said = records.messages + [str(w.message) for w in caught]
    assert not [m for m in said if "weights_only" in m]


def test_a_value_our_classes_reject_ends_with_our_message_alone() -> None:
    # The real command line: what the user sees is the whole of stderr and the exit code.
    result = subprocess.run([sys.executable, "-m", "step_lightning", "fit", "--recipe.init_args.n", "5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: STEPCallback: `n`:`m` = 5:4 is not a valid N:M ratio (N kept of every M): need 0 < n < m, e.g. 2:4, "
        "1:4, 1:8, 4:8.")
    assert "Traceback" not in result.stderr and "Given value" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--model.init_args.width", "20"], "error: SmallCNN `width` must be a multiple of 16"),
    (["--trainer.callbacks+=step_lightning.callbacks.LastCheckpoint",
      "--trainer.callbacks.init_args.every_n_train_steps", "-1"],
     "error: LastCheckpoint: `every_n_train_steps` must be an integer >= 0, got -1."),
])
def test_every_constructor_check_is_one_line(in_tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                             message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and len(err) == 1, err


def test_debug_mode_and_errors_not_ours_keep_their_traceback(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    with pytest.raises(ValueError, match="5:4 is not a valid N:M ratio"):
        main(["fit", "--recipe.init_args.n", "5"])
    monkeypatch.delenv("JSONARGPARSE_DEBUG")
    # Lightning's own check of a Trainer argument is not ours to reword.
    with pytest.raises(Exception, match="val_check_interval") as err:
        main(["fit", "--config", str(QUICKSTART), "--trainer.val_check_interval", "-3"])
    assert not isinstance(err.value, SystemExit)


@pytest.mark.parametrize(("native", "warned"), [(False, "has no bf16 units"), (None, "unknown here"), (True, None)])
def test_bf16_on_a_cpu_without_bf16_units_warns_once(in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                     native: bool | None, warned: str | None) -> None:
    monkeypatch.setattr(cli_module, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StepLightningCLI(args=["--config", str(QUICKSTART), "--trainer.accelerator", "cpu",
                               "--trainer.precision", "bf16-mixed"], run=False)
    said = [str(w.message) for w in caught if "bf16" in str(w.message)]
    if warned is None:
        assert not said
    else:
        assert len(said) == 1 and warned in said[0] and "`--trainer.precision 32-true`" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # fp32: nothing to say
        warnings.simplefilter("always")
        StepLightningCLI(args=["--config", str(QUICKSTART), "--trainer.accelerator", "cpu"], run=False)
    assert not [w for w in caught if "bf16" in str(w.message)]


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    assert cli_module.cpu_has_native_bf16(info) is None  # no such file: unknown
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cli_module.cpu_has_native_bf16(info) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cli_module.cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Arm
    assert cli_module.cpu_has_native_bf16(info) is True
