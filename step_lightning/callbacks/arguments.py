"""What a recipe callback's arguments mean beyond their types (see :mod:`step_lightning.checks`).

Steps given as an int or a fraction of the run, the N:M ratio, and the weights ``include``/``exclude`` select.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from step_lightning.sparsity import SparseTarget, format_table, nm_ratio_problems, select_targets

__all__ = ["RunSteps", "resolve_step", "select_or_explain", "target_problems"]


def resolve_step(value: int | float, total: int | float, arg: str) -> int:
    """An optimizer step given as an int, or as a float in (0, 1): that fraction of the run's ``total`` steps.

    The range was checked at construction (the argument's type); what is left is the run's length. The
    result is a plain ``int`` (it may be saved in a checkpoint).

    Raises:
        ValueError: a fraction, but the run has no finite length.
    """
    if isinstance(value, int):
        return int(value)
    if not math.isfinite(total) or total < 1:  # Lightning says -1 for a loader without a length
        raise ValueError(f"`{arg}`={value!r} is a fraction of the run, but the run has no finite length: set "
                         "`trainer.max_steps` or `trainer.max_epochs`, or pass an int step.")
    return max(1, round(value * total))


class RunSteps:
    """Step-valued arguments resolved against the run's length, kept in the callback's checkpoint state.

    A fraction of the run resolves against ``trainer.estimated_stepping_batches``, which a resumed run may
    see differently (another ``max_steps``, another loader length). A resumed run with the same argument
    keeps the step of the run's start (with a warning if its own length gives another), as the
    uninterrupted run would; a changed argument resolves again.

    Args:
        owner: the callback's class name, for messages.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.saved: dict[str, dict[str, int | float]] = {}  # argument -> {"value", "step"}

    def resolve(self, argument: str, value: int | float, total: int | float) -> int:
        """The optimizer step of ``argument`` (an int step, or a fraction of the run's ``total`` steps)."""
        step = resolve_step(value, total, argument)
        saved = self.saved.get(argument)
        if saved is not None and saved["value"] == value and saved["step"] != step:
            rank_zero_warn(
                f"{self.owner}: `{argument}`={value} resolves to step {step} of this run's {total} optimizer "
                f"steps, but to step {saved['step']} when the run started: keeping step {saved['step']}, as the "
                f"uninterrupted run. Pass `{argument}` as an int step to choose another."
            )
            step = int(saved["step"])
        self.remember(argument, value, step)
        return step

    def remember(self, argument: str, value: int | float, step: int) -> None:
        # Plain numbers: the parser's constraint types would not load under `weights_only`.
        self.saved[argument] = {"value": float(value) if isinstance(value, float) else int(value), "step": int(step)}

    def state_dict(self) -> dict[str, dict[str, int | float]]:
        return {argument: dict(saved) for argument, saved in self.saved.items()}

    def load_state_dict(self, state: dict[str, dict[str, int | float]]) -> None:
        self.saved = {argument: dict(saved) for argument, saved in state.items()}


def target_problems(n: int, m: int, include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    """What the argument types of a recipe cannot check: the N:M ratio and the ``include``/``exclude`` regexes."""
    problems = nm_ratio_problems(n, m)
    try:
        select_targets(torch.nn.Module(), 2, 4, include, exclude)  # compiles the patterns, on nothing
    except ValueError as err:
        problems.append(str(err).rstrip("."))
    return problems


def select_or_explain(owner: str, pl_module: pl.LightningModule, n: int, m: int, include: Sequence[str] | None,
                      exclude: Sequence[str] | None) -> list[SparseTarget]:
    """:func:`~step_lightning.sparsity.select_targets`, with the selection logged on rank zero as a table.

    Raises:
        ValueError: nothing can be masked; the message lists the candidates left dense and why.
    """
    targets, skipped = select_targets(pl_module, n, m, include, exclude)
    if not targets:
        raise ValueError(
            f"{owner}: no weight of {type(pl_module).__name__} can be masked {n}:{m} "
            f"(include={include}, exclude={exclude}). Candidates are nn.Linear / nn.Conv* / HF "
            f"Conv1D weights whose reduction size divides by m={m}, minus the first and last layer; "
            f"left dense: {[(s.name, s.reason) for s in skipped] or 'no candidates at all'}."
        )
    for s in skipped:
        if "not divisible" in s.reason:
            rank_zero_warn(f"{owner}: {s.name} {s.shape} stays dense: {s.reason}.")
    rank_zero_info(f"{owner} {n}:{m} (N kept of every M) masks these weights:\n"
                   + format_table(targets, skipped))
    return targets
