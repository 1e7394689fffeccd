"""Each extra imports on its own: task families load lazily, and a missing extra is named in one line.

The subprocess tests hide libraries from a fresh interpreter (a meta-path finder that refuses them,
``find_spec`` and distribution metadata that do not find them), as if the extra that brings them were not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import step_lightning.data
import step_lightning.models
from step_lightning.extras import cli_missing_message, import_extra, lazy_attribute, missing_modules

ROOT = Path(__file__).resolve().parents[1]


def run_without(modules: set[str], code: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (cwd: the repository) in which ``modules`` cannot be imported."""
    prelude = (
        "import sys\n"
        "class _Refuse:\n"
        f"    names = {sorted(modules)!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Refuse())\n"
        # Libraries ask find_spec whether a module is there (transformers: is torchvision?): not for these.
        "import importlib.util as _util\n"
        "_find_spec = _util.find_spec\n"
        "_util.find_spec = lambda name, *a: None if name.split('.')[0] in _Refuse.names else _find_spec(name, *a)\n"
        # Libraries ask for a distribution's version (torchmetrics: is torchvision there?): none for these either.
        "import importlib.metadata as _md\n"
        "_version, _distribution = _md.version, _md.distribution\n"
        "def _refused(name):\n"
        "    if name.replace('-', '_').lower() in _Refuse.names:\n"
        "        raise _md.PackageNotFoundError(name)\n"
        "_md.version = lambda name: _refused(name) or _version(name)\n"
        "_md.distribution = lambda name: _refused(name) or _distribution(name)\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_public_names_resolve_and_are_listed() -> None:
    for package in (step_lightning.models, step_lightning.data):
        for name in package.__all__:
            assert name in dir(package)
            try:
                cls = getattr(package, name)
            except ModuleNotFoundError as err:  # this environment lacks that family's extra: say which
                assert "extra installs: pip install 'step_lightning[" in str(err), err
                continue
            assert cls.__name__ == name
    from step_lightning.models import SequenceClassifier
    from step_lightning.models.sequence_classifier import SequenceClassifier as Direct

    assert SequenceClassifier is Direct
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = step_lightning.models.Nope


def test_a_missing_library_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_absent_lib.py").write_text("import absent_lib_for_step_lightning_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = {"Thing": ("needs_absent_lib", "vision")}
    with pytest.raises(ModuleNotFoundError, match=r"^pkg\.Thing needs 'absent_lib_for_step_lightning_tests', which "
                       r"the `vision` extra installs: pip install 'step_lightning\[vision\]'$"):
        lazy_attribute("pkg", table, "Thing", {})
    with pytest.raises(ModuleNotFoundError, match=r"^No module named 'step_lightning\.nope'$"):  # our bug, not an extra
        import_extra("step_lightning.nope", "vision", "x")
    assert missing_modules(["torch", "absent_lib_for_step_lightning_tests"]) == ["absent_lib_for_step_lightning_tests"]
    assert cli_missing_message() is None  # the test environment has the cli extra


@pytest.mark.slow  # a fresh interpreter importing lightning: about 10 s on 2 CPU cores
def test_cli_extra_alone_builds_the_quickstart_and_nlp_alone_imports_its_models() -> None:
    code = (
        "from step_lightning.models import ImageClassifier\n"
        "from step_lightning.data import DigitsDataModule\n"
        "ImageClassifier(backbone='small_cnn', num_classes=10, in_channels=1, image_size=8)\n"
        "DigitsDataModule()\n"
        "try:\n"
        "    ImageClassifier(backbone='resnet18', num_classes=10)\n"
        "except ModuleNotFoundError as err:\n"
        "    print(err)\n"
        "try:\n"
        "    from step_lightning.data import CIFARDataModule\n"
        "except ModuleNotFoundError as err:\n"
        "    print(err)\n"
        "import sys\n"
        "from step_lightning.models import CausalLM, SequenceClassifier\n"
        "from step_lightning.data import GLUEDataModule, WikiTextDataModule\n"
        "print('ok')\n")
    result = run_without({"torchvision", "fairseq2", "sentencepiece"}, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "`--model.backbone`='resnet18' needs 'torchvision', which the `vision` extra installs: "
        "pip install 'step_lightning[vision]'",
        "step_lightning.data.CIFARDataModule needs 'torchvision', which the `vision` extra installs: "
        "pip install 'step_lightning[vision]'",
        "ok"]


@pytest.mark.slow  # a fresh interpreter: a few seconds
def test_command_without_the_cli_extra_says_which_extra_in_one_line() -> None:
    result = run_without({"jsonargparse"}, "from step_lightning.__main__ import main; main(['fit'])")
    assert result.returncode == 1
    assert result.stderr == ("step_lightning: the command line needs the `cli` extra (missing: jsonargparse); "
                             "install it with: pip install 'step_lightning[cli]'\n")
