"""A run that crashes or is killed (`kill -9`) mid-epoch resumes from last.ckpt and ends exactly as an
uninterrupted run: same weights, optimizer state, masks and switch step (CPU, deterministic)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from step_lightning.cli import QUICKSTART, main
from tests.test_cli import DEBUG

SWITCH = 5  # 2 epochs x 6 steps; last.ckpt every 4 steps and after each epoch's validation: 4, 6, 8, 12


class CrashAt(pl.Callback):
    """Ends the process at an optimizer step: an exception, or SIGKILL (no clean-up of any kind)."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step = step
        self.kill = kill

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt(f"crash at step {self.step}")


def _config(tmp: Path, crash: dict[str, Any] | None = None) -> Path:
    config = yaml.safe_load(QUICKSTART.read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if "Checkpoint" not in c["class_path"]]
    callbacks.insert(0, {"class_path": "step_lightning.callbacks.LastCheckpoint",
                         "init_args": {"every_n_train_steps": 4}})
    if crash is not None:
        callbacks.insert(0, {"class_path": "tests.test_fault_tolerance.CrashAt", "init_args": crash})
    recipe = {"class_path": "step_lightning.STEPCallback", "init_args": {"n": 2, "m": 4, "switch": SWITCH}}
    path = tmp / f"run_{'crash' if crash else 'ref'}.yaml"
    path.write_text(yaml.safe_dump(config | {"trainer": config["trainer"] | {"callbacks": callbacks},
                                             "recipe": recipe}))
    return path


def _final(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def _assert_same_end(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index, state in opt_a.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b[index][name]), (index, name)
    step_a = next(v for k, v in a["callbacks"].items() if k.startswith("STEPCallback"))
    step_b = next(v for k, v in b["callbacks"].items() if k.startswith("STEPCallback"))
    assert step_a["switch_step"] == step_b["switch_step"] == SWITCH
    assert step_a["optimizer_steps"] == step_b["optimizer_steps"] == 12
    assert step_a["masks"].keys() == step_b["masks"].keys() and step_a["masks"]
    for name, mask in step_a["masks"].items():
        assert torch.equal(mask, step_b["masks"][name]), name


def _reference(tmp: Path) -> dict[str, Any]:
    main(["fit", "--config", str(_config(tmp)), "--config", str(DEBUG)])
    return _final(tmp / "logs" / "run_ref" / "step_2of4" / "version_0")


@pytest.mark.slow
@pytest.mark.parametrize(("crash_step", "resume_step"), [
    (5, 4),  # mid-epoch, before the switch (the crash comes before STEP's end-of-step work of step 5)
    (7, 6),  # at the epoch boundary (last.ckpt after epoch 0's validation), after the switch
    (10, 8),  # mid-epoch, after the switch
])
def test_crash_then_resume_equals_uninterrupted(in_tmp: Path, crash_step: int, resume_step: int) -> None:
    reference = _reference(in_tmp)
    config = _config(in_tmp, {"step": crash_step})
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["fit", "--config", str(config), "--config", str(DEBUG)])
    run = in_tmp / "logs" / "run_crash" / "step_2of4" / "version_0"
    assert _final(run)["global_step"] == resume_step
    main(["fit", "--config", str(config.with_name("run_ref.yaml")), "--config", str(DEBUG),
          "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    _assert_same_end(reference, _final(in_tmp / "logs" / "run_ref" / "step_2of4" / "version_1"))


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(in_tmp: Path) -> None:
    reference = _reference(in_tmp)
    config = _config(in_tmp, {"step": 10, "kill": True})
    result = subprocess.run([sys.executable, "-m", "step_lightning", "fit", "--config", str(config), "--config",
                             str(DEBUG)], cwd=in_tmp, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    run = in_tmp / "logs" / "run_crash" / "step_2of4" / "version_0" / "checkpoints"
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt"]  # no partial or temporary file
    assert _final(run.parent)["global_step"] == 8
    main(["fit", "--config", str(config.with_name("run_ref.yaml")), "--config", str(DEBUG),
          "--ckpt_path", str(run / "last.ckpt")])
    _assert_same_end(reference, _final(in_tmp / "logs" / "run_ref" / "step_2of4" / "version_1"))


@pytest.mark.slow
def test_two_process_ddp_crash_mid_epoch_then_resume_equals_uninterrupted(in_tmp: Path) -> None:
    # Shuffled data under DDP: each rank's DistributedSampler order is a function of seed and epoch, so the
    # resumed loaders fast-forward to exactly the batches the uninterrupted run saw (crash in epoch 1).
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.limit_train_batches", "6"]

    def fit(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "step_lightning", "fit", "--config", str(config), "--config",
                               str(DEBUG), *ddp, *extra], cwd=in_tmp, env=env, capture_output=True, text=True,
                              timeout=400)

    reference = fit(_config(in_tmp))
    assert reference.returncode == 0, reference.stderr[-3000:]
    crashed = fit(_config(in_tmp, {"step": 10}))
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    run = in_tmp / "logs" / "run_crash" / "step_2of4" / "version_0"
    assert _final(run)["global_step"] == 8
    resumed = fit(_config(in_tmp), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_end(_final(in_tmp / "logs" / "run_ref" / "step_2of4" / "version_0"),
                     _final(in_tmp / "logs" / "run_ref" / "step_2of4" / "version_1"))
