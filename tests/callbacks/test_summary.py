"""SparsitySummary's figure: drawn without touching matplotlib's global backend."""

from __future__ import annotations

import subprocess
import sys


def test_drawing_the_autoswitch_figure_keeps_the_users_backend() -> None:
    # A fresh interpreter: the backend is process-wide state that other tests may already have chosen.
    code = """
import matplotlib
matplotlib.use("svg")
from step_lightning.callbacks.summary import autoswitch_figure, figure_pixels
fig = autoswitch_figure([(1, 0.5), (2, 0.2)], 0.25, 2, "log_drift")
pixels = figure_pixels(fig)
assert pixels.shape == (350, 600, 3) and pixels.min() < 255, pixels.shape
print(matplotlib.get_backend())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().lower() == "svg"
