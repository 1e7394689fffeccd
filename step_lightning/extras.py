"""Which optional extra of ``pyproject.toml`` brings which library, and the lazy package attributes built on it.

The core (``sparsity``, ``optim``, ``callbacks``) needs torch and Lightning only. Each task family needs its
own extra (``vision``: torchvision; ``nlp``: transformers, datasets; ``translation``: fairseq2, sentencepiece,
sacrebleu, installable only where fairseq2 has wheels) and the command line needs ``cli``. So that an install
with one extra imports its family without the others' libraries, ``step_lightning.models`` and
``step_lightning.data`` import a family's module on first use of one of its names (PEP 562 module
``__getattr__``), and a name whose extra is missing fails with one line that says which extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping, MutableMapping
from types import ModuleType
from typing import Any

# The modules the command line imports (LightningCLI, TensorBoard logging, the summary figure, the quickstart's
# digits, metrics, resumable loaders); the `cli` extra installs them.
CLI_MODULES = ("jsonargparse", "tensorboard", "matplotlib", "sklearn", "torchmetrics", "torchdata")


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` (quoted for POSIX shells)."""
    return f"pip install 'step_lightning[{extra}]'"


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be imported here (looked up by ``find_spec``, not
    imported)."""

    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a finder refusing it, or None in sys.modules: not importable either
            return True

    return [name for name in modules if missing(name)]


def cli_missing_message(program: str = "step_lightning") -> str | None:
    """One line saying which libraries of the ``cli`` extra are missing and how to install them; ``None`` when
    none is."""
    missing = missing_modules(CLI_MODULES)
    if not missing:
        return None
    return (f"{program}: the command line needs the `cli` extra (missing: {', '.join(missing)}); "
            f"install it with: {install_hint('cli')}")


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``; a third-party module missing on the way raises ``ModuleNotFoundError``
    saying that ``what`` needs ``extra`` and how to install it (a missing step_lightning module is re-raised)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == "step_lightning":
            raise
        raise ModuleNotFoundError(f"{what} needs {err.name!r}, which the `{extra}` extra installs: "
                                  f"{install_hint(extra)}", name=err.name) from err


def lazy_attribute(package: str, table: Mapping[str, tuple[str, str]], name: str,
                   namespace: MutableMapping[str, Any]) -> Any:
    """Module ``__getattr__`` body: import the module that ``table[name]`` names and return its ``name``.

    ``table`` maps each public name to ``(module, extra)``. The attribute is cached in ``namespace`` (the
    package's ``globals()``), so the import happens once. A third-party module missing while importing raises
    ``ModuleNotFoundError`` naming the extra (:func:`import_extra`); an unknown ``name`` raises
    ``AttributeError`` as Python does.
    """
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module_name, extra = table[name]
    value = getattr(import_extra(module_name, extra, f"{package}.{name}"), name)
    namespace[name] = value
    return value
