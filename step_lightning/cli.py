"""``python -m step_lightning``: LightningCLI with a ``recipe`` key and the quickstart as default, plus ``export``.

Subcommands ``fit``, ``validate``, ``test``, ``predict`` are Lightning's (``--config`` stackable,
``--print_config``, per-key overrides, ``class_path``/``init_args`` for model, data, optimizer (an
argument of the model), scheduler and callbacks). Without ``--config`` they run
``configs/quickstart.yaml``. ``export --ckpt_path CKPT --output DIR`` writes the N:M model; ``verify
DIR/model.safetensors`` proves its weights are N:M (:mod:`step_lightning.export`).

The N:M recipe is one key, ``recipe``, beside ``model``, ``data`` and ``trainer`` (LightningCLI's forced
callback, ``add_lightning_class_args(..., subclass_mode=True)``): any subclass of
:class:`~step_lightning.callbacks.NMSparsityCallback`, or ``null`` (the default) for dense training. A task
config and a recipe config stack::

    python -m step_lightning fit --config configs/cifar10/resnet18.yaml --config configs/recipes/step_2of4.yaml
    python -m step_lightning fit --config configs/cifar10/resnet18.yaml --recipe STEPCallback --recipe.m 8

The recipe callback is appended to ``trainer.callbacks``; logs and checkpoints go to
``logs/<task>/<model>/<recipe>/`` (:func:`step_lightning.naming.run_name`), below ``--trainer.default_root_dir``
when it is given (:func:`log_root`), unless ``--trainer.logger`` is set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from step_lightning.callbacks import NMSparsityCallback
from step_lightning.naming import run_name

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class StepLightningCLI(LightningCLI):
    """LightningCLI for step_lightning: a ``recipe`` key, derived values linked, TensorBoard under
    ``logs/<task>/<model>/<recipe>`` (:func:`~step_lightning.naming.run_name`)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the models take their optimizer as an argument
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"allow_abbrev": False},  # a typo must be an error, not a guess
            args=list(args) if args is not None else None,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The recipe: a forced callback of its own key, so that task configs and recipe configs compose and
        # `--recipe.init_args.m 8` (or `--recipe.m 8`) edits it. Absent or null: dense training.
        parser.add_lightning_class_args(NMSparsityCallback, "recipe", subclass_mode=True, required=False)
        # Derived values flow from the data to the model, never typed twice.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.task", "model.init_args.task", apply_on="instantiate")
        parser.link_arguments("data.num_tokens", "model.init_args.num_tokens", apply_on="instantiate")
        parser.link_arguments("data.pad_idx", "model.init_args.pad_idx", apply_on="instantiate")
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path",
                              apply_on="parse")
        parser.add_argument(
            "--init_from", type=str | None, default=None,
            help="fit only: copy the model weights of this checkpoint (a Lightning .ckpt or a plain state_dict "
                 "file) into the model before training; a new run, unlike --ckpt_path, which resumes one. ASP "
                 "configs fine-tune a trained dense model this way.")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt:  # LightningCLI reads it next, for its hyper-parameters: a broken file must not be a zip traceback
            from step_lightning.checkpointing import check_not_truncated

            check_not_truncated(ckpt)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            ckpt = self.config_init[subcommand].get("ckpt_path")
            first = str(err).strip().splitlines()
            raise ValueError(
                f"`--ckpt_path` {ckpt!r} was saved from a different model than the configured "
                f"{type(self.model).__name__}: {' '.join(line.strip() for line in first[:3])} ... Pass the config the "
                "checkpoint was trained with (it is saved as config.yaml next to its logs)."
            ) from None

    def instantiate_classes(self) -> None:
        # jsonargparse wraps an error raised in a constructor into its own (a Union's "Does not validate against
        # any of the Union subtypes ... Given value type"), printed under a long traceback. A bad value that one of
        # our classes rejects ends the run with our message alone, one line, exit code 2, as a parser error
        # does; JSONARGPARSE_DEBUG=true keeps the traceback.
        try:
            super().instantiate_classes()
        except Exception as err:
            ours = our_argument_error(err)
            if ours is None or os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true":
                raise
            print(f"error: {ours}", file=sys.stderr)
            raise SystemExit(2) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> pl.Trainer:
        # LightningCLI appends the value of every forced-callback key; `recipe: null` (dense) adds none.
        trainer = super()._instantiate_trainer(config, [cb for cb in callbacks if cb is not None])
        warn_slow_cpu_bf16(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("plugins") is None:  # crash-safe checkpoint files, clear errors for broken ones
            config.trainer.plugins = [{"class_path": "step_lightning.checkpointing.AtomicCheckpointIO"}]
        if config.trainer.get("logger") in (None, True):
            files = config.get("config") or []
            name = run_name(str(files[0]) if files else "default", config.get("recipe"))
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                # No `hp_metric` placeholder (-1) in TensorBoard's HPARAMS tab: the runs log their real metrics.
                "init_args": {"save_dir": log_root(config.trainer.get("default_root_dir")), "name": name,
                              "default_hp_metric": False},
            }

    def before_fit(self) -> None:
        init_from = self.config_init[self.subcommand].get("init_from")
        if init_from:
            from step_lightning.checkpointing import load_weights

            load_weights(self.model, init_from)  # on every rank: DDP starts from identical weights anyway
            if self.trainer.is_global_zero:
                print(f"Initialised {type(self.model).__name__} from --init_from {init_from}.")
        self._warn_unpruned_asp(init_from)

    def _warn_unpruned_asp(self, init_from: str | None) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        from step_lightning.callbacks.asp import ASPCallback

        for callback in self.trainer.callbacks:
            if isinstance(callback, ASPCallback) and callback.prune_at == 0 and not init_from:
                ckpt = self.config_init[self.subcommand].get("ckpt_path")
                if not ckpt:
                    rank_zero_warn("ASPCallback prunes at step 0 but no `--init_from` checkpoint was given: ASP is "
                                   "meant to prune a trained dense model (e.g. `--init_from "
                                   "logs/<dense run>/version_0/checkpoints/last.ckpt`); this run prunes its random "
                                   "initialisation.")

    def before_validate(self) -> None:
        self._reject_init_from()

    def before_test(self) -> None:
        self._reject_init_from()

    def before_predict(self) -> None:
        """Add a :class:`~step_lightning.callbacks.PredictionWriter` (into the run's log directory) when the
        model can be written (``format_predictions``) and no ``BasePredictionWriter`` is configured: a
        ``predict`` that prints nothing and writes nothing would be useless. A configured writer wins."""
        self._reject_init_from()
        from lightning.pytorch.callbacks import BasePredictionWriter

        from step_lightning.callbacks.predictions import PredictionWriter

        if callable(getattr(self.model, "format_predictions", None)) and not any(
                isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def _reject_init_from(self) -> None:
        # A run's saved config.yaml keeps its `init_from`: reusing that config to evaluate must still work.
        if self.config_init[self.subcommand].get("init_from"):
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"`--init_from` only initialises a new training run (`fit`); `{self.subcommand}` "
                           "ignores it. Pass the checkpoint to evaluate as `--ckpt_path`.")

    def after_fit(self) -> None:
        self._report_fit(self.trainer, self.model)

    @staticmethod
    def _report_fit(trainer: pl.Trainer, model: pl.LightningModule) -> None:
        from step_lightning.callbacks.summary import recipe_of
        from step_lightning.export import export_model

        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        lines = ["", "step_lightning fit finished."]
        metrics = trainer.callback_metrics
        for key in ("val/acc", "val/score", "val/ppl", "val/loss"):
            if key in metrics:
                lines.append(f"  final {key}: {float(metrics[key]):.4f}")
        recipe = recipe_of(trainer)
        if recipe is not None:
            if hasattr(recipe, "switch_step"):  # STEP
                autoswitch = getattr(recipe, "autoswitch", None)
                how = f" (AutoSwitch: {autoswitch.switched_by})" if autoswitch and autoswitch.switched_by else ""
                lines.append(f"  switch step: {recipe.switch_step}{how}")
            elif getattr(recipe, "prune_step", None) is not None:  # ASP
                lines.append(f"  pruned at step: {recipe.prune_step}")  # type: ignore[attr-defined]
            if log_dir:
                export_dir = Path(log_dir) / "export"
                result = export_model(model, recipe, export_dir, source="end of fit")
                safetensors = next(f for f in result.files if f.suffix == ".safetensors")
                lines.append(f"  exported N:M model: {safetensors} (also {result.files[0].name}, "
                             f"{result.files[1].name}; check it: python -m step_lightning verify {export_dir})")
        last = [getattr(cb, "last_model_path", "") for cb in trainer.callbacks]  # type: ignore[attr-defined]
        if any(last):
            lines.append(f"  last checkpoint: {next(p for p in last if p)}")
        if log_dir:
            lines.append(f"  logs: {log_dir}")
            root = getattr(trainer.logger, "root_dir", None) or log_dir
            lines.append(f"  open TensorBoard: tensorboard --logdir {root}")
        print("\n".join(lines))


PACKAGE_DIR = Path(__file__).resolve().parent
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16, x86 AMX, Arm BF16 (/proc/cpuinfo)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX or Arm BF16, from the flags in ``cpuinfo``);
    ``None`` where that file does not exist (not Linux)."""
    if not cpuinfo.is_file():
        return None
    return bool(BF16_CPU_FLAGS & set(cpuinfo.read_text(errors="replace").split()))


def warn_slow_cpu_bf16(trainer: pl.Trainer) -> None:
    """Warn once when a run asks for ``bf16-mixed`` on a CPU that has no bf16 units.

    The paper configs ask for ``bf16-mixed``, meant for GPUs. On a CPU with native bf16 it is faster than
    fp32 (ResNet-18, batch 32, one thread with AVX512-BF16: 1.7 s a step against 3.3-3.8 s); without it,
    bf16 is emulated and a step takes several times longer than at fp32. We warn rather than switch
    precision behind the config's back: a config's precision is part of what a run reports.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    if trainer.precision != "bf16-mixed" or trainer.strategy.root_device.type != "cpu":
        return
    native = cpu_has_native_bf16()
    if native:
        return
    which = "has no bf16 units" if native is False else "may have no bf16 units (unknown here)"
    rank_zero_warn(f"`--trainer.precision bf16-mixed` on a CPU that {which}: bf16 is then emulated and each step "
                   "takes several times longer than at fp32. For a CPU run pass `--trainer.precision 32-true` (or "
                   "stack --config configs/debug.yaml).")


def our_argument_error(err: BaseException) -> BaseException | None:
    """The ``ValueError`` / ``TypeError`` that step_lightning code raised somewhere in ``err``'s chain
    (``__cause__``, ``__context__``), or ``None``: an argument check of one of our constructors, which the
    parser (jsonargparse) wrapped into its own error. Raised from our code means: the innermost frame of
    its traceback is a file of this package."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (ValueError, TypeError)) and current.__traceback__ is not None:
            tb = current.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            if Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR):
                return current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def log_root(default_root_dir: str | None) -> str:
    """Where ``fit`` logs without an explicit ``trainer.logger``: ``logs``, below ``default_root_dir`` if given.

    Lightning's contract is that logs and checkpoints go below ``trainer.default_root_dir`` (its own
    default logger writes ``<default_root_dir>/lightning_logs/version_N``). We keep our layout and put it
    below that folder: ``<default_root_dir>/logs/<task>/<model>/<recipe>/version_N``. Lightning's
    ``default_root_dir`` defaults to the working directory, so the run folder is always
    ``<default_root_dir>/logs/...``, with or without the flag, and the README's ``logs/<task>/...`` paths read
    the same below any root (``<default_root_dir>/<task>/...`` would mix run folders with whatever else the
    user keeps there); without the flag it stays the relative ``logs``, so printed paths stay short. An
    explicit ``--trainer.logger`` (as ``compare`` passes) wins over both.
    """
    return str(Path(default_root_dir) / "logs") if default_root_dir else "logs"


def export_main(argv: Sequence[str]) -> None:
    """``python -m step_lightning export --ckpt_path CKPT --output DIR [--semi_structured]``."""
    import argparse

    from step_lightning.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m step_lightning export",
        description="Write the N:M model of a checkpoint: model.safetensors (zeros in place, N:M manifest in its "
                    "header), model.pt, sparsity.json, a Hugging Face directory with the tokenizer for HF models, the "
                    "SentencePiece model and config for translation models.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `fit` (e.g. last.ckpt)")
    parser.add_argument("--output", required=True, help="directory to write into")
    parser.add_argument("--semi_structured", action="store_true",
                        help="also check that the 2:4 Linear weights convert with "
                             "torch.sparse.to_sparse_semi_structured on this GPU and write semi_structured.json "
                             "(load with step_lightning.export.load_semi_structured; needs a CUDA GPU of compute "
                             "capability >= 8.0)")
    args = parser.parse_args(list(argv))
    try:
        result = export_checkpoint(args.ckpt_path, args.output, semi_structured=args.semi_structured)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(result.table)
    print(f"Every listed weight is N:M. Wrote: {', '.join(str(f) for f in result.files)}")


def verify_main(argv: Sequence[str]) -> None:
    """``python -m step_lightning verify FILE``: prove every weight in FILE's manifest is N:M; exit 1 if not."""
    import argparse

    from step_lightning.export import verify_nm
    from step_lightning.export.safetensors_io import format_table

    parser = argparse.ArgumentParser(
        prog="python -m step_lightning verify",
        description="Check, from a model.safetensors written by `export` alone, that every weight its header's N:M "
                    "manifest lists holds at most N non-zeros in every group of M.")
    parser.add_argument("file", help="model.safetensors written by `export` (or an export folder holding one)")
    args = parser.parse_args(list(argv))
    path = Path(args.file)
    path = path / "model.safetensors" if path.is_dir() else path
    try:
        rows = verify_nm(path)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(format_table(rows))
    print(f"Verified: all {len(rows) - 1} weights listed in {path} are N:M.")


def _with_default_config(argv: list[str]) -> list[str]:
    if argv and argv[0] in SUBCOMMANDS and not any(a == "--config" or a.startswith("--config=") for a in argv):
        if not any(a in ("-h", "--help") for a in argv):
            return [argv[0], "--config", str(QUICKSTART), *argv[1:]]
    return argv


def main(args: Sequence[str] | None = None) -> Any:
    """The training CLI: ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI), ``export`` and ``verify``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    argv = _with_default_config(argv)
    if args is None:  # from the command line: LightningCLI reads sys.argv itself
        sys.argv[1:] = argv
        return StepLightningCLI()
    return StepLightningCLI(args=argv)
