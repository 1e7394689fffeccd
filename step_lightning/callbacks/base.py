"""The shared machinery of the N:M recipe callbacks (STEP, SR-STE, ASP).

Where each piece runs in Lightning's loop (Lightning 2.6; in fp32/bf16 the training step and backward
run *inside* ``optimizer.step(closure)``, with fp16 the closure runs first and the gradients are
unscaled before ``on_before_optimizer_step``):

* ``on_train_batch_start`` (first micro-batch of an optimizer step): update the masks if due, save the
  dense weights aside and put the masked weights in place, so forward *and* backward see ``w * mask``
  and the gradient is ``dL/d(w * mask)`` (straight-through). Later micro-batches of the same
  optimizer step find the masked weights already in place: the mask is fixed across accumulation.
* ``on_before_optimizer_step`` (gradients complete and unscaled): restore the dense weights, add the
  SR-STE term, zero the pruned gradients for ASP.
* A post-step hook registered on the optimizer marks steps that really ran (an fp16 overflow skips
  ``optimizer.step``), and ``on_train_batch_end`` then does the after-step work: AutoSwitch, ASP's
  re-masking, logging.
* ``on_{validation,test,predict}_start/end``: evaluate the N:M model, then restore the dense weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from step_lightning.sparsity import MaskedWeights, SparseTarget, format_table, select_targets
from step_lightning.sparsity.nm import check_nm


def resolve_step(value: int | float, total: int | float, arg: str, allow_zero: bool = True) -> int:
    """An optimizer step given as an int, or as a float fraction of the run's ``total`` optimizer steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{arg}` must be an int (optimizer step) or a float in (0, 1) (fraction of the run), "
                         f"got {value!r}.")
    if isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{arg}`={value!r} as a float is a fraction of the run's optimizer steps and must "
                             "be in (0, 1); pass an int for an absolute step.")
        if total == float("inf"):
            raise ValueError(f"`{arg}`={value!r} is a fraction of the run, but the run has no finite length: set "
                             "`trainer.max_steps` or `trainer.max_epochs`, or pass an int step.")
        return max(1, round(value * total))
    if value < (0 if allow_zero else 1):
        raise ValueError(f"`{arg}` must be >= {0 if allow_zero else 1}, got {value!r}.")
    return value


def recipe_classes() -> dict[str, type[NMSparsityCallback]]:
    """Every recipe callback class (built-in and user subclasses) by name, as in checkpoint state keys."""
    found: dict[str, type[NMSparsityCallback]] = {}
    todo: list[type[NMSparsityCallback]] = [NMSparsityCallback]
    while todo:
        cls = todo.pop()
        found[cls.__qualname__] = cls
        todo += cls.__subclasses__()
    return found


class NMSparsityCallback(Callback, ABC):
    """Base of the recipe callbacks: target selection, masks, swapping, evaluation, logging, state.

    Args:
        n: weights kept in every group (N of "N:M").
        m: group size along the reduction (input) axis.
        include: regular expressions (``re.search``) on parameter names; when given, exactly the matching
            Linear/Conv weights are masked (see :func:`step_lightning.sparsity.select_targets`).
        exclude: regular expressions; matching parameters are never masked.
        mask_update_interval: recompute the masks from the dense weights every this many optimizer
            steps (reference: 1, every step). Ignored by ASP, whose mask is fixed.
        per_layer_log_interval: log per-layer values under ``sparsity/layers/...`` on every this many
            logging steps of the trainer (``trainer.log_every_n_steps``); ``0`` turns them off.
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        mask_update_interval: int = 1,
        per_layer_log_interval: int = 10,
    ) -> None:
        check_nm(n, m)
        if isinstance(mask_update_interval, bool) or not isinstance(mask_update_interval, int) \
                or mask_update_interval < 1:
            raise ValueError(f"`mask_update_interval` must be an integer >= 1, got {mask_update_interval!r}.")
        if not isinstance(per_layer_log_interval, int) or per_layer_log_interval < 0:
            raise ValueError(f"`per_layer_log_interval` must be an integer >= 0, got {per_layer_log_interval!r}.")
        # Fail on bad regexes now, not at setup.
        select_targets(torch.nn.Module(), n, m, include, exclude)
        self.n = n
        self.m = m
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.mask_update_interval = mask_update_interval
        self.per_layer_log_interval = per_layer_log_interval

        self._engine: MaskedWeights | None = None
        self._module_id: int | None = None
        self._hooks: list[Any] = []
        self._stepped = False
        self._opt_steps = 0
        self._last_mask_update: int | None = None
        self._eval_applied = False
        self._pending_flips: Tensor | None = None
        self._log_calls = 0
        self.last_flips: Tensor | None = None  # mask entries flipped per layer at the last tracked update

    # ----------------------------------------------------------------------------------------------
    # What a recipe decides
    # ----------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def masks_active(self) -> bool:
        """Whether the model is currently N:M (the training forward and evaluation use masks)."""

    @property
    def phase_code(self) -> int:
        """``sparsity/phase``: 0 while the model is dense, 1 while masks are in use."""
        return int(self.masks_active)

    @property
    def dynamic_masks(self) -> bool:
        """Whether masks follow the dense weights (recomputed every ``mask_update_interval`` steps)."""
        return True

    @property
    def sr_ste_decay(self) -> float:
        """``lambda_w`` of the SR-STE gradient term added before each optimizer step (0 = plain STE)."""
        return 0.0

    def _on_train_start(self, trainer: pl.Trainer) -> None:
        """Resolve step-valued arguments against the run's length."""

    def _after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recipe work after each optimizer step that really ran."""

    def _extra_metrics(self) -> dict[str, Any]:
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ----------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(n=self.n, m=self.m)

    @property
    def targets(self) -> list[SparseTarget]:
        """The masked weights (available after ``setup``)."""
        return [] if self._engine is None else list(self._engine.targets)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps that really ran since the start of training (skipped fp16 steps excluded)."""
        return self._opt_steps

    def masked_state_dict(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``pl_module.state_dict()`` with every target replaced by ``weight * mask`` (zeros in place).

        The masks are the recipe's current ones, or magnitude N:M masks of the dense weights while the
        recipe has none yet (STEP's precondition phase, ASP before pruning): the result is always N:M.
        """
        engine = self._setup_targets(pl_module)
        state = pl_module.state_dict()
        state.update(engine.masked_values(fresh=self._fresh_masks()))
        return state

    def _fresh_masks(self) -> bool:
        """Whether the model's N:M form uses masks of the current dense weights (the ones the next
        training step would compute) rather than the stored ones."""
        return self._engine is None or self._engine.masks is None or (
            self.dynamic_masks and self.mask_update_interval == 1)

    # ----------------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------------
    def _setup_targets(self, pl_module: pl.LightningModule) -> MaskedWeights:
        if self._engine is not None and self._module_id == id(pl_module):
            return self._engine
        targets, skipped = select_targets(pl_module, self.n, self.m, self.include, self.exclude)
        if not targets:
            raise ValueError(
                f"{type(self).__name__}: no weight of {type(pl_module).__name__} can be masked {self.n}:{self.m} "
                f"(include={self.include}, exclude={self.exclude}). Candidates are nn.Linear / nn.Conv* / HF "
                f"Conv1D weights whose reduction size divides by m={self.m}, minus the first and last layer; "
                f"left dense: {[(s.name, s.reason) for s in skipped] or 'no candidates at all'}."
            )
        for s in skipped:
            if "not divisible" in s.reason:
                rank_zero_warn(f"{type(self).__name__}: {s.name} {s.shape} stays dense: {s.reason}.")
        rank_zero_info(f"{type(self).__name__} {self.n}:{self.m} (N kept of every M) masks these weights:\n"
                       + format_table(targets, skipped))
        self._engine = MaskedWeights(targets)
        self._module_id = id(pl_module)
        return self._engine

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, NMSparsityCallback) and cb is not self]
        if others:
            names = sorted(type(cb).__name__ for cb in [self, *others])
            raise ValueError(
                f"Only one N:M recipe callback per Trainer, got {names}. Keep one of STEPCallback, SRSTECallback, "
                "ASPCallback in `trainer.callbacks`."
            )
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(f"{type(self).__name__} supports automatic optimization only; "
                             f"{type(pl_module).__name__}.automatic_optimization is False.")
        self._setup_targets(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [t.name for t in self.targets if id(t.param) not in optimized]
        if missing:
            raise ValueError(f"{type(self).__name__}: these masked weights are in no optimizer: {missing}. "
                             "Add them to `configure_optimizers` or list them in `exclude`.")
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(self._on_optimizer_step))

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._engine
        assert engine is not None
        if engine.masks is not None:  # restored from a checkpoint before the model moved to its device
            engine.set_masks(engine.masks)
        self._on_train_start(trainer)

    # ----------------------------------------------------------------------------------------------
    # Training step
    # ----------------------------------------------------------------------------------------------
    def _should_log(self, trainer: pl.Trainer) -> bool:
        connector = getattr(trainer, "_logger_connector", None)
        return bool(trainer.loggers) and bool(getattr(connector, "should_update_logs", True))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        engine = self._engine
        assert engine is not None
        if not (self.masks_active and self.dynamic_masks) or engine.applied:
            return  # ASP's weights are masked in place after every step; nothing to swap
        if (engine.masks is None or self._last_mask_update is None
                                   or self._opt_steps - self._last_mask_update >= self.mask_update_interval):
            flips = engine.update_masks(track_flips=self._should_log(trainer))
            self._last_mask_update = self._opt_steps
            if flips is not None:
                self._pending_flips = flips
                self.last_flips = flips
        engine.apply_()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        engine = self._engine
        assert engine is not None
        engine.restore_(sr_ste_decay=self.sr_ste_decay if self.masks_active else 0.0)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:
            return
        self._stepped = False
        self._opt_steps += 1
        self._after_step(trainer, pl_module)
        if self._should_log(trainer):
            self._log(pl_module)

    def _log(self, pl_module: pl.LightningModule) -> None:
        engine = self._engine
        assert engine is not None
        sizes = engine.sizes(engine.params[0].device)
        kept = engine.kept() if self.masks_active else sizes
        pl_module.log("sparsity/phase", float(self.phase_code), on_step=True, on_epoch=False, prog_bar=True,
                      batch_size=1)
        metrics: dict[str, Any] = {"sparsity/density": kept.sum() / sizes.sum()}
        flips = self._pending_flips
        if flips is not None:
            metrics["sparsity/flip_rate"] = flips.sum() / sizes.sum()
        metrics.update(self._extra_metrics())
        self._log_calls += 1
        if self.per_layer_log_interval and (self._log_calls - 1) % self.per_layer_log_interval == 0:
            for i, name in enumerate(engine.names):
                metrics[f"sparsity/layers/{name}/kept"] = kept[i] / sizes[i]
                if flips is not None:
                    metrics[f"sparsity/layers/{name}/flip_rate"] = flips[i] / sizes[i]
        self._pending_flips = None
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ----------------------------------------------------------------------------------------------
    # Evaluation: always the N:M model.
    # ----------------------------------------------------------------------------------------------
    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._setup_targets(pl_module)
        if engine.applied:  # validation inside an accumulation window: already masked
            return
        # Always the N:M model, also while the recipe trains densely (STEP's precondition, ASP before
        # pruning): then with magnitude masks of the dense weights, so that `val/...` (and checkpoint
        # selection on it) always measures what would be deployed.
        engine.apply_(engine.compute_masks() if self._fresh_masks() else engine.masks)
        self._eval_applied = True

    def _eval_end(self) -> None:
        if self._eval_applied and self._engine is not None:
            self._engine.restore_()
        self._eval_applied = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    # ----------------------------------------------------------------------------------------------
    # End of training, errors
    # ----------------------------------------------------------------------------------------------
    def _restore_dense(self) -> None:
        if self._engine is not None:
            self._engine.restore_()
        self._eval_applied = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_dense()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_dense()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_dense()
        self._remove_hooks()

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A checkpoint always holds the dense weights, even if written while masked weights are in place
        # (e.g. on an exception inside an accumulation window).
        if self._engine is not None and self._engine.applied and "state_dict" in checkpoint:
            for name, value in self._engine.dense_values().items():
                if name in checkpoint["state_dict"]:
                    checkpoint["state_dict"][name] = value.clone()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning restores callback state by `state_key` and silently skips keys it does not find, so a
        # resume with another recipe or N:M would quietly start over: say what differs instead.
        saved = [key for key in checkpoint.get("callbacks", {})
                 if key.split("{")[0] in recipe_classes() and key != self.state_key]
        if saved:
            raise ValueError(
                f"The checkpoint was written by {saved[0]} but this run configures {self.state_key}: resuming "
                "with a different recipe or N:M would not continue the same run. Use the checkpoint's recipe and "
                "N:M, or start a new run (load the weights into the model instead of passing `ckpt_path`)."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        engine = self._engine
        masks = None
        if engine is not None and engine.masks is not None:
            masks = {name: mask.cpu() for name, mask in zip(engine.names, engine.masks, strict=True)}
        return {
            "recipe": type(self).__name__,
            "n": self.n,
            "m": self.m,
            "targets": None if engine is None else engine.names,
            "masks": masks,
            "optimizer_steps": self._opt_steps,
            "last_mask_update": self._last_mask_update,
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        engine = self._engine
        recipe = state_dict.get("recipe")
        if recipe != type(self).__name__ or (state_dict["n"], state_dict["m"]) != (self.n, self.m):
            raise ValueError(f"The checkpoint was trained with {recipe} {state_dict['n']}:{state_dict['m']}, this run "
                             f"configures {type(self).__name__} {self.n}:{self.m}.")
        if engine is not None and state_dict["targets"] is not None and state_dict["targets"] != engine.names:
            saved, now = set(state_dict["targets"]), set(engine.names)
            raise ValueError(
                f"{type(self).__name__}: the checkpoint masks a different set of weights. Only in the checkpoint: "
                f"{sorted(saved - now)}; only in this run: {sorted(now - saved)}. Use the same `include`/`exclude`."
            )
        self._opt_steps = state_dict["optimizer_steps"]
        self._last_mask_update = state_dict["last_mask_update"]
        if engine is not None and state_dict["masks"] is not None:
            engine.set_masks([state_dict["masks"][name] for name in engine.names])
        self._load_extra_state(state_dict)
