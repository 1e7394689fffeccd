"""AutoSwitch statistics on the quickstart (sklearn digits, small CNN, STEP 2:4) at several loss scales.

Two modes, both run the real CLI (``configs/quickstart.yaml``) in this process, with the training loss
multiplied by each ``--scales`` value (the model's gradients scale with it; Adam's update barely does):

* ``curves``: STEP with AutoSwitch held off (threshold 1e-30, ``t_max`` 0.99), so the precondition phase
  covers the run; records every step's ``StepAdamW.second_moment_stats`` and prints, per scale and
  statistic, the window value every ``--every`` steps and the step each candidate threshold would switch
  at (exact: the run is identical to a STEP run up to its switch).
* ``switch``: STEP as configured (plus any ``--set`` CLI overrides), printing the switch step, why, and the
  final val/acc per scale.

    python studies/autoswitch_scales.py curves
    python studies/autoswitch_scales.py switch
    python studies/autoswitch_scales.py switch --set --recipe.init_args.autoswitch_statistic reference \
        --recipe.init_args.autoswitch_threshold 1e-8
    python studies/autoswitch_scales.py switch --configs configs/studies/mnist_mlp.yaml \
        studies/recipes/step_2of4_w50.yaml

Results: studies/AUTOSWITCH.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from step_lightning import STEPCallback  # noqa: E402
from step_lightning.cli import main  # noqa: E402
from step_lightning.models import CausalLM, ImageClassifier, SequenceClassifier  # noqa: E402
from step_lightning.optim import SAMPLE_KEYS, AutoSwitch  # noqa: E402

CANDIDATES = {"layer_rise": [0.7, 0.5, 0.4, 0.3], "log_drift": [0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1],
              "reference": [1e-8], "relative": [1e-2, 5e-3, 2e-3]}


def patch_loss_scale(scale: float) -> None:
    """Multiply the loss ``training_step`` returns by ``scale``, for every task family's LightningModule."""
    for cls in (ImageClassifier, SequenceClassifier, CausalLM):
        original = cls.__dict__.get("_study_original", cls.training_step)
        cls._study_original = original  # type: ignore[attr-defined]

        def scaled(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            out = _original(self, *args, **kwargs)
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] * scale}
            return out * scale

        cls.training_step = scaled  # type: ignore[method-assign]


def patch_recorder(records: list[dict[str, float]]) -> None:
    original = STEPCallback.__dict__.get("_study_original", STEPCallback._after_optimizer_step)
    STEPCallback._study_original = original  # type: ignore[attr-defined]

    def recording(self: Any, trainer: Any) -> None:
        stats = self._optimizer.second_moment_stats if self._optimizer is not None else None
        if stats is not None and self.phase == "precondition":
            records.append({k: v.tolist() for k, v in stats.items()})  # layer_rise's sample is a vector
        original(self, trainer)

    STEPCallback._after_optimizer_step = recording  # type: ignore[method-assign]


def stop_at_the_switch() -> None:
    """End each fit right after STEP's switch (``switch --stop-after-switch``: only the switch step is wanted)."""
    original = STEPCallback.__dict__.get("_study_switch", STEPCallback._do_switch)
    STEPCallback._study_switch = original  # type: ignore[attr-defined]

    def switch_and_stop(self: Any, trainer: Any) -> None:
        original(self, trainer)
        trainer.should_stop = True

    STEPCallback._do_switch = switch_and_stop  # type: ignore[method-assign]


def fit(scale: float, extra: list[str], out: Path, configs: list[Path] | None = None) -> Any:
    patch_loss_scale(scale)
    stack = [arg for config in (configs or [ROOT / "configs" / "quickstart.yaml"])
             for arg in ("--config", str(Path(config).resolve()))]
    args = ["fit", *stack, "--trainer.enable_progress_bar", "false", *extra]
    os.chdir(out)  # logs/ and checkpoints go to a temporary folder
    try:
        return main(args)
    finally:
        os.chdir(ROOT)


def window_values(samples: list[Any], statistic: str, window: int) -> list[float]:
    """The AutoSwitch window value after each step t = 1.. (NaN where it does not exist yet), replayed through
    :class:`AutoSwitch` itself (never switching: ``t_min`` and ``t_max`` at the end)."""
    replay = AutoSwitch(1.0, window, len(samples), t_max=len(samples), statistic=statistic)  # type: ignore[arg-type]
    out = []
    for sample in samples:
        replay.observe(torch.tensor(sample))
        value = replay.window_mean()
        out.append(math.nan if value is None else float(value))
    return out


def switch_step(samples: list[Any], statistic: str, window: int, threshold: float, t_min: int, t_max: int,
                check_every: int) -> tuple[int, str]:
    """Where :class:`AutoSwitch` with these settings switches on ``samples`` (``"end"``: not within them)."""
    replay = AutoSwitch(threshold, window, t_min, t_max=t_max, statistic=statistic,  # type: ignore[arg-type]
                        check_every=check_every)
    step = next((replay.t for sample in samples if replay.observe(torch.tensor(sample))), None)
    return (len(samples), "end") if step is None else (step, str(replay.switched_by))


def report_curves(records: list[dict[str, float]], window: int, t_min: int, t_max: int, check_every: int,
                  every: int) -> dict[str, Any]:
    """Print each statistic's window value every ``every`` steps and where each candidate threshold switches."""
    per_stat: dict[str, Any] = {}
    for statistic, key in SAMPLE_KEYS.items():
        samples = [r[key] for r in records]
        values = window_values(samples, statistic, window)
        row = " ".join(f"{t}:{values[t - 1]:.3g}" for t in range(every, len(values) + 1, every))
        print(f"{statistic:>9} window value at step  {row}")
        switches = {thr: switch_step(samples, statistic, window, thr, t_min, t_max, check_every)
                    for thr in CANDIDATES[statistic]}
        print(f"{statistic:>9} switch (t_min {t_min}, t_max {t_max}): "
              + ", ".join(f"{thr:g} -> {s} ({why})" for thr, (s, why) in switches.items()))
        per_stat[statistic] = {str(k): v for k, v in switches.items()}
    return {"records": records, "switches": per_stat, "window": window, "t_min": t_min, "t_max": t_max,
            "check_every": check_every}


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["curves", "switch"])
    parser.add_argument("--scales", type=float, nargs="+", default=[1e-3, 1.0, 1e3])
    parser.add_argument("--every", type=int, default=25, help="print the curves every this many steps")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="curves: recompute the tables from a --json of an earlier run")
    parser.add_argument("--configs", type=Path, nargs="+", default=None,
                        help="configs to stack (default: configs/quickstart.yaml), e.g. a study task and recipe")
    parser.add_argument("--stop-after-switch", action="store_true",
                        help="switch: end each run at its switch (the switch step only; no final metric)")
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="CLI overrides for the fit")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.stop_after_switch:
        stop_at_the_switch()
    if args.from_json is not None:
        for scale, run in json.loads(args.from_json.read_text()).items():
            print(f"\n=== loss x {float(scale):g}: window {run.get('window', 50)}, t_min {run['t_min']}")
            report_curves(run["records"], run.get("window", 50), run["t_min"], run["t_max"],
                          run.get("check_every", 10), args.every)
        return
    for scale in args.scales:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if args.mode == "curves":
                records: list[dict[str, float]] = []
                patch_recorder(records)
                cli = fit(scale, ["--recipe.init_args.autoswitch_threshold", "1e-30",
                                  "--recipe.init_args.autoswitch_t_max", "0.99", *args.set], Path(tmp), args.configs)
            else:
                cli = fit(scale, args.set, Path(tmp), args.configs)
        recipe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, STEPCallback))
        sw = recipe.autoswitch
        metric = next((k for k in ("val/acc", "val/ppl") if k in cli.trainer.callback_metrics), "val/acc")
        acc = float(cli.trainer.callback_metrics.get(metric, math.nan))
        seconds = time.perf_counter() - start
        total = int(cli.trainer.estimated_stepping_batches)
        print(f"\n=== loss x {scale:g}: {total} steps, window {sw.window}, t_min {sw.t_min}, {seconds:.0f} s")
        if args.mode == "switch":
            print(f"statistic {sw.statistic} threshold {sw.threshold:g}: switch after step {recipe.switch_step} "
                  f"by {sw.switched_by} (t_max {sw.t_max}); {metric} {acc:.4f}")
            results[str(scale)] = {"switch_step": recipe.switch_step, "switched_by": sw.switched_by,
                                   "t_min": sw.t_min, "t_max": sw.t_max, "val_acc": acc, "history": sw.history}
            continue
        t_max = total // 2  # the quickstart's autoswitch_t_max: 0.5
        results[str(scale)] = report_curves(records, sw.window, sw.t_min, t_max, sw.check_every, args.every)
    if args.json is not None:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main_cli()
