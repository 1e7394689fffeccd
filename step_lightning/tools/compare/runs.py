"""Running ``compare``'s ``fit`` processes, and reading one run's numbers back from its TensorBoard events."""

from __future__ import annotations

import codecs
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

from step_lightning.tools.compare.plan import PlannedRun, fit_command

SWITCH_STEP = "sparsity/switch_step"
RUN_RECORD = "run.json"
RUN_OUTPUT = "output.log"


@dataclass
class RunResult:
    """The numbers of one run, read from its TensorBoard events and ``run.json``."""

    name: str
    seed: int
    status: Literal["ok", "failed", "missing"]
    exit_code: int | None = None
    best: float | None = None
    best_step: int | None = None
    final: float | None = None
    final_step: int | None = None
    switch_step: float | None = None
    wall_seconds: float | None = None
    wall_source: Literal["run.json", "events"] | None = None
    log_dir: str = ""
    error: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list, repr=False)


def _stream(command: Sequence[str], log_file: Path, quiet: bool) -> int:
    """Run ``command``, copying its stdout and stderr into ``log_file`` (and to stdout unless ``quiet``)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with log_file.open("w", encoding="utf-8") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        stdout = cast(IO[bytes], proc.stdout)
        try:
            # read1, not readline: progress bars redraw with "\r" and no newline.
            while chunk := stdout.read1(65536):  # type: ignore[attr-defined]
                text = decoder.decode(chunk)
                log.write(text)
                if not quiet:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            return proc.wait()
        except BaseException:  # Ctrl-C: do not leave the training process running on its own
            proc.terminate()
            proc.wait()
            raise


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def execute(run: PlannedRun, output: Path, extra: Sequence[str], quiet: bool = False) -> int | None:
    """Run one ``fit`` and write ``run.json`` (command, exit code, wall seconds) into its run directory.

    Returns:
        The exit code, or ``None`` when the run could not start (its dense checkpoint is missing).
    """
    run_dir = run.run_dir(output)
    command = fit_command(run, output, extra)
    record: dict[str, Any] = {"configs": [str(c) for c in run.spec.configs], "seed": run.seed,
                              "command": shlex.join(command)}
    if run.init_from is not None and not run.init_from.is_file():
        record.update(exit_code=None, wall_seconds=None,
                      error=f"not started: the dense checkpoint {str(run.init_from)!r} to fine-tune does not exist "
                            "(did the dense run fail, or does its config lack ModelCheckpoint(save_last=true)?)")
        _write_record(run_dir, record)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    code = _stream(command, run_dir / RUN_OUTPUT, quiet)
    record.update(exit_code=code, wall_seconds=round(time.perf_counter() - start, 3))
    _write_record(run_dir, record)
    return code


def load_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_run(run_dir: Path, name: str, seed: int, metric: str, mode: Literal["max", "min"]) -> RunResult:
    """The numbers of the run logged in ``run_dir``: ``metric`` (best by ``mode``, final), switch step, wall time.

    Failed runs (non-zero exit code or not started, per ``run.json``) are read too but marked ``"failed"``;
    a run directory without ``run.json`` (e.g. launched from ``--dry_run`` elsewhere) counts as ``"ok"``
    when it has TensorBoard events.
    """
    from tensorboard.backend.event_processing import event_accumulator

    result = RunResult(name, seed, "missing", log_dir=str(run_dir))
    record = load_record(run_dir)
    events = sorted(run_dir.glob("events.out.tfevents.*")) if run_dir.is_dir() else []
    if record is None and not events:
        return result
    result.status = "ok"
    if record is not None:
        result.exit_code = record.get("exit_code")
        result.error = record.get("error")
        if result.exit_code != 0:
            result.status = "failed"
        if record.get("wall_seconds") is not None:
            result.wall_seconds, result.wall_source = float(record["wall_seconds"]), "run.json"
    if not events:
        return result
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    if metric in tags:
        scalars = accumulator.Scalars(metric)
        result.curve = [(int(e.step), float(e.value)) for e in scalars]
        finite = [e for e in scalars if math.isfinite(e.value)]
        if finite:
            best = (max if mode == "max" else min)(finite, key=lambda e: e.value)
            result.best, result.best_step = float(best.value), int(best.step)
        result.final, result.final_step = float(scalars[-1].value), int(scalars[-1].step)
    if SWITCH_STEP in tags:
        result.switch_step = float(accumulator.Scalars(SWITCH_STEP)[-1].value)
    if result.wall_seconds is None:
        times = [e.wall_time for tag in tags for e in accumulator.Scalars(tag)]
        if len(times) > 1:
            result.wall_seconds, result.wall_source = max(times) - min(times), "events"
    return result
