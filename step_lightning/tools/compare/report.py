"""``compare``'s report: the table (mean ± std over seeds), ``results.json`` and the validation curves."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from step_lightning.tools.compare.plan import CompareError, Recipe, read_spec
from step_lightning.tools.compare.runs import SWITCH_STEP, RunResult, load_record, read_run


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


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def summarize(name: str, config: str | None, recipe: Recipe | None, runs: Sequence[RunResult]) -> dict[str, Any]:
    """One table row: means (and sample standard deviations) over the runs of a row that succeeded.

    Args:
        name: the row's run name (``<task>/<recipe>``).
        config: its config files, joined by ``" + "``.
        recipe: its recipe (``None``: unknown).
        runs: its runs, one per seed.
    """
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
    """The comparison table, one row per task and recipe."""
    lines = [f"| run | recipe | N:M | seeds | best {metric} | final {metric} | switch step | wall time | status |",
             "|---|---|---|--:|--:|--:|--:|--:|---|"]
    for row in rows:
        nm = f"{row['n']}:{row['m']}" if row["n"] is not None else "–"
        lines.append(f"| {row['name']} | {row['recipe'] or '?'} | {nm} | {len(row['seeds'])} | "
                     f"{_format_value(row['best_mean'], row['best_std'])} | "
                     f"{_format_value(row['final_mean'], row['final_std'])} | "
                     f"{_format_step(row['switch_step_mean'])} | {format_duration(row['wall_seconds_mean'])} | "
                     f"{_status(row)} |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, Sequence[RunResult]], metric: str,
                path: Path) -> None:
    """``metric`` against the global step, one line per row: mean over seeds, min–max band."""
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
        targets: per table row: its run name, its config files, its recipe, the seeds to read.
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
        f"({'/'.join(map(str, n_seeds)) or 0} seed(s) per row).", ""])
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


def discover(output: Path, seeds: Sequence[int] | None) -> list[tuple[str, str | None, Recipe | None, list[int]]]:
    """The rows and seeds logged under ``output``, with their recipe from the ``config.yaml`` each run saved."""
    targets = []
    # Run names hold "/" (cifar10/resnet18/step_2of4): every folder with seed<S> runs counts.
    folders = sorted({p.parent for p in output.rglob("seed*") if p.is_dir()}) if output.is_dir() else []
    for folder in folders:
        found = _logged_seeds(folder)
        if not found:
            continue
        recipe, config = None, None
        for seed in found:
            configs = (load_record(folder / f"seed{seed}") or {}).get("configs")
            config = config or (" + ".join(configs) if configs else None)
            saved = folder / f"seed{seed}" / "config.yaml"
            if recipe is None and saved.is_file():
                try:
                    recipe = read_spec([saved], "--output").recipe
                except CompareError:
                    pass  # reported with recipe "?"
        name = folder.relative_to(output).as_posix()
        targets.append((name, config, recipe, list(seeds) if seeds is not None else found))
    return targets


def seeds_of(output: Path, name: str, seeds: Sequence[int] | None) -> list[int]:
    if seeds is not None:
        return list(seeds)
    return _logged_seeds(output / name) or [0]
