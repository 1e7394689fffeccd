"""SparsitySummary: at the end of fit, the AutoSwitch curve and a per-layer table, in the logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from step_lightning.callbacks.base import NMSparsityCallback


def recipe_of(trainer: pl.Trainer) -> NMSparsityCallback | None:
    """The trainer's N:M recipe callback, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, NMSparsityCallback)), None)


def layer_table(recipe: NMSparsityCallback) -> str:
    """Markdown table: masked weight, shape, N:M, kept fraction, flip rate at the last tracked mask update."""
    engine = recipe.masked_weights
    if engine is None:
        return ""
    kept = (engine.kept() / engine.sizes(engine.params[0].device)).tolist()
    flips = recipe.last_flips
    rates = (flips / engine.sizes(flips.device)).tolist() if flips is not None else [None] * len(kept)
    rows = ["| weight | shape | N:M | kept | flip rate (last logged update) |", "|---|---|---|---:|---:|"]
    for t, k, r in zip(engine.targets, kept, rates, strict=True):
        rate = "-" if r is None else f"{r:.2e}"
        rows.append(f"| {t.name} | {'x'.join(map(str, t.shape))} | {t.n}:{t.m} | {k:.3f} | {rate} |")
    return "\n".join(rows)


YLABELS = {
    "layer_rise": "largest rise of a weight's log v_hat level",
    "log_drift": "spread of log geomean(v_hat) over the window",
    "reference": "window mean of mean |v_t - v_{t-1}|",
    "relative": "window mean of mean |dv| / mean v",
}


def autoswitch_figure(history: list[tuple[int, float]], threshold: float, switch_step: int | None,
                      statistic: str) -> Any:
    """A matplotlib figure of the AutoSwitch window value (what the test compares) against its threshold, the
    switch marked.

    A ``matplotlib.figure.Figure`` on its own Agg canvas, not ``pyplot``: no global backend is chosen or
    changed (a notebook keeps its inline backend) and no figure is registered with pyplot, so none needs
    closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if history:
        steps, means = zip(*history, strict=True)
        ax.plot(steps, means, label=f"window value ({statistic} statistic)")
    ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    if switch_step is not None:
        ax.axvline(switch_step, color="tab:green", linestyle=":", label=f"switch after step {switch_step}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(YLABELS.get(statistic, statistic))
    ax.set_title("STEP AutoSwitch")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def figure_pixels(fig: Any) -> Any:
    """The RGB pixels (height x width x 3, uint8 numpy array) of a figure drawn on its Agg canvas."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class SparsitySummary(Callback):
    """Writes, at the end of ``fit``, what the N:M recipe did, next to the run's logs.

    * ``sparsity/layers`` (TensorBoard text) and ``<log_dir>/sparsity_layers.md``: per masked weight,
      its shape, N:M, kept fraction and last measured mask flip rate;
    * ``sparsity/autoswitch`` (TensorBoard figure) and ``<log_dir>/autoswitch.png`` (STEP with
      ``switch="auto"``): the AutoSwitch window value at every check (for the default ``"layer_rise"`` the
      largest rise of a masked weight's log geometric-mean ``v_hat`` within the window) against its threshold,
      on a log scale, with the switch step marked.

    The files go to the run folder, ``trainer.log_dir``, whatever the logger (a ``CSVLogger`` run has them
    too; without a logger, ``default_root_dir``); the TensorBoard text and image only where a
    ``TensorBoardLogger`` is configured. It needs a recipe callback (STEP, SR-STE, ASP) in the same Trainer
    and does nothing without one.

    Example::

        trainer:
          callbacks:
            - class_path: step_lightning.STEPCallback
            - class_path: step_lightning.callbacks.SparsitySummary
    """

    def __init__(self) -> None:
        self.files: list[Path] = []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        recipe = recipe_of(trainer)
        if recipe is None or not trainer.is_global_zero:
            return
        out_dir = Path(log_dir) if log_dir else None
        tb = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        table = layer_table(recipe)
        if tb is not None:
            tb.add_text("sparsity/layers", table, trainer.global_step)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "sparsity_layers.md").write_text(table + "\n")
            self.files.append(out_dir / "sparsity_layers.md")
        autoswitch = getattr(recipe, "autoswitch", None)
        if autoswitch is None:
            return
        fig = autoswitch_figure(autoswitch.history, autoswitch.threshold, recipe.switch_step,  # type: ignore[attr-defined]
                                autoswitch.statistic)
        if out_dir is not None:
            fig.savefig(out_dir / "autoswitch.png")
            self.files.append(out_dir / "autoswitch.png")
        if tb is not None:  # rendered here: TensorBoard's `add_figure` would go through pyplot
            tb.add_image("sparsity/autoswitch", figure_pixels(fig), trainer.global_step, dataformats="HWC")
