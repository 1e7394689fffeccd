"""Lightning's conventions through the real CLI: `default_root_dir`, a clean console, one-line errors."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from step_lightning.cli import QUICKSTART, main

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


def test_the_default_is_logs_in_the_working_directory(in_tmp: Path) -> None:
    cli = main(SHORT)
    assert Path(cli.trainer.log_dir) == Path("logs") / "quickstart" / "step_2of4" / "version_0"
    assert cli.trainer.logger._default_hp_metric is False  # type: ignore[union-attr]  # no -1 placeholder


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
