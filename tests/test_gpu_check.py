"""benchmarks/gpu_check.py end to end on the CPU (--cpu-smoke): every section runs and lands in one Markdown file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_one_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--sections",
                           "micro,overhead,sparse_linears", "--output", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for row in ("| micro | ok |", "| overhead | ok |", "| sparse_linears | ok |"):
        assert row in text, text[:2000]
    assert "nm_mask 2:4 compiled" in text and "StepAdamW fused / AdamW(fused)" in text
    assert "STEP mask learning (after switch)" in text and "skipped: `to_sparse_semi_structured` needs" in text


def test_gpu_check_rejects_unknown_sections(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--sections", "micro,bogus"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--sections: unknown ['bogus']; choose from ['gpu_tests'" in proc.stderr
