"""Run names: ``<task>/<model>/<recipe>``, shared by ``fit`` (its TensorBoard folder) and ``compare``.

A run is a task config (``configs/cifar10/resnet18.yaml``) and a recipe (``configs/recipes/step_2of4.yaml``,
or none for dense training), so its name has two parts: the task config's path below ``configs/``
(``cifar10/resnet18``) and the recipe's short name with its N:M (``step_2of4``), read from the recipe that
is actually configured (``--recipe.init_args.m 8`` gives ``step_2of8``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["recipe_name", "run_name", "task_name"]

DENSE = "dense"


def task_name(config: str | Path) -> str:
    """The task part of a run name: a config's path below a ``configs`` folder, else its file name.

    ``configs/cifar10/resnet18.yaml`` -> ``cifar10/resnet18`` (same-named configs of different tasks never
    share a log folder); ``my_run.yaml`` -> ``my_run``.
    """
    parts = Path(config).with_suffix("").parts
    if "configs" in parts[:-1]:
        below = parts[len(parts) - parts[::-1].index("configs"):]
        return "/".join(below)
    return parts[-1]


def recipe_name(recipe: Mapping[str, Any] | Any | None) -> str:
    """The recipe part of a run name: ``dense`` without a recipe, else ``<recipe>_<n>of<m>``.

    Args:
        recipe: the ``recipe`` value of a config: ``None``, or a mapping (or jsonargparse ``Namespace``) with
            ``class_path`` and ``init_args``. ``STEPCallback`` -> ``step``, ``SRSTECallback`` -> ``srste``,
            ``ASPCallback`` -> ``asp``; another class by its lower-cased name without ``Callback``.
            ``n`` and ``m`` default to the recipes' defaults, 2 and 4.
    """
    if recipe is None:
        return DENSE
    get = recipe.get if isinstance(recipe, Mapping) else (lambda key, default=None: getattr(recipe, key, default))
    class_path = str(get("class_path", "") or "")
    init_args = get("init_args", None) or {}
    if not isinstance(init_args, Mapping):
        init_args = vars(init_args)
    short = class_path.rsplit(".", 1)[-1].removesuffix("Callback").lower() or "recipe"
    return f"{short}_{init_args.get('n', 2)}of{init_args.get('m', 4)}"


def run_name(task_config: str | Path, recipe: Mapping[str, Any] | Any | None) -> str:
    """``<task>/<recipe>``, e.g. ``cifar10/resnet18/step_2of4`` or ``quickstart/step_2of4``."""
    return f"{task_name(task_config)}/{recipe_name(recipe)}"
