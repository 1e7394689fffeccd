"""Argument constraints that the CLI parser checks, and the same checks for the Python API.

A constraint lives in the type of a constructor argument (``batch_size: PositiveInt``,
``dropout_p: UnitIntervalOpenRight``, ``statistic: Literal["reference", "relative"]``). LightningCLI's
parser (jsonargparse) then checks it while parsing, before anything is built, and ``--help`` /
``--print_config`` show it. A class built from Python never meets the parser, so its ``__init__`` calls
:func:`check_arguments` with its own signature: the same constraints, read from the same annotations,
raise one ``ValueError`` that lists every bad argument at once. Rules across arguments (``src_lang !=
tgt_lang``) are the only hand-written checks; they go in the same call as ``extra`` problems.

The types are jsonargparse's restricted numbers (``jsonargparse.typing``) when jsonargparse is installed
(the ``cli`` extra); without it, plain ``int``/``float`` subclasses with the same names and checks, so
the core (``sparsity``, ``optim``, ``callbacks``) needs no CLI dependency.

Example::

    class MyDataModule(pl.LightningDataModule):
        def __init__(self, batch_size: PositiveInt = 32, val_split: UnitIntervalOpenRight = 0.1) -> None:
            super().__init__()
            check_arguments(MyDataModule, locals(), flag="--data.{}")
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

__all__ = [
    "ClosedUnitInterval",
    "IntAtLeast2",
    "IntAtLeast4",
    "IntAtLeast8",
    "IntAtLeast16",
    "NonEmptyStr",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitIntervalOpenRight",
    "argument_problems",
    "check_arguments",
    "raise_problems",
]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
}
_DESCRIPTIONS: dict[type, str] = {}


def _restricted(name: str, base: type, restrictions: list[tuple[str, float]], description: str) -> type:
    """A number type that only accepts values meeting every ``(operator, bound)`` restriction."""
    try:
        from jsonargparse.typing import restricted_number_type
    except ImportError:  # the core without the `cli` extra: same checks, no parser
        def new(cls: type, value: Any) -> Any:
            number = base(value)
            if not all(_OPS[op](number, bound) for op, bound in restrictions):
                raise ValueError(f"{value!r} is not {description}")
            return base.__new__(cls, number)  # type: ignore[call-overload]

        kind = type(name, (base,), {"__new__": new, "__doc__": description})
    else:
        from jsonargparse.typing import register_type

        kind = restricted_number_type(name, base, restrictions, docstring=description)
        # The parser checks with `kind` but hands on a plain number: an instance of `kind` in a module's
        # hyperparameters would make its checkpoint unloadable by torch.load(weights_only=True) (Lightning's
        # default for local files) and write `!!python/object` tags into hparams.yaml.
        # The serializer checks too: in a Union (``PositiveInt | OpenUnitInterval``) a plain ``int`` serializer
        # would dump 0.5 as 0 (``--print_config``, the run's config.yaml); raising lets the next type take it.
        def check(value: Any, kind: type = kind, base: type = base) -> Any:
            return base(kind(value))

        register_type(kind, serializer=check, deserializer=check, type_check=lambda value, kind: False)
    _DESCRIPTIONS[kind] = description
    return kind


PositiveInt = _restricted("PositiveInt", int, [(">", 0)], "an integer >= 1")
NonNegativeInt = _restricted("NonNegativeInt", int, [(">=", 0)], "an integer >= 0")
IntAtLeast2 = _restricted("IntAtLeast2", int, [(">=", 2)], "an integer >= 2")
PositiveFloat = _restricted("PositiveFloat", float, [(">", 0)], "a number > 0")
NonNegativeFloat = _restricted("NonNegativeFloat", float, [(">=", 0)], "a number >= 0")
ClosedUnitInterval = _restricted("ClosedUnitInterval", float, [(">=", 0), ("<=", 1)], "a number in [0, 1]")
OpenUnitInterval = _restricted("OpenUnitInterval", float, [(">", 0), ("<", 1)], "a number in (0, 1)")
UnitIntervalOpenRight = _restricted("UnitIntervalOpenRight", float, [(">=", 0), ("<", 1)], "a number in [0, 1)")
IntAtLeast4 = _restricted("IntAtLeast4", int, [(">=", 4)], "an integer >= 4")
IntAtLeast8 = _restricted("IntAtLeast8", int, [(">=", 8)], "an integer >= 8")
IntAtLeast16 = _restricted("IntAtLeast16", int, [(">=", 16)], "an integer >= 16")


def _non_empty_string() -> type:
    """A string with a character other than white space: jsonargparse's ``NotEmptyStr``, handed on as ``str``."""
    try:
        from jsonargparse.typing import NotEmptyStr, register_type
    except ImportError:
        def new(cls: type, value: Any) -> Any:
            if not str(value).strip():
                raise ValueError(f"{value!r} is not a non-empty string")
            return str.__new__(cls, value)

        kind = type("NotEmptyStr", (str,), {"__new__": new, "__doc__": "a non-empty string"})
    else:
        kind = NotEmptyStr
        register_type(kind, serializer=str, deserializer=lambda value: str(kind(value)),
                      type_check=lambda value, kind: False)
    _DESCRIPTIONS[kind] = "a non-empty string"
    return kind


NonEmptyStr = _non_empty_string()


def _accepts(kind: Any, value: Any) -> bool | None:
    """Whether ``value`` meets ``kind``; ``None`` when ``kind`` carries no constraint we check."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        verdicts = [_accepts(option, value) for option in typing.get_args(kind)]
        if any(verdicts):
            return True
        # An option whose constraint is not checked here (`Sequence[str]`) might accept the value.
        return None if any(v is None for v in verdicts) else False
    if kind is type(None):
        return value is None
    if origin is tuple:  # a fixed-length tuple, e.g. Adam's `betas`; YAML gives a list
        items = _tuple_items(kind, value)
        if items is None:
            return False
        verdicts = [_accepts(item, v) for item, v in zip(items, value, strict=True)]
        if any(verdict is False for verdict in verdicts):
            return False
        return None if all(verdict is None for verdict in verdicts) else True
    if kind is bool:
        return isinstance(value, bool)
    if kind in _DESCRIPTIONS and issubclass(kind, str):
        return isinstance(value, str) and bool(value.strip())
    if kind in _DESCRIPTIONS:
        base = int if issubclass(kind, int) else float
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if base is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        try:
            kind(value)
        except (TypeError, ValueError):
            return False
        return True
    return None


def _tuple_items(kind: Any, value: Any) -> tuple[Any, ...] | None:
    """The item types of ``tuple[...]`` matched to ``value``'s items; ``None`` if ``value`` cannot be one."""
    if not isinstance(value, (tuple, list)):
        return None
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        return (args[0],) * len(value)
    return args if len(args) == len(value) else None


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each item {_describe(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} items, each {_describe(args[0])}"
        return f"a list of {len(args)} items: " + ", ".join(_describe(arg) for arg in args)
    if origin is Literal:
        choices = typing.get_args(kind)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(choice) for choice in choices)
    if origin in (Union, types.UnionType):
        parts = [_describe(option) for option in typing.get_args(kind) if option is not type(None)]
        none = type(None) in typing.get_args(kind)
        return " or ".join(parts + (["null"] if none else []))
    if kind is bool:
        return "true or false"
    return _DESCRIPTIONS.get(kind, getattr(kind, "__name__", str(kind)))


def argument_problems(function: Callable[..., Any], values: Mapping[str, Any], flag: str = "`{}`") -> list[str]:
    """One message per argument of ``function`` whose value breaks the constraint of its annotation.

    Args:
        function: the callable whose annotations hold the constraints (usually a class's ``__init__``).
        values: argument name -> value (``locals()`` at the top of ``__init__`` will do; names that are
            not parameters of ``function`` are ignored).
        flag: how an argument is named in messages, ``{}`` standing for its name: ``"--data.{}"``
            for a DataModule, ``"--model.{}"`` for a model, ``"`{}`"`` where no flag applies.

    Returns:
        Messages such as ``"`--data.batch_size` must be an integer >= 1, got 0"``; empty if all is well.
        Arguments whose annotation carries no checkable constraint are not looked at.
    """
    hints = typing.get_type_hints(function)
    problems = []
    for name in inspect.signature(function).parameters:
        if name not in values or name not in hints:
            continue
        value = values[name]
        if _accepts(hints[name], value) is False:
            shown = flag.format(name)
            if not shown.startswith("`"):
                shown = f"`{shown}`"
            problems.append(f"{shown} must be {_describe(hints[name])}, got {value!r}")
    return problems


def raise_problems(owner: str, problems: Iterable[str]) -> None:
    """Raise one ``ValueError`` naming ``owner`` and listing every problem, if there are any."""
    problems = list(problems)
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(p.rstrip(".") for p in problems) + ".")


def check_arguments(owner: type, values: Mapping[str, Any], flag: str = "`{}`", extra: Iterable[str] = ()) -> None:
    """Check ``owner.__init__``'s arguments against their annotations, plus ``extra`` cross-argument problems.

    Call it first thing in ``__init__`` as ``check_arguments(CIFARDataModule, locals(), flag="--data.{}")``,
    naming the class whose ``__init__`` is running (not ``type(self)``: a subclass has another signature).

    Raises:
        ValueError: ``"<ClassName>: <problem>; <problem>."`` listing every bad argument at once.
    """
    raise_problems(owner.__name__, [*argument_problems(owner.__init__, values, flag), *extra])
