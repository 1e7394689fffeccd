"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    step = namespace["step"]
    assert step.phase == "mask_learning" and 10 < step.switch_step <= 33
    from step_lightning import check_nm_sparse

    sparse = namespace["sparse_weights"]
    check_nm_sparse(sparse["net.2.weight"], 2, 4, name="net.2.weight")
