"""Distributed training and fault tolerance on CPU (gloo): ranks agree, disagreement is caught, NaN is reported.

The multi-process tests start their processes in new sessions with a deadline and kill every process
they started (and its descendants) on failure, so that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import step_lightning.callbacks.nonfinite as nonfinite
import step_lightning.sparsity.fingerprint as fingerprint
from step_lightning import STEPCallback, nm_mask
from step_lightning.sparsity import describe_rank_mismatch, mask_fingerprint
from tests.conftest import TARGETS, TinyModule, tiny_loaders, tiny_trainer

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
HERE = Path(__file__).resolve().parent
BATCHNORM_BUFFERS = ["net.norm.num_batches_tracked", "net.norm.running_mean", "net.norm.running_var"]


# --------------------------------------------------------------------------------------------------
# Launching processes without leaving any behind
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # torchrun starts its workers in sessions of their own: collect them before the agent goes.
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _run_together(cmds: list[list[str]], cwd: Path, timeout: float) -> list[tuple[int | None, str]]:
    """Start every command at once; return (exit code, stdout+stderr) of each; kill all on timeout/failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    logs = [cwd / f"process{i}.log" for i in range(len(cmds))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd, log in zip(cmds, logs, strict=True):
            with log.open("wb") as out:
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            _kill_tree(proc)
    return [(proc.returncode, log.read_text(errors="replace")) for proc, log in zip(procs, logs, strict=True)]


# --------------------------------------------------------------------------------------------------
# Two "nodes" on loopback through torchrun, the quickstart through the CLI
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_torchrun_nodes_end_with_identical_masks_and_switch_step(tmp_path: Path) -> None:
    # scripts/torchrun_multinode.sh on two "nodes" on loopback: it runs `torchrun ... -m step_lightning fit`.
    dump = tmp_path / "dump"
    extra = ["--config", str(CONFIGS / "debug.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.callbacks+=tests.distributed.mask_dump.MaskDump", "--trainer.callbacks.out_dir", str(dump)]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NNODES": "2", "GPUS_PER_NODE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    cmds = [["env", f"NODE_RANK={node}", *(f"{k}={v}" for k, v in env.items()), "bash",
             str(REPO / "scripts" / "torchrun_multinode.sh"), str(CONFIGS / "quickstart.yaml"), *extra]
            for node in (0, 1)]
    (code0, out0), (code1, out1) = _run_together(cmds, tmp_path, timeout=240)
    assert code0 == 0 and code1 == 0, f"node 0:\n{out0[-3000:]}\nnode 1:\n{out1[-3000:]}"

    # The rank check ran at the switch (inside the run, decided by AutoSwitch on rank 0) and at the end.
    assert "STEPCallback: all 2 ranks agree when the masks came into use" in out0
    assert "STEPCallback: all 2 ranks agree at the end of fit (optimizer step 12)" in out0
    assert (out0 + out1).count("step_lightning fit finished.") == 1

    # And, independently of the check, the per-rank dumps are identical.
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["phase"] == rank1["phase"] == "mask_learning"
    assert rank0["switch_step"] is not None and rank0["switch_step"] == rank1["switch_step"] < 12
    assert rank0["optimizer_steps"] == rank1["optimizer_steps"] == 12
    assert rank0["masks"].keys() == rank1["masks"].keys() and len(rank0["masks"]) == 3
    for name in rank0["masks"]:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name


# --------------------------------------------------------------------------------------------------
# Two processes through Lightning's DDP launcher: one rank perturbed before the end-of-fit check
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perturbed_ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int | None, str, Path]:
    out = tmp_path_factory.mktemp("ddp")
    [(code, log)] = _run_together([[sys.executable, str(HERE / "ddp_run.py"), str(out), "--perturb-rank", "1"]],
                                  out, timeout=180)
    return code, log, out


@pytest.mark.slow
def test_rank_check_names_the_ranks_and_what_differs(perturbed_ddp_run: tuple[int | None, str, Path]) -> None:
    code, log, out = perturbed_ddp_run
    assert code not in (0, None), log[-3000:]
    # The check at the switch passed: the ranks agreed until rank 1 was perturbed at the end.
    assert "all 2 ranks agree when the masks came into use (optimizer step 3)" in log
    error = (out / "error_rank0.txt").read_text()
    assert error.startswith("STEPCallback: the 2 DDP ranks disagree at the end of fit (rank 0: optimizer step 6, "
                            "masks active 1, switch step 3): rank 1: switch step 4 (rank 0: 3); mask of "
                            "net.fc1.weight: same kept count 2048, other positions.")
    assert "net.conv.weight" not in error and "net.fc2.weight" not in error
    for cause in ("non-deterministic kernels", "started from different weights", "different numbers of steps"):
        assert cause in error


@pytest.mark.slow
def test_ddp_never_broadcasts_masks(perturbed_ddp_run: tuple[int | None, str, Path]) -> None:
    _, _, out = perturbed_ddp_run
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2 and report["switch_step"] == 3
        # DDP did broadcast module buffers during training (the spy works) ...
        assert report["broadcast_tensors"] > 0 and report["broadcast_buffer_names"] == BATCHNORM_BUFFERS
        # ... and none of them was a mask or a masked-weight storage, which are no module buffers either.
        assert report["recipe_storages_broadcast"] == 0
        assert report["recipe_storages_in_module_buffers"] == 0


# --------------------------------------------------------------------------------------------------
# The pure pieces of the rank check
# --------------------------------------------------------------------------------------------------
def test_mask_fingerprint_counts_kept_entries_and_hashes_their_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    masks = [nm_mask(torch.randn(16, 32, generator=g), 2, 4, "linear"),
             nm_mask(torch.randn(8, 8, 3, 3, generator=g), 2, 4, "conv")]
    fp = mask_fingerprint(masks)
    assert fp.dtype == torch.int64 and fp.shape == (2, 2)
    assert fp[:, 0].tolist() == [16 * 32 // 2, 8 * 8 * 9 // 2]
    assert torch.equal(fp, mask_fingerprint([m.clone() for m in masks]))
    rolled = mask_fingerprint([masks[0].roll(1, dims=-1), masks[1]])
    assert rolled[0, 0] == fp[0, 0] and rolled[0, 1] != fp[0, 1] and torch.equal(rolled[1], fp[1])
    # Hashing in chunks gives the same result as in one go.
    monkeypatch.setattr(fingerprint, "_HASH_CHUNK", 7)
    assert torch.equal(mask_fingerprint(masks), fp)
    assert mask_fingerprint([]).shape == (0, 2)


def test_describe_rank_mismatch() -> None:
    scalars, layers = ["optimizer step", "switch step"], ["a.weight", "b.weight"]
    ref = [12, 30, 8, 111, 8, 222]
    rows = torch.tensor([ref, ref, [12, -1, 7, 111, 8, 223]])
    assert describe_rank_mismatch(rows[:2], scalars, layers) == []
    assert describe_rank_mismatch(rows, scalars, layers) == [
        "rank 2: switch step none (rank 0: 30); mask of a.weight: 7 kept entries (rank 0: 8); "
        "mask of b.weight: same kept count 8, other positions"
    ]
    with pytest.raises(ValueError, match=r"`fingerprints` must have shape \(world_size, 6\) for 2 scalars and 2 "
                                         r"layers, got \(3, 5\)"):
        describe_rank_mismatch(rows[:, :5], scalars, layers)


def _fake_ddp(other_rank: Any) -> Any:
    """A stand-in trainer for the checks: world size 2, rank 1's tensor made by ``other_rank(rank 0's)``."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"),
                               all_gather=lambda t: torch.stack([t, other_rank(t.clone())]))
    return SimpleNamespace(world_size=2, strategy=strategy)


def _fitted_step(tmp_path: Path) -> tuple[STEPCallback, TinyModule]:
    cb = STEPCallback(switch=2)
    pl.seed_everything(0)
    model = TinyModule()
    train, _ = tiny_loaders()
    tiny_trainer(tmp_path, [cb], max_steps=4).fit(model, train)
    return cb, model


def test_rank_checks_compare_every_rank_without_processes(tmp_path: Path) -> None:
    cb, _ = _fitted_step(tmp_path)
    cb._check_ranks(_fake_ddp(lambda t: t), "at the end of fit")  # identical ranks: passes

    def other_switch(t: torch.Tensor) -> torch.Tensor:
        t[2] += 1  # the columns: optimizer step, masks active, switch step, then (kept, hash) per layer
        return t

    with pytest.raises(RuntimeError, match=r"the 2 DDP ranks disagree at the end of fit \(rank 0: optimizer step 4, "
                                           r"masks active 1, switch step 2\): rank 1: switch step 3 \(rank 0: 2\)\."):
        cb._check_ranks(_fake_ddp(other_switch), "at the end of fit")

    # A non-finite loss on one rank only: every rank learns of it, the message names that rank.
    cb.loss_watch.record({"loss": torch.tensor(float("inf"))}, cb.optimizer_steps, cb.phase)
    finite_on_rank0 = nonfinite._NO_STEP, 0, 0
    rank0_clean = _fake_ddp(lambda t: t)
    rank0_clean.strategy.all_gather = lambda t: torch.stack([torch.tensor(finite_on_rank0), t])
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(inf\) at optimizer step 4 in phase "
                                                 r"'mask_learning' on rank 1; 1 optimizer step"):
        cb.loss_watch.check(rank0_clean, cb.optimizer_steps, "raise")


# --------------------------------------------------------------------------------------------------
# Non-finite training loss (single process)
# --------------------------------------------------------------------------------------------------
class NonFiniteFrom(TinyModule):
    """The loss is multiplied by ``value`` at optimizer step ``step`` (1-based)."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__()
        self.bad_step = step
        self.value = value

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.value if self.trainer.global_step == self.bad_step - 1 else loss


@pytest.mark.parametrize(
    ("bad_step", "value", "log_every", "message", "stopped_at"),
    [
        (2, float("nan"), 1, r"\(nan\) at optimizer step 2 in phase 'precondition'", 2),
        (5, float("inf"), 1, r"\(inf\) at optimizer step 5 in phase 'mask_learning'", 5),
        # Read at the switch (no logging step before it): still the first bad step, before the freeze fails.
        (2, float("nan"), 50, r"\(nan\) at optimizer step 2 in phase 'precondition'; 2 optimizer step\(s\) up to "
                              r"step 3", 3),
    ],
)
def test_nonfinite_loss_raises_with_step_and_phase(tmp_path: Path, bad_step: int, value: float, log_every: int,
                                                   message: str, stopped_at: int) -> None:
    cb = STEPCallback(switch=3, on_nonfinite_loss="raise")
    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [cb], max_steps=6, log_every_n_steps=log_every)
    with pytest.raises(FloatingPointError, match=r"STEPCallback: non-finite training loss " + message):
        trainer.fit(NonFiniteFrom(bad_step, value), train)
    assert cb.optimizer_steps == stopped_at


def test_nonfinite_loss_warns_once_and_logs_the_count(tmp_path: Path) -> None:
    cb = STEPCallback(switch=2)  # on_nonfinite_loss="warn" is the default
    logger = CSVLogger(tmp_path, name="run")
    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [cb], max_steps=6, logger=logger)
    with pytest.warns(UserWarning) as record:
        trainer.fit(NonFiniteFrom(3, float("nan")), train)
    ours = [str(w.message) for w in record if "non-finite training loss" in str(w.message)]
    assert len(ours) == 1 and "(nan) at optimizer step 3 in phase 'mask_learning'" in ours[0]
    assert cb.optimizer_steps == 6  # training went on; the NaN weights keep the loss NaN from step 3 on
    lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("train/nonfinite_loss_steps")
    counts = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert counts[-1] == 4.0


def test_nonfinite_loss_before_the_switch_is_warned_then_the_freeze_refuses_it(tmp_path: Path) -> None:
    # In "warn" mode training goes on, but Adam's second moment is NaN: STEP cannot freeze it. The warning
    # names the cause (the loss at step 2) before the freeze's error names the weights.
    cb = STEPCallback(switch=4)
    trainer = tiny_trainer(tmp_path, [cb], max_steps=6, log_every_n_steps=50)
    train, _ = tiny_loaders()
    with pytest.warns(UserWarning, match=r"\(nan\) at optimizer step 2 in phase 'precondition'"), \
            pytest.raises(FloatingPointError, match=r"second moment of net.conv.weight, .* holds NaN or inf"):
        trainer.fit(NonFiniteFrom(2, float("nan")), train)
    assert cb.optimizer_steps == 4 and cb.phase == "precondition"


def test_loss_of_an_fp16_step_the_scaler_skipped_is_not_reported(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    cb = STEPCallback(switch=3, on_nonfinite_loss="raise")
    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [cb], max_steps=6, plugins=[fp16])
    trainer.fit(NonFiniteFrom(3, float("inf")), train)  # GradScaler skips that step: nothing to report
    assert trainer.global_step == 6 and cb.optimizer_steps < 6 and not cb.loss_watch.seen


def test_on_nonfinite_loss_is_checked() -> None:
    with pytest.raises(ValueError, match=r"STEPCallback: `on_nonfinite_loss` must be one of 'raise', 'warn', got "
                                         r"'stop'"):
        STEPCallback(on_nonfinite_loss="stop")  # type: ignore[arg-type]


def test_masks_are_no_module_buffers(tmp_path: Path) -> None:
    # The in-process half of test_ddp_never_broadcasts_masks: DDP broadcasts `module.buffers()`.
    cb, model = _fitted_step(tmp_path)
    engine = cb.masked_weights
    assert engine is not None and engine.masks is not None and engine._buffers is not None
    recipe = {t.untyped_storage().data_ptr() for t in [*engine.masks, *engine._buffers]}
    assert len(recipe) == 2 * len(TARGETS)
    assert not recipe & {b.untyped_storage().data_ptr() for b in model.buffers()}
