"""Record each masked weight's Adam second moment during a dense run, and plot it (studies/RESULTS.md).

A Lightning callback for any task config: after every optimizer step it writes, per weight that a 2:4 recipe
would mask, the mean ``log v_hat`` over its elements (``v_hat`` the bias-corrected second moment; the level
the ``layer_rise`` AutoSwitch test watches), and the training loss, to a JSON file at the end of ``fit``::

    PYTHONPATH=studies python -m step_lightning fit --config configs/studies/rotten_tomatoes_bert.yaml \\
        --trainer.callbacks+=vhat_probe.VHatProbe --trainer.callbacks.init_args.out logs/study/vhat/rt.json \\
        --trainer.default_root_dir logs/study/vhat/rt

(no recipe: the run is dense, which is what STEP's precondition phase is until its switch). Then::

    python studies/vhat_probe.py plot logs/study/vhat/mnist.json logs/study/vhat/rt.json logs/study/vhat/lm.json \\
        --out studies/results/vhat_layers.png

draws one panel per run: every weight's level against the step, and::

    python studies/vhat_probe.py simulate logs/study/vhat/rotten_tomatoes_bert.json --warmup 0.1

replays the levels through :class:`~step_lightning.AutoSwitch` (``layer_rise``, checked every 10 steps, ``t_max``
half the run, the window and ``t_min`` as :class:`~step_lightning.STEPCallback` defaults them) and prints the step
each threshold would switch after: exact for a STEP run with those settings, whose precondition phase is this
dense run up to its switch. The recorded runs are in studies/results/vhat/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from step_lightning.sparsity.targets import select_targets


class VHatProbe(Callback):
    """Per optimizer step: ``[step, loss, mean log v_hat of each masked weight...]``; written to ``out`` at the end."""

    def __init__(self, out: str, n: int = 2, m: int = 4) -> None:
        self.out, self.n, self.m = Path(out), n, m
        self.rows: list[list[float]] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        targets, _ = select_targets(pl_module, self.n, self.m)
        self.names = [t.name for t in targets]
        self.params = [t.param for t in targets]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = trainer.optimizers[0]
        beta2 = opt.param_groups[0]["betas"][1]
        levels = []
        for p in self.params:
            state = opt.state.get(p, {})
            if "exp_avg_sq" not in state:
                levels.append(float("nan"))
                continue
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
            levels.append(float(v_hat[v_hat > 0].log().mean()))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.rows.append([trainer.global_step, float(loss), *levels])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({"names": self.names, "rows": self.rows}))


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4), squeeze=False)
    for ax, path in zip(axes[0], paths, strict=True):
        data = json.loads(path.read_text())
        rows = torch.tensor(data["rows"], dtype=torch.float64)
        for i, name in enumerate(data["names"]):
            short = ".".join(part for part in name.split(".") if part not in ("model", "weight"))[-28:]
            ax.plot(rows[:, 0], rows[:, 2 + i], lw=1, label=short)
        ax.set_title(path.stem)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean log v_hat of the weight")
        ax.grid(alpha=0.3)
        if len(data["names"]) <= 16:
            ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def simulate(path: Path, warmup: float, thresholds: list[float], window: int | None) -> None:
    from step_lightning import AutoSwitch

    rows = torch.tensor(json.loads(path.read_text())["rows"], dtype=torch.float32)
    total = len(rows)
    t_max = total // 2
    w = window if window is not None else max(1, min(1000, t_max // 4))
    t_min = max(w, int(warmup * total))
    out = []
    for threshold in thresholds:
        switch = AutoSwitch(threshold, w, t_min, t_max=t_max, statistic="layer_rise", check_every=10)
        step = next((switch.t for levels in rows[:, 2:] if switch.observe(levels)), None)
        out.append(f"{threshold:g} -> {step} ({switch.switched_by})")
    print(f"{path.stem}: {total} steps, window {w}, t_min {t_min}, t_max {t_max}: " + ", ".join(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["plot", "simulate"])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("studies/results/vhat_layers.png"))
    parser.add_argument("--warmup", type=float, nargs="+", default=[0.0],
                        help="simulate: the learning-rate warm-up of each run, as a fraction of it (one for all)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.7])
    parser.add_argument("--window", type=int, default=None, help="simulate: default as STEPCallback's")
    args = parser.parse_args()
    if args.mode == "plot":
        plot(args.runs, args.out)
    else:
        warmups = args.warmup * len(args.runs) if len(args.warmup) == 1 else args.warmup
        for run, warmup in zip(args.runs, warmups, strict=True):
            simulate(run, warmup, args.thresholds, args.window)
    sys.exit(0)
