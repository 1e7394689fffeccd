"""What ``compare`` runs: the recipe of each row, the run names, the launch order, ASP's dense partners."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from step_lightning.naming import recipe_name, run_name, task_name

RECIPE_DIR = (Path(__file__).resolve().parents[2] / "configs" / "recipes").resolve()
_UNSET = object()


class CompareError(ValueError):
    """Bad input to ``compare``: every message names the flag and the value to change."""


@dataclass(frozen=True)
class Recipe:
    """The sparsity recipe a run trains with.

    Args:
        name: ``"dense"``, ``"step"``, ``"srste"``, ``"asp"`` (or another recipe class's short name).
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


def _recipe_entry(config: Any, source: str) -> Any:
    """The recipe a parsed YAML config sets: its ``recipe`` key (``None`` = dense), else a recipe callback in
    ``trainer.callbacks`` (configs written before the ``recipe`` key), else ``_UNSET``."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise CompareError(f"{source} is not a YAML mapping of `fit` arguments.")
    if "recipe" in config:
        entry = config["recipe"]
        return {"class_path": entry} if isinstance(entry, str) else entry
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    if isinstance(callbacks, (Mapping, str)):  # jsonargparse also accepts a single callback
        callbacks = [callbacks]
    found = []
    for entry in callbacks or []:
        entry = {"class_path": entry} if isinstance(entry, str) else entry
        if str(entry.get("class_path", "")).rsplit(".", 1)[-1] in ("STEPCallback", "SRSTECallback", "ASPCallback"):
            found.append(entry)
    if len(found) > 1:
        raise CompareError(f"{source} has {len(found)} recipe callbacks in `trainer.callbacks`; a run trains with "
                           "one recipe (the `recipe` key).")
    return found[0] if found else _UNSET


def recipe_entry_of(configs: Sequence[Any], sources: Sequence[str]) -> Mapping[str, Any] | None:
    """The ``recipe`` value that stacking ``configs`` (parsed YAML, in ``--config`` order) gives: the last one
    set, with ``init_args`` merged while the ``class_path`` stays the same (as LightningCLI stacks them)."""
    result: Mapping[str, Any] | None = None
    for config, source in zip(configs, sources, strict=True):
        entry = _recipe_entry(config, source)
        if entry is _UNSET:
            continue
        if entry is None or result is None or entry.get("class_path") != result.get("class_path"):
            result = entry
        else:
            result = {"class_path": entry.get("class_path"),
                      "init_args": {**(result.get("init_args") or {}), **(entry.get("init_args") or {})}}
    return result


def recipe_of(entry: Mapping[str, Any] | None) -> Recipe:
    """The :class:`Recipe` of a ``recipe`` value (``None``: dense)."""
    if entry is None:
        return Recipe("dense")
    init_args = entry.get("init_args") or {}
    name = recipe_name(entry).rsplit("_", 1)[0]
    prune_at = init_args.get("prune_at")
    return Recipe(name, int(init_args.get("n", 2)), int(init_args.get("m", 4)),
                  finetunes_dense=name == "asp" and prune_at in (None, 0))


def _load(path: Path, flag: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CompareError(f"`{flag}` {str(path)!r} is not valid YAML: {err}") from None


@dataclass(frozen=True)
class RunSpec:
    """One table row: a stack of configs (a task config and a recipe config, or one full config).

    Args:
        configs: the ``--config`` files of its ``fit`` runs, in order.
        task: the task part of its name (:func:`step_lightning.naming.task_name` of the first config).
        recipe: the recipe the stack trains with.
        name: ``<task>/<recipe>``, the TensorBoard name of its runs and their folder under ``--output``.
    """

    configs: tuple[Path, ...]
    task: str
    recipe: Recipe
    name: str


def read_spec(configs: Sequence[Path], flag: str) -> RunSpec:
    """The :class:`RunSpec` of a stack of existing config files.

    A task config stacked with a recipe file (``--recipes``) is named ``<task>/<recipe file name>``, so that
    variants of one recipe (``step_2of4_switch10.yaml``) get rows of their own; a full config (``--configs``)
    is named as ``fit`` names it, after the recipe it configures.
    """
    entry = recipe_entry_of([_load(c, flag) for c in configs], [f"`{flag}` {str(c)!r}" for c in configs])
    name = f"{task_name(configs[0])}/{configs[-1].stem}" if flag == "--recipes" else run_name(configs[0], entry)
    return RunSpec(tuple(configs), task_name(configs[0]), recipe_of(entry), name)


def resolve_recipe(value: str) -> Path | None:
    """A ``--recipes`` value: a YAML file, or the name of one in ``configs/recipes/`` (``step_2of4``)."""
    path = Path(value)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{value}.yaml"
    if not shipped.is_file():
        return None
    relative = Path(os.path.relpath(shipped))  # configs/recipes/x.yaml from a checkout: shorter commands
    return relative if not relative.parts[0] == ".." else shipped


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class PlannedRun:
    """One ``fit`` of one row with one seed.

    Args:
        spec: the row.
        seed: passed as ``--seed_everything``.
        init_from: the dense checkpoint an ASP run fine-tunes (``fit --init_from``), else ``None``.
        dense: the row of the dense run that writes ``init_from``.
    """

    spec: RunSpec
    seed: int
    init_from: Path | None = None
    dense: RunSpec | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def run_dir(self, output: Path) -> Path:
        """Where the run's logs, checkpoints, ``run.json`` and ``output.log`` go."""
        return output / self.spec.name / f"seed{self.seed}"


def specs_from_args(tasks: Sequence[Path], recipes: Sequence[str], configs: Sequence[Path]) -> list[RunSpec]:
    """The rows: every ``--task`` with every ``--recipes`` entry, then every full ``--configs`` file.

    Raises:
        CompareError: every problem at once: missing or unreadable files, unknown recipe names, two rows
            with one name.
    """
    problems: list[str] = []
    stacks: list[tuple[tuple[Path, ...], str]] = []
    for task in tasks:
        if not task.is_file():
            problems.append(f"`--task` {str(task)!r} does not exist or is not a file.")
    resolved = []
    for value in recipes:
        path = resolve_recipe(value)
        if path is None:
            problems.append(f"`--recipes` {value!r} is neither a file nor a recipe of configs/recipes/ "
                            f"({', '.join(shipped_recipes())}).")
        resolved.append(path)
    stacks += [((task, path), "--recipes") for task in tasks for path in resolved if path is not None]
    for config in configs:
        if not config.is_file():
            problems.append(f"`--configs` {str(config)!r} does not exist or is not a file.")
        else:
            stacks.append(((config,), "--configs"))
    if problems:
        raise CompareError("\n".join(problems))
    specs: list[RunSpec] = []
    by_name: dict[str, RunSpec] = {}
    for stack, flag in stacks:
        try:
            spec = read_spec(stack, flag)
        except CompareError as err:
            problems.append(str(err))
            continue
        if spec.name in by_name:
            other = by_name[spec.name]
            shown = " + ".join(map(str, spec.configs))
            problems.append(f"`{flag}` {shown!r} is given twice." if other.configs == spec.configs else
                            f"{' + '.join(map(str, other.configs))!r} and {shown!r} have the same run name "
                            f"{spec.name!r}, which names their logs under `--output`; rename one of them.")
            continue
        by_name[spec.name] = spec
        specs.append(spec)
    if problems:
        raise CompareError("\n".join(problems))
    return specs


def plan_runs(specs: Sequence[RunSpec], seeds: Sequence[int], output: Path) -> list[PlannedRun]:
    """The runs in launch order: dense rows first (each over all seeds), then the others as given. An ASP row
    that prunes at step 0 fine-tunes the ``last.ckpt`` of the dense row of its task, same seed.

    Raises:
        CompareError: an ASP row without a dense row of the same task.
    """
    dense = {spec.task: spec for spec in specs if spec.recipe.name == "dense"}
    problems = [f"{spec.name!r} (ASP) fine-tunes a trained dense model of {spec.task!r}, but no dense run of that "
                f"task is among the rows: add `dense` to `--recipes` (or pass `--init_from CKPT` after `--extra`)."
                for spec in specs if spec.recipe.finetunes_dense and spec.task not in dense]
    if problems:
        raise CompareError("\n".join(problems))
    ordered = [s for s in specs if s.recipe.name == "dense"] + [s for s in specs if s.recipe.name != "dense"]
    runs = []
    for spec in ordered:
        for seed in seeds:
            partner = dense.get(spec.task) if spec.recipe.finetunes_dense else None
            init_from = None
            if partner is not None:
                init_from = PlannedRun(partner, seed).run_dir(output) / "checkpoints" / "last.ckpt"
            runs.append(PlannedRun(spec, seed, init_from, partner))
    return runs


def saves_last_checkpoint(configs: Sequence[Path]) -> bool:
    """Whether one of ``configs`` writes the run's ``checkpoints/last.ckpt``: a ``LastCheckpoint`` or a
    ``ModelCheckpoint(save_last=true)`` without a ``dirpath``."""
    for config in configs:
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
    """The ``fit`` command line of ``run``: its configs, ``extra``, then the seed and logger overrides."""
    command = [sys.executable, "-m", "step_lightning", "fit"]
    for config in run.spec.configs:
        command += ["--config", str(config)]
    command += [*extra, "--seed_everything", str(run.seed),
                "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                f"--trainer.logger.save_dir={output}",
                f"--trainer.logger.name={run.name}",
                f"--trainer.logger.version=seed{run.seed}",
                "--trainer.logger.default_hp_metric=false"]  # as fit's own logger: no -1 placeholder
    if run.init_from is not None:
        command += ["--init_from", str(run.init_from)]
    return command
