"""The shared machinery of the N:M recipe callbacks (STEP, SR-STE, ASP).

Where each piece runs in Lightning's loop (Lightning 2.6; in fp32/bf16 the training step and backward
run *inside* ``optimizer.step(closure)``, with fp16 the closure runs first and the gradients are
unscaled before ``on_before_optimizer_step``), with the recipe's own work (the ``_``-methods a recipe
overrides) named where it happens:

* ``setup``: select the weights to mask (:attr:`NMSparsityCallback.masked_weights`).
* ``on_train_start``: the run's length is known: ``_prepare_run`` resolves step-valued arguments (STEP's
  switch, ASP's pruning step) and may bring the masks into use before the first step (ASP at step 0).
* ``on_train_batch_start`` (first micro-batch of an optimizer step): update the masks if due, save the
  dense weights aside and put the masked weights in place, so forward *and* backward see ``w * mask``
  and the gradient is ``dL/d(w * mask)`` (straight-through). Later micro-batches of the same
  optimizer step find the masked weights already in place: the mask is fixed across accumulation.
* ``on_before_optimizer_step`` (gradients complete and unscaled): restore the dense weights, add the
  SR-STE term (``sr_ste_decay``), zero the pruned gradients for ASP.
* A post-step hook registered on the optimizer marks steps that really ran (an fp16 overflow skips
  ``optimizer.step``), and ``on_train_batch_end`` then does the after-step work: record the loss,
  ``_after_optimizer_step`` (AutoSwitch and the switch, ASP's pruning and re-masking), and on logging
  steps the non-finite loss check and the log (``_recipe_metrics`` adds the recipe's metrics).
* ``on_{validation,test,predict}_start/end``: evaluate the N:M model, then restore the dense weights.
* ``state_dict`` / ``load_state_dict``: masks and counters (a recipe extends both with its own state).

Under DDP nothing about the masks is communicated per step: every rank computes them from the same
(all-reduced) weights. One cheap collective when the masks come into use and one at the end of ``fit``
verify that all ranks agree (:func:`~step_lightning.callbacks.ranks.check_rank_agreement` on the
integers of ``_rank_agreement_scalars`` and :func:`~step_lightning.sparsity.mask_fingerprint`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from step_lightning.callbacks.arguments import RunSteps, select_or_explain, target_problems
from step_lightning.callbacks.nonfinite import NonFiniteLoss, NonFiniteLossWatch
from step_lightning.callbacks.ranks import check_rank_agreement
from step_lightning.checks import IntAtLeast2, NonNegativeInt, PositiveInt, argument_problems, raise_problems
from step_lightning.sparsity import MaskedWeights, SparseTarget

__all__ = ["NMSparsityCallback", "NonFiniteLoss", "recipe_classes"]


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
        on_nonfinite_loss: what to do when the training loss is NaN or infinite: ``"warn"`` (default) once,
            on rank zero, naming the first optimizer step with a non-finite loss and the phase it ran in, then
            keep training and log ``train/nonfinite_loss_steps``; or ``"raise"`` a ``FloatingPointError``
            with that message (stops the run on every rank). See :class:`NonFiniteLossWatch`.

    **DDP.** Masks are plain attributes (DDP does not broadcast them) that every rank computes from the
    same weights. When the masks come into use and at the end of ``fit``, one ``all_gather`` verifies that
    all ranks agree on the steps, the phase and every mask (:func:`.ranks.check_rank_agreement`).

    **Writing a recipe.** Subclass, implement :attr:`masks_active`, and override what the recipe needs:
    :attr:`phase`, :attr:`dynamic_masks`, :attr:`sr_ste_decay`, and the methods the hooks call, documented
    where they are called (see the module docstring for when): ``_prepare_run``, ``_after_optimizer_step``,
    ``_recipe_metrics``, ``_rank_agreement_scalars``; extend ``state_dict`` / ``load_state_dict`` with its state.

    Raises:
        ValueError: invalid arguments (at construction), or (at setup) no maskable weight.
        FloatingPointError: a non-finite training loss with ``on_nonfinite_loss="raise"``.
        RuntimeError: DDP ranks that disagree on masks, phase or steps.
    """

    dynamic_masks: ClassVar[bool] = True
    """Whether masks follow the dense weights (recomputed every ``mask_update_interval`` steps); ASP: no."""

    sr_ste_decay: float = 0.0
    """``lambda_w`` of the SR-STE gradient term added before each optimizer step while masks are active
    (0 = plain STE); an argument of STEP and SR-STE."""

    def __init__(
        self,
        n: PositiveInt = 2,
        m: IntAtLeast2 = 4,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        mask_update_interval: PositiveInt = 1,
        per_layer_log_interval: NonNegativeInt = 10,
        on_nonfinite_loss: NonFiniteLoss = "warn",
    ) -> None:
        # Named after the recipe being built: SR-STE forwards these arguments here unchecked (**kwargs).
        raise_problems(type(self).__name__, [*argument_problems(NMSparsityCallback.__init__, locals()),
                                             *target_problems(n, m, include, exclude)])
        # Plain ints: the parser hands over its constraint types, which a `weights_only` checkpoint load rejects.
        self.n = int(n)
        self.m = int(m)
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.mask_update_interval = int(mask_update_interval)
        self.per_layer_log_interval = int(per_layer_log_interval)
        self.on_nonfinite_loss = on_nonfinite_loss
        self.loss_watch = NonFiniteLossWatch(type(self).__name__)  # read on logging steps and at the end of fit

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
        # Step-valued arguments (STEP's switch, ASP's prune_at) as resolved at the run's start: `_prepare_run`
        # resolves them through `self.run_steps.resolve(...)`, the checkpoint keeps them.
        self.run_steps = RunSteps(type(self).__name__)

    # ---- What a recipe decides -------------------------------------------------------------------
    @property
    @abstractmethod
    def masks_active(self) -> bool:
        """Whether the model is currently N:M (the training forward and evaluation use masks); logged as
        ``sparsity/phase`` (0 or 1)."""

    @property
    def phase(self) -> str:
        """The current phase, as in messages: ``"dense"`` or ``"masked"`` (STEP: ``"precondition"`` or
        ``"mask_learning"``); :attr:`masks_active` says which of the two it is."""
        return "masked" if self.masks_active else "dense"

    def _prepare_run(self, trainer: pl.Trainer) -> None:
        """At ``on_train_start``: resolve step-valued arguments against the run's length."""

    def _after_optimizer_step(self, trainer: pl.Trainer) -> None:
        """At ``on_train_batch_end`` after each optimizer step that really ran: the recipe's step work."""

    def _recipe_metrics(self) -> dict[str, Any]:
        """On logging steps: the recipe's own metrics, logged with the shared ``sparsity/...`` ones."""
        return {}

    def _rank_agreement_scalars(self) -> dict[str, int | None]:
        """Integers every DDP rank must agree on (``None`` for "not yet"), compared by the rank check."""
        return {"optimizer step": self._opt_steps, "masks active": int(self.masks_active)}

    # ---- Public API ------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(n=self.n, m=self.m)

    @property
    def masked_weights(self) -> MaskedWeights | None:
        """The targets' masks and masked-weight swap (``None`` before ``setup``): read them (``masks``, ``names``,
        ``kept()``, ``dense_values()``); the hooks decide when masks are computed, applied and restored."""
        return self._engine

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
        engine = self.attach(pl_module)
        state = pl_module.state_dict()
        state.update(engine.masked_values(fresh=self._fresh_masks()))
        return state

    def _fresh_masks(self) -> bool:
        """Whether the model's N:M form uses masks of the current dense weights (the ones the next
        training step would compute) rather than the stored ones."""
        return self._engine is None or self._engine.masks is None or (
            self.dynamic_masks and self.mask_update_interval == 1)

    # ---- Setup -----------------------------------------------------------------------------------
    def attach(self, pl_module: pl.LightningModule) -> MaskedWeights:
        """Select ``pl_module``'s targets (as ``setup`` does; idempotent), e.g. before ``load_state_dict``
        outside a Trainer. Returns :attr:`masked_weights`."""
        if self._engine is not None and self._module_id == id(pl_module):
            return self._engine
        targets = select_or_explain(type(self).__name__, pl_module, self.n, self.m, self.include, self.exclude)
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
        self.attach(pl_module)

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
        self.loss_watch.reset()
        was_active = self.masks_active
        self._prepare_run(trainer)  # the recipe's arguments meet the run's length (STEP's switch, ASP's step)
        if self.masks_active and not was_active:  # e.g. ASP pruning before the first step
            self._check_ranks(trainer, "when the masks came into use")

    # ---- Training step ---------------------------------------------------------------------------
    def _should_log(self, trainer: pl.Trainer) -> bool:
        # Whether Lightning logs this step: its own rule (`log_every_n_steps` counted in batches that stepped,
        # `should_stop`), which it exposes only on the private logger connector. Reading it, rather than
        # recomputing it from other private loop counters, keeps our tags on exactly Lightning's steps.
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
        self.loss_watch.record(outputs, self._opt_steps, self.phase)  # the phase the step ran in
        was_active = self.masks_active
        self._after_optimizer_step(trainer)  # the recipe's step work: AutoSwitch, the switch, ASP's (re)masking
        if self.masks_active and not was_active:  # STEP's switch, ASP's pruning
            # Every rank gets here after the same step: the switch decision is broadcast (AutoSwitch) or a
            # function of the step count, which DDP keeps equal (its gradient all-reduce needs that too).
            self._check_ranks(trainer, "when the masks came into use")
        every = trainer.log_every_n_steps
        if every and self._opt_steps % every == 0:
            self.loss_watch.check(trainer, self._opt_steps, self.on_nonfinite_loss)
        if self._should_log(trainer):
            self._log(pl_module)

    def _log(self, pl_module: pl.LightningModule) -> None:
        engine = self._engine
        assert engine is not None
        pl_module.log("sparsity/phase", float(self.masks_active), on_step=True, on_epoch=False, prog_bar=True,
                      batch_size=1)
        self._log_calls += 1
        per_layer = bool(self.per_layer_log_interval) and (self._log_calls - 1) % self.per_layer_log_interval == 0
        stats = engine.stats(self.masks_active, self._pending_flips, per_layer)
        metrics: dict[str, Any] = {f"sparsity/{key}": value for key, value in stats.items()}
        metrics.update(self._recipe_metrics())  # the recipe's own: AutoSwitch statistic, threshold, switch step
        if self.loss_watch.count is not None:
            metrics["train/nonfinite_loss_steps"] = self.loss_watch.count.float()
        self._pending_flips = None
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _check_ranks(self, trainer: pl.Trainer, when: str) -> None:  # collective: every rank, same point
        if self._engine is not None:
            check_rank_agreement(trainer, type(self).__name__, self._engine, self._rank_agreement_scalars(), when,
                                 self._opt_steps)

    # ---- Evaluation: always the N:M model. -------------------------------------------------------
    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.attach(pl_module)
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

    # Test and predict evaluate the same N:M model as validation.
    on_test_start = on_predict_start = on_validation_start
    on_test_end = on_predict_end = on_validation_end

    # ---- End of training, errors -----------------------------------------------------------------
    def _restore_dense(self) -> None:
        if self._engine is not None:
            self._engine.restore_()
        self._eval_applied = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before anything is restored; every rank runs on_train_end once, so the collectives match.
        self.loss_watch.check(trainer, self._opt_steps, self.on_nonfinite_loss)
        self._check_ranks(trainer, "at the end of fit")
        self._restore_dense()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_dense()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_dense()
        self._remove_hooks()

    # ---- Checkpoints -----------------------------------------------------------------------------
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
        # The masks in memory belong to other weights (e.g. the end of `fit` before `test(ckpt_path="best")`):
        # `load_state_dict` installs the checkpoint's, and without any (saved before the masks existed, or
        # weights only) evaluation computes them from the checkpoint's weights.
        if self._engine is not None:
            self._engine.clear_masks()

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
            "resolved_steps": self.run_steps.state_dict(),
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
        self.run_steps.load_state_dict(state_dict.get("resolved_steps", {}))
        if engine is not None and state_dict["masks"] is not None:
            engine.set_masks([state_dict["masks"][name] for name in engine.names])
