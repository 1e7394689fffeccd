"""``python -m step_lightning compare``: run recipe configs over seeds, then tabulate them like the paper.

Each config runs once per seed, one after another, as ``python -m step_lightning fit --config CFG`` in a
subprocess that logs to TensorBoard under ``<output>/<run name>/seed<S>/`` (the run name is the config's
path below ``configs/``, as ``fit`` names its logs: ``cifar10/resnet18_step_2of4``). The report reads those
logs back and writes ``<output>/results.md`` (one row per config: best and final metric, mean ± sample
standard deviation over seeds, STEP's switch step, wall time), ``results.json`` (every run's numbers) and
``val_curves.png`` (the metric over training, mean over seeds with a min–max band)::

    python -m step_lightning compare --configs configs/cifar10/resnet18_{dense,asp,srste,step}_2of4.yaml \\
        --seeds 0 1 2 --output logs/compare
    python -m step_lightning compare --configs A.yaml B.yaml --dry_run          # print the commands only
    python -m step_lightning compare --output logs/compare --report_only       # table of existing runs
    python -m step_lightning compare --configs A.yaml B.yaml --extra --config configs/debug.yaml  # smoke run

ASP fine-tunes a trained dense model: a config whose ``ASPCallback`` prunes at step 0 (``prune_at`` 0 or
absent), named ``<model>_asp_<n>of<m>.yaml``, is paired with ``<model>_dense_<n>of<m>.yaml`` of the same
directory, which must be among ``--configs``. Dense configs run first, and each ASP run starts from the
``last.ckpt`` of the dense run of the same seed (``fit --init_from``).

Each run folder also gets ``run.json`` (command, exit code, wall seconds) and ``output.log`` (the run's
stdout and stderr). A failed run does not stop the others; it shows as failed and the exit code is 1.
Existing run folders stop the comparison before anything runs, unless ``--if_exists overwrite`` (rerun)
or ``--if_exists skip_finished`` (keep the runs that exited with 0). ``--extra`` must be the last flag.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

import yaml

from step_lightning.cli import run_name

PROG = "python -m step_lightning compare"
RECIPE_CALLBACKS = {"STEPCallback": "step", "SRSTECallback": "srste", "ASPCallback": "asp"}
CONFIG_NAME = re.compile(r"^(?P<model>.+)_(?P<recipe>dense|asp|srste|step)_(?P<n>\d+)of(?P<m>\d+)$")
SWITCH_STEP = "sparsity/switch_step"
RUN_RECORD = "run.json"
RUN_OUTPUT = "output.log"


class CompareError(ValueError):
    """Bad input to ``compare``: every message names the flag and the value to change."""


@dataclass(frozen=True)
class Recipe:
    """The sparsity recipe a config trains with, read from its ``trainer.callbacks``.

    Args:
        name: ``"dense"``, ``"step"``, ``"srste"`` or ``"asp"``.
        n: weights kept in every group of ``m`` (``None`` for dense).
        m: group size (``None`` for dense).
        finetunes_dense: ASP pruning at step 0: the run starts from a trained dense model.
    """

    name: str
    n: int | None = None
    m: int | None = None
    finetunes_dense: bool = False

    @property
    def nm(self) -> str:
        """``"2:4"``, or ``"–"`` for dense."""
        return f"{self.n}:{self.m}" if self.n is not None else "–"


@dataclass(frozen=True)
class PlannedRun:
    """One ``fit`` of one config with one seed.

    Args:
        config: the config file, as the user gave it.
        name: the config's run name (:func:`step_lightning.cli.run_name`): the TensorBoard logger's name
            and the folder under ``--output``.
        seed: passed as ``--seed_everything``.
        init_from: the dense checkpoint an ASP run fine-tunes (``fit --init_from``), else ``None``.
        dense_config: the config of the dense run that writes ``init_from``.
    """

    config: Path
    name: str
    seed: int
    init_from: Path | None = None
    dense_config: Path | None = None

    def run_dir(self, output: Path) -> Path:
        """Where the run's logs, checkpoints, ``run.json`` and ``output.log`` go."""
        return output / self.name / f"seed{self.seed}"


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


def recipe_of_config(config: Any, source: str = "config") -> Recipe:
    """The recipe of a parsed YAML config: its recipe callback in ``trainer.callbacks``, or dense.

    Args:
        config: the parsed YAML (a mapping with an optional ``trainer.callbacks`` list).
        source: what to call the config in error messages (its path).

    Raises:
        CompareError: the config is not a mapping or lists more than one recipe callback.
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise CompareError(f"{source} is not a YAML mapping of `fit` arguments.")
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    if isinstance(callbacks, (Mapping, str)):  # jsonargparse also accepts a single callback
        callbacks = [callbacks]
    found: list[Recipe] = []
    for entry in callbacks or []:
        class_path, init_args = (entry, {}) if isinstance(entry, str) else (
            entry.get("class_path", ""), entry.get("init_args") or {})
        recipe = RECIPE_CALLBACKS.get(str(class_path).rsplit(".", 1)[-1])
        if recipe is None:
            continue
        prune_at = init_args.get("prune_at")
        found.append(Recipe(recipe, int(init_args.get("n", 2)), int(init_args.get("m", 4)),
                            finetunes_dense=recipe == "asp" and prune_at in (None, 0)))
    if len(found) > 1:
        raise CompareError(f"{source} has {len(found)} recipe callbacks ({', '.join(r.name for r in found)}) in "
                           "`trainer.callbacks`; a run trains with one recipe.")
    return found[0] if found else Recipe("dense")


def read_recipe(path: Path) -> Recipe:
    """The recipe of the config file at ``path`` (see :func:`recipe_of_config`).

    Raises:
        CompareError: the file is not valid YAML or not a valid recipe config.
    """
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CompareError(f"`--configs` {str(path)!r} is not valid YAML: {err}") from None
    return recipe_of_config(config, f"`--configs` {str(path)!r}")


def dense_partner(config: Path) -> Path | None:
    """``<dir>/<model>_dense_<n>of<m>.yaml`` for ``<dir>/<model>_<recipe>_<n>of<m>.yaml``, else ``None``."""
    match = CONFIG_NAME.match(config.stem)
    if match is None:
        return None
    return config.with_name(f"{match['model']}_dense_{match['n']}of{match['m']}{config.suffix}")


def plan_runs(configs: Sequence[Path], seeds: Sequence[int], output: Path,
              require_partners: bool = True) -> list[PlannedRun]:
    """The runs in launch order: dense configs first (each over all seeds), then the others as given.

    Args:
        configs: the ``--configs``.
        seeds: the ``--seeds``.
        output: the ``--output`` directory.
        require_partners: check that every ASP config that fine-tunes a dense model has its dense config
            among ``configs`` (off for a report of existing runs).

    Raises:
        CompareError: every problem at once: missing or unreadable configs, two configs with one run name,
            an ASP config whose dense partner is not among ``configs``.
    """
    problems: list[str] = []
    recipes: dict[Path, Recipe] = {}
    by_name: dict[str, Path] = {}
    for config in configs:
        if not config.is_file():
            problems.append(f"`--configs` {str(config)!r} does not exist or is not a file.")
            continue
        if run_name(config) in by_name:
            other = by_name[run_name(config)]
            same = other.resolve() == config.resolve()
            problems.append(f"`--configs` {str(config)!r} is given twice." if same else
                            f"`--configs` {str(other)!r} and {str(config)!r} have the same name {run_name(config)!r}, "
                            f"which names their logs under `--output`; rename one of them.")
            continue
        by_name[run_name(config)] = config
        try:
            recipes[config] = read_recipe(config)
        except CompareError as err:
            problems.append(str(err))
    given = {config.resolve(): config for config in recipes}
    partners: dict[Path, Path] = {}
    for config, recipe in recipes.items():
        if not (recipe.finetunes_dense and require_partners):
            continue
        partner = dense_partner(config)
        if partner is None:
            problems.append(f"`--configs` {str(config)!r} fine-tunes a dense model (ASPCallback with prune_at 0) but "
                            "its name does not follow `<model>_asp_<n>of<m>.yaml`, so its dense config is unknown; "
                            "rename it after its dense config `<model>_dense_<n>of<m>.yaml`.")
        elif partner.resolve() not in given:
            problems.append(f"`--configs` {str(config)!r} (ASP) fine-tunes the dense model trained by "
                            f"{str(partner)!r}: add {str(partner)!r} to `--configs`.")
        elif recipes[given[partner.resolve()]].name != "dense":
            problems.append(f"`--configs` {str(partner)!r}, the dense partner of {str(config)!r}, trains with the "
                            f"{recipes[given[partner.resolve()]].name!r} recipe, not dense.")
        else:
            partners[config] = given[partner.resolve()]
    if problems:
        raise CompareError("\n".join(problems))
    ordered = [c for c in recipes if recipes[c].name == "dense"] + [c for c in recipes if recipes[c].name != "dense"]
    runs = []
    for config in ordered:
        for seed in seeds:
            init_from = None
            if config in partners:
                init_from = PlannedRun(partners[config], run_name(partners[config]), seed).run_dir(output) / \
                    "checkpoints" / "last.ckpt"
            runs.append(PlannedRun(config, run_name(config), seed, init_from, partners.get(config)))
    return runs


def saves_last_checkpoint(config: Path) -> bool:
    """Whether ``config`` writes the run's ``checkpoints/last.ckpt``: a ``LastCheckpoint`` or a
    ``ModelCheckpoint(save_last=true)`` without a ``dirpath``."""
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    for entry in [callbacks] if isinstance(callbacks, Mapping) else callbacks or []:
        if not isinstance(entry, Mapping):
            continue
        class_path = str(entry.get("class_path", ""))
        init_args = entry.get("init_args") or {}
        if init_args.get("dirpath"):
            continue
        if class_path.endswith("LastCheckpoint") or (class_path.endswith("ModelCheckpoint")
                                                     and init_args.get("save_last")):
            return True
    return False


def fit_command(run: PlannedRun, output: Path, extra: Sequence[str]) -> list[str]:
    """The ``fit`` command line of ``run``: its config, ``extra``, then the seed and logger overrides."""
    command = [sys.executable, "-m", "step_lightning", "fit", "--config", str(run.config), *extra,
               "--seed_everything", str(run.seed),
               "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
               f"--trainer.logger.save_dir={output}",
               f"--trainer.logger.name={run.name}",
               f"--trainer.logger.version=seed{run.seed}"]
    if run.init_from is not None:
        command += ["--init_from", str(run.init_from)]
    return command


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
    record: dict[str, Any] = {"config": str(run.config), "seed": run.seed, "command": shlex.join(command)}
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


def _load_record(run_dir: Path) -> dict[str, Any] | None:
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
    record = _load_record(run_dir)
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


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _format_value(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _format_step(step: float | None) -> str:
    if step is None:
        return "–"
    return str(int(step)) if float(step).is_integer() else f"{step:.1f}"


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def summarize(name: str, config: str | None, recipe: Recipe | None, runs: Sequence[RunResult]) -> dict[str, Any]:
    """One table row: means (and sample standard deviations) over the runs of a config that succeeded."""
    ok = [r for r in runs if r.status == "ok"]
    with_metric = [r for r in ok if r.best is not None]
    best_mean, best_std = _mean_std([r.best for r in with_metric if r.best is not None])
    final_mean, final_std = _mean_std([r.final for r in with_metric if r.final is not None])
    switch = [r.switch_step for r in ok if r.switch_step is not None]
    wall = [r.wall_seconds for r in ok if r.wall_seconds is not None]
    return {
        "name": name, "config": config,
        "recipe": recipe.name if recipe else None, "n": recipe.n if recipe else None, "m": recipe.m if recipe else None,
        "seeds": [r.seed for r in with_metric],
        "best_mean": best_mean, "best_std": best_std, "final_mean": final_mean, "final_std": final_std,
        "switch_step_mean": statistics.fmean(switch) if switch else None,
        "wall_seconds_mean": statistics.fmean(wall) if wall else None,
        "failed_seeds": [r.seed for r in runs if r.status == "failed"],
        "missing_seeds": [r.seed for r in runs if r.status == "missing"],
        "no_metric_seeds": [r.seed for r in ok if r.best is None],
    }


def _status(row: Mapping[str, Any]) -> str:
    parts = [f"{what}: seed {', '.join(map(str, row[key]))}" for what, key in
             (("failed", "failed_seeds"), ("missing", "missing_seeds"), ("no metric", "no_metric_seeds")) if row[key]]
    return "; ".join(parts) or "ok"


def markdown_table(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The comparison table, one row per config."""
    lines = [f"| config | recipe | N:M | seeds | best {metric} | final {metric} | switch step | wall time | status |",
             "|---|---|---|--:|--:|--:|--:|--:|---|"]
    for row in rows:
        nm = f"{row['n']}:{row['m']}" if row["n"] is not None else "–"
        lines.append(f"| {row['name']} | {row['recipe'] or '?'} | {nm} | {len(row['seeds'])} | "
                     f"{_format_value(row['best_mean'], row['best_std'])} | "
                     f"{_format_value(row['final_mean'], row['final_std'])} | "
                     f"{_format_step(row['switch_step_mean'])} | {_format_duration(row['wall_seconds_mean'])} | "
                     f"{_status(row)} |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, Sequence[RunResult]], metric: str,
                path: Path) -> None:
    """``metric`` against the global step, one line per config: mean over seeds, min–max band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without pyplot's global state
    axes = figure.add_subplot()
    drawn = False
    for row in rows:
        by_step: dict[int, list[float]] = defaultdict(list)
        for run in runs[row["name"]]:
            if run.status == "ok":
                for step, value in dict(run.curve).items():  # the last value of a step, if logged twice
                    by_step[step].append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        mean = [statistics.fmean(by_step[s]) for s in steps]
        (line,) = axes.plot(steps, mean, marker="o", markersize=3, label=f"{row['name']} (n={len(row['seeds'])})")
        if any(len(by_step[s]) > 1 for s in steps):
            axes.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                              color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    axes.set_xlabel("global step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: mean over seeds, band = min–max")
    if drawn:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path, dpi=120)


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged run) as ``null``: ``results.json`` stays valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report(targets: Sequence[tuple[str, str | None, Recipe | None, Sequence[int]]], output: Path, metric: str,
           mode: Literal["max", "min"]) -> tuple[str, bool]:
    """Read the runs, write ``results.md``, ``results.json`` and ``val_curves.png`` into ``output``.

    Args:
        targets: per table row: the config's run name, its path, its recipe, the seeds to read.
        output: the ``--output`` directory holding ``<name>/seed<S>/``.
        metric: the scalar to tabulate and plot.
        mode: whether the best value of ``metric`` is its maximum or its minimum.

    Returns:
        The Markdown text and whether any run failed or is missing.
    """
    runs = {name: [read_run(output / name / f"seed{seed}", name, seed, metric, mode) for seed in seeds]
            for name, _, _, seeds in targets}
    rows = [summarize(name, config, recipe, runs[name]) for name, config, recipe, _ in targets]
    n_seeds = sorted({len(seeds) for *_, seeds in targets})
    text = "\n".join([
        f"# Recipe comparison: {metric} ({mode})", "",
        markdown_table(rows, metric), "",
        f"Best = the {'highest' if mode == 'max' else 'lowest'} {metric} logged during a run, final = the last one; "
        "mean ± sample standard deviation over the seeds that finished (`seeds`). Switch step: STEP's "
        f"`{SWITCH_STEP}`, mean over seeds. Wall time: mean per run. Logs: `{output}` "
        f"({'/'.join(map(str, n_seeds)) or 0} seed(s) per config).", ""])
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(text)
    per_run = [{"config": row["config"]} | {k: v for k, v in asdict(r).items() if k != "curve"}
               for row in rows for r in runs[row["name"]]]
    summary = {"metric": metric, "mode": mode, "output": str(output), "configs": rows, "runs": per_run}
    (output / "results.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    plot_curves(rows, runs, metric, output / "val_curves.png")
    incomplete = any(r.status != "ok" for rs in runs.values() for r in rs)
    return text, incomplete


def _logged_seeds(folder: Path) -> list[int]:
    """The seeds ``S`` of the ``seed<S>`` run folders in ``folder``."""
    return sorted(int(p.name[4:]) for p in folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit())


def _discover(output: Path, seeds: Sequence[int] | None) -> list[tuple[str, str | None, Recipe | None, list[int]]]:
    """The configs and seeds logged under ``output``, with their recipe from the ``config.yaml`` each run saved."""
    targets = []
    # Run names may hold "/" (configs/cifar10/x.yaml logs as cifar10/x): every folder with seed<S> runs counts.
    folders = sorted({p.parent for p in output.rglob("seed*") if p.is_dir()}) if output.is_dir() else []
    for folder in folders:
        found = _logged_seeds(folder)
        if not found:
            continue
        recipe, config = None, None
        for seed in found:
            config = config or (_load_record(folder / f"seed{seed}") or {}).get("config")
            saved = folder / f"seed{seed}" / "config.yaml"
            if recipe is None and saved.is_file():
                try:
                    recipe = read_recipe(saved)
                except CompareError:
                    pass  # reported with recipe "?"
        name = folder.relative_to(output).as_posix()
        targets.append((name, config, recipe, list(seeds) if seeds is not None else found))
    return targets


def _seeds_of(output: Path, name: str, seeds: Sequence[int] | None) -> list[int]:
    if seeds is not None:
        return list(seeds)
    return _logged_seeds(output / name) or [0]


def build_parser() -> argparse.ArgumentParser:
    """The ``compare`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train several recipe configs over several seeds, one run after another, and tabulate them:\n"
                    "best/final metric (mean ± std over seeds), switch step, wall time. Writes DIR/results.md,\n"
                    "DIR/results.json and DIR/val_curves.png (DIR: --output).",
        epilog="ASP configs that prune at step 0 (named <model>_asp_<n>of<m>.yaml) fine-tune the last.ckpt of the "
               "dense run <model>_dense_<n>of<m>.yaml of the same directory and seed, which must be among "
               "--configs; dense configs run first.\n\nexample:\n"
               f"  {PROG} --configs configs/cifar10/resnet18_{{dense,asp,step}}_2of4.yaml --seeds 0 1 2\n"
               f"  {PROG} --configs a.yaml b.yaml --extra --config configs/debug.yaml")
    parser.add_argument("--configs", nargs="+", type=Path, default=[], metavar="CONFIG",
                        help="fit configs to compare, one table row each (optional with --report_only: then every "
                             "run under --output is reported)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="seeds to run every config with (--seed_everything); default: 0, or with "
                             "--report_only the seed<S> folders found")
    parser.add_argument("--output", type=Path, default=Path("logs/compare"), metavar="DIR",
                        help="where runs log (DIR/<run name>/seed<S>/) and the report goes (default: %(default)s)")
    parser.add_argument("--metric", default="val/acc", help="scalar to tabulate and plot (default: %(default)s)")
    parser.add_argument("--mode", choices=("max", "min"), default="max",
                        help="whether the best value of --metric is its maximum or minimum (default: %(default)s)")
    parser.add_argument("--if_exists", choices=("error", "overwrite", "skip_finished"), default="error",
                        help="when a run's folder already exists: stop before running anything (error, the "
                             "default), delete it and rerun (overwrite), or keep the runs that finished with exit "
                             "code 0 and rerun the others (skip_finished)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true",
                      help="print the launch commands, one per line in run order, instead of running them")
    mode.add_argument("--report_only", action="store_true", help="run nothing; report the runs already in --output")
    parser.add_argument("--quiet", action="store_true",
                        help="do not echo the runs' output (it is always written to DIR/<name>/seed<S>/output.log)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                        help="must come last: every argument after it is passed verbatim to every `fit`, e.g. "
                             "--extra --config configs/debug.yaml --trainer.max_epochs 5")
    return parser


def _usage_error(parser: argparse.ArgumentParser, problems: str) -> int:
    parser.print_usage(sys.stderr)
    for line in problems.splitlines():
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m step_lightning compare``.

    Returns:
        0 when every run finished, 1 when a run failed (or, for a report, a run failed or is missing), 2 for
        bad arguments.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help, or an argparse error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    problems = []
    if args.seeds is not None:
        problems += [f"`--seeds` {seed} is negative; seeds are integers >= 0." for seed in args.seeds if seed < 0]
        if len(set(args.seeds)) != len(args.seeds):
            problems.append(f"`--seeds` {' '.join(map(str, args.seeds))} repeats a seed.")
    if not args.configs and not args.report_only:
        problems.append("`--configs` is empty: give at least one config to run (or --report_only to report the "
                        "runs under --output).")
    output: Path = args.output
    seeds: list[int] = args.seeds if args.seeds is not None else [0]
    runs: list[PlannedRun] = []
    if args.configs:
        try:
            runs = plan_runs(args.configs, seeds, output, require_partners=not args.report_only)
        except CompareError as err:
            problems += str(err).splitlines()
    if problems:
        return _usage_error(parser, "\n".join(problems))

    if args.report_only:
        if args.configs:
            targets = [(run_name(c), str(c), read_recipe(c), _seeds_of(output, run_name(c), args.seeds))
                       for c in args.configs]
        else:
            targets = _discover(output, args.seeds)
            if not targets:
                return _usage_error(parser, f"`--output` {str(output)!r} holds no runs (<name>/seed<S>/ folders) to "
                                            "report; pass the --output the runs were logged to.")
        text, incomplete = report(targets, output, args.metric, args.mode)
        print(text)
        print(f"Wrote {output / 'results.md'}, {output / 'results.json'} and {output / 'val_curves.png'}.")
        return 1 if incomplete else 0

    for dense in sorted({r.dense_config for r in runs if r.dense_config is not None}):
        if not saves_last_checkpoint(dense):
            print(f"warning: `--configs` {str(dense)!r} has no LastCheckpoint nor ModelCheckpoint(save_last=true) "
                  "in `trainer.callbacks`, but the ASP runs fine-tune its <run>/checkpoints/last.ckpt: add one (unless "
                  "--extra does).", file=sys.stderr)
    todo = runs
    if not args.dry_run:
        existing = [r for r in runs if r.run_dir(output).exists()]
        if existing and args.if_exists == "error":
            return _usage_error(parser, f"`--output` {str(output)!r} already holds the runs "
                                        f"{', '.join(str(r.run_dir(output)) for r in existing)}; pass "
                                        "`--if_exists overwrite` to rerun them, `--if_exists skip_finished` to keep "
                                        "the finished ones, or another `--output`.")
    if args.if_exists == "skip_finished":
        todo = [r for r in runs if (_load_record(r.run_dir(output)) or {}).get("exit_code") != 0]
    if args.dry_run:
        for run in todo:
            print(shlex.join(fit_command(run, output, args.extra)))
        return 0

    failed = []
    for index, run in enumerate(todo, 1):
        run_dir = run.run_dir(output)
        if run_dir.exists():  # --if_exists overwrite, or an unfinished run with skip_finished
            shutil.rmtree(run_dir)
        print(f"[{index}/{len(todo)}] {run.name} seed {run.seed}: {shlex.join(fit_command(run, output, args.extra))}",
              flush=True)
        code = execute(run, output, args.extra, quiet=args.quiet)
        record = _load_record(run_dir) or {}
        if code != 0:
            failed.append(run)
            why = f"exit code {code}; output: {run_dir / RUN_OUTPUT}" if code is not None else record.get("error")
            print(f"[{index}/{len(todo)}] {run.name} seed {run.seed}: FAILED ({why})", file=sys.stderr, flush=True)
            if args.quiet and (run_dir / RUN_OUTPUT).is_file():
                tail = (run_dir / RUN_OUTPUT).read_text(errors="replace").splitlines()[-15:]
                print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
        else:
            print(f"[{index}/{len(todo)}] {run.name} seed {run.seed}: done in "
                  f"{_format_duration(record.get('wall_seconds'))}", flush=True)

    order = {run_name(c): i for i, c in enumerate(args.configs)}
    names = sorted({r.name: r.config for r in runs}.items(), key=lambda item: order[item[0]])
    targets = [(name, str(config), read_recipe(config), seeds) for name, config in names]
    text, _ = report(targets, output, args.metric, args.mode)
    print(text)
    print(f"Wrote {output / 'results.md'}, {output / 'results.json'} and {output / 'val_curves.png'}.")
    if failed:
        print(f"{len(failed)} of {len(todo)} runs failed: "
              f"{', '.join(f'{r.name} seed {r.seed}' for r in failed)}.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
