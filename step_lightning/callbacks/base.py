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

Under DDP nothing about the masks is communicated per step: every rank computes them from the same
(all-reduced) weights. One cheap collective at the switch and one at the end of ``fit`` verify that all
ranks agree (:func:`mask_fingerprint`, :func:`describe_rank_mismatch`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from step_lightning.sparsity import MaskedWeights, SparseTarget, format_table, select_targets
from step_lightning.sparsity.nm import check_nm

NonFiniteLoss = Literal["raise", "warn"]
NONFINITE_LOSS_MODES: tuple[str, ...] = ("raise", "warn")

_NO_STEP = 2**62  # "no non-finite loss seen yet" in the device-side record
_PHASE_SLOTS = 16  # the record packs (step, phase code) as step * _PHASE_SLOTS + phase code
_LOSS_KINDS = ("finite", "nan", "inf", "-inf")
_HASH_CHUNK = 1 << 22  # positions hashed per kernel: bounds the temporary memory of a fingerprint
_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash: spreads positions over 32 bits


def resolve_step(value: int | float, total: int | float, arg: str, allow_zero: bool = True) -> int:
    """An optimizer step given as an int, or as a float fraction of the run's ``total`` optimizer steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{arg}` must be an int (optimizer step) or a float in (0, 1) (fraction of the run), "
                         f"got {value!r}.")
    if isinstance(value, float) and value >= 1.0 and value.is_integer():
        value = int(value)  # a whole number >= 1 is a step: jsonargparse can hand a YAML `4000` over as 4000.0
    if isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{arg}`={value!r} as a float is a fraction of the run's optimizer steps and must "
                             "be in (0, 1); pass an int for an absolute step.")
        if not math.isfinite(total) or total < 1:  # Lightning says -1 for a loader without a length
            raise ValueError(f"`{arg}`={value!r} is a fraction of the run, but the run has no finite length: set "
                             "`trainer.max_steps` or `trainer.max_epochs`, or pass an int step.")
        return max(1, round(value * total))
    if value < (0 if allow_zero else 1):
        raise ValueError(f"`{arg}` must be >= {0 if allow_zero else 1}, got {value!r}.")
    return value


@torch.no_grad()
def mask_fingerprint(masks: Sequence[Tensor]) -> Tensor:
    """A cheap, exact-enough summary of masks to compare across DDP ranks, computed on the masks' device.

    Args:
        masks: boolean masks of any shape (the grouping axis does not matter: positions are hashed in
            the flattened row-major order of each mask).

    Returns:
        An ``int64`` tensor of shape ``(len(masks), 2)``: per mask, the number of kept entries and a
        hash of their positions (the sum over kept positions ``i`` of the low 32 bits of
        ``i * 0x9E3779B1``, wrapping in int64). The position weights are distinct (for fewer than 2**32
        entries), so one kept entry moved within its group always changes the hash; several moves cancel
        out only by coincidence. Integer sums do not depend on the reduction order, so equal masks give
        equal fingerprints on any device. Cost: a few kernels per ``_HASH_CHUNK`` entries, no host sync.
    """
    if not masks:
        return torch.zeros(0, 2, dtype=torch.int64)
    rows = []
    for mask in masks:
        flat = mask.reshape(-1)
        kept = flat.sum(dtype=torch.int64)
        digest = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            part = flat[start:start + _HASH_CHUNK]
            positions = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device)
            weights = (positions * _HASH_MULTIPLIER) & 0xFFFFFFFF
            digest += torch.where(part.bool(), weights, 0).sum()
        rows.append(torch.stack([kept, digest]))
    return torch.stack(rows)


def describe_rank_mismatch(fingerprints: Tensor, scalar_names: Sequence[str], layer_names: Sequence[str]) -> list[str]:
    """Compare per-rank fingerprints with rank 0's and say, per differing rank, in what they differ.

    Args:
        fingerprints: ``(world_size, len(scalar_names) + 2 * len(layer_names))`` integers, one row per rank:
            the named scalars (a negative value reads "none"), then per layer the two columns of
            :func:`mask_fingerprint` (kept entries, position hash).
        scalar_names: what each scalar column is, e.g. ``"switch step"``.
        layer_names: the masked weights, in column order.

    Returns:
        One line per rank that differs from rank 0 (empty when all ranks agree), e.g.
        ``"rank 1: switch step 40 (rank 0: 30); mask of fc.weight: same kept count 512, other positions"``.

    Raises:
        ValueError: ``fingerprints`` does not have the shape the names describe.
    """
    width = len(scalar_names) + 2 * len(layer_names)
    if fingerprints.ndim != 2 or fingerprints.shape[1] != width:
        raise ValueError(f"`fingerprints` must have shape (world_size, {width}) for {len(scalar_names)} scalars and "
                         f"{len(layer_names)} layers, got {tuple(fingerprints.shape)}.")

    def show(value: int) -> str:
        return "none" if value < 0 else str(value)

    rows = fingerprints.tolist()
    lines = []
    for rank, row in enumerate(rows[1:], start=1):
        diffs = [f"{name} {show(row[i])} (rank 0: {show(rows[0][i])})"
                 for i, name in enumerate(scalar_names) if row[i] != rows[0][i]]
        for j, name in enumerate(layer_names):
            k = len(scalar_names) + 2 * j
            if row[k] != rows[0][k]:
                diffs.append(f"mask of {name}: {show(row[k])} kept entries (rank 0: {show(rows[0][k])})")
            elif row[k + 1] != rows[0][k + 1]:
                diffs.append(f"mask of {name}: same kept count {row[k]}, other positions")
        if diffs:
            lines.append(f"rank {rank}: " + "; ".join(diffs))
    return lines


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
            with that message (stops the run on every rank).

    **Non-finite loss.** Masks computed from NaN weights are meaningless and a NaN second moment never
    lets AutoSwitch decide, so a recipe run does not continue silently on a NaN loss. Like Lightning,
    which keeps training on a NaN loss unless told otherwise, the default warns; ``"raise"`` stops the run.
    The loss returned by ``training_step`` (the last micro-batch of every optimizer step that ran; steps
    that fp16's ``GradScaler`` skipped are not counted: the scaler already discards them) is recorded on
    the device with no host sync; the record is read on the trainer's logging steps (every
    ``trainer.log_every_n_steps`` optimizer steps, where Lightning syncs for logging anyway) and at the
    end of ``fit``, so the report may come a few steps late, but names the first step, e.g.
    ``non-finite training loss (nan) at optimizer step 37 in phase 'precondition'``. Under DDP the
    records of all ranks are gathered, so every rank raises at the same step. Lightning's
    ``Trainer(detect_anomaly=True)`` finds the operation that produced a NaN;
    ``EarlyStopping(check_finite=True)`` stops on a non-finite *monitored* metric instead.

    **DDP.** Masks are plain attributes (DDP does not broadcast them) that every rank computes from the
    same weights; the switch decision is broadcast from rank 0. With ``trainer.world_size > 1`` one
    ``all_gather`` of a few integers per rank, when the masks come into use (STEP's switch, ASP's pruning)
    and at the end of ``fit``, verifies that all ranks agree on the optimizer step, the phase, the
    recipe's switch step and every mask (kept count and a position hash per layer), and raises a
    ``RuntimeError`` naming the ranks and what differs otherwise.

    Raises:
        FloatingPointError: a non-finite training loss with ``on_nonfinite_loss="raise"``.
        RuntimeError: DDP ranks that disagree on masks, phase or steps.
    """

    phase_names: tuple[str, ...] = ("dense", "masked")
    """Names of :attr:`phase_code` values, for messages."""

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        mask_update_interval: int = 1,
        per_layer_log_interval: int = 10,
        on_nonfinite_loss: NonFiniteLoss = "warn",
    ) -> None:
        check_nm(n, m)
        if isinstance(mask_update_interval, bool) or not isinstance(mask_update_interval, int) \
                or mask_update_interval < 1:
            raise ValueError(f"`mask_update_interval` must be an integer >= 1, got {mask_update_interval!r}.")
        if not isinstance(per_layer_log_interval, int) or per_layer_log_interval < 0:
            raise ValueError(f"`per_layer_log_interval` must be an integer >= 0, got {per_layer_log_interval!r}.")
        if on_nonfinite_loss not in NONFINITE_LOSS_MODES:
            raise ValueError(f"`on_nonfinite_loss` must be one of {list(NONFINITE_LOSS_MODES)}, "
                             f"got {on_nonfinite_loss!r}.")
        # Fail on bad regexes now, not at setup.
        select_targets(torch.nn.Module(), n, m, include, exclude)
        self.n = n
        self.m = m
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.mask_update_interval = mask_update_interval
        self.per_layer_log_interval = per_layer_log_interval
        self.on_nonfinite_loss = on_nonfinite_loss

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
        # Device-side record of non-finite losses (first step and phase, its value, count): no sync per step.
        self._loss_first: Tensor | None = None
        self._loss_value: Tensor | None = None
        self._loss_count: Tensor | None = None
        self._nonfinite_seen = False

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

    def _rank_scalars(self) -> dict[str, int | None]:
        """Integers every DDP rank must agree on (``None`` for "not yet"), compared by the rank check."""
        return {"optimizer step": self._opt_steps, "phase code": self.phase_code}

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
        self._loss_first = self._loss_value = self._loss_count = None
        self._nonfinite_seen = False
        was_active = self.masks_active
        self._on_train_start(trainer)
        if self.masks_active and not was_active:  # e.g. ASP pruning before the first step
            self._check_ranks(trainer, "when the masks came into use")

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
        self._record_loss(outputs)
        was_active = self.masks_active
        self._after_step(trainer, pl_module)
        if self.masks_active and not was_active:  # STEP's switch, ASP's pruning
            # Every rank gets here after the same step: the switch decision is broadcast (AutoSwitch) or a
            # function of the step count, which DDP keeps equal (its gradient all-reduce needs that too).
            self._check_ranks(trainer, "when the masks came into use")
        every = trainer.log_every_n_steps
        if every and self._opt_steps % every == 0:
            self._check_loss(trainer)
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
        if self._nonfinite_seen and self._loss_count is not None:
            metrics["train/nonfinite_loss_steps"] = self._loss_count.float()
        self._log_calls += 1
        if self.per_layer_log_interval and (self._log_calls - 1) % self.per_layer_log_interval == 0:
            for i, name in enumerate(engine.names):
                metrics[f"sparsity/layers/{name}/kept"] = kept[i] / sizes[i]
                if flips is not None:
                    metrics[f"sparsity/layers/{name}/flip_rate"] = flips[i] / sizes[i]
        self._pending_flips = None
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ----------------------------------------------------------------------------------------------
    # Non-finite loss and DDP rank agreement
    # ----------------------------------------------------------------------------------------------
    @property
    def phase_name(self) -> str:
        """The current phase, as in messages (``phase_names[phase_code]``)."""
        return self.phase_names[self.phase_code]

    @torch.no_grad()
    def _record_loss(self, outputs: Any) -> None:
        """Fold this step's loss into the device-side record: a few tiny kernels, no host sync."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        loss = loss.detach().float()
        if loss.numel() != 1:
            loss = loss.sum()  # one non-finite element makes the sum non-finite
        loss = loss.reshape(())
        if self._loss_first is None or self._loss_first.device != loss.device:
            self._loss_first = torch.full((), _NO_STEP, dtype=torch.int64, device=loss.device)
            self._loss_value = torch.zeros((), device=loss.device)
            self._loss_count = torch.zeros((), dtype=torch.int64, device=loss.device)
        assert self._loss_value is not None and self._loss_count is not None
        finite = torch.isfinite(loss)
        code = torch.where(finite, _NO_STEP, self._opt_steps * _PHASE_SLOTS + self.phase_code)
        first = code < self._loss_first
        self._loss_first = torch.minimum(self._loss_first, code)
        self._loss_value = torch.where(first, loss, self._loss_value)
        self._loss_count += finite.logical_not()

    def _check_loss(self, trainer: pl.Trainer) -> None:
        """Read the non-finite-loss record (one sync; one small all_gather under DDP) and raise or warn."""
        if self._nonfinite_seen and self.on_nonfinite_loss == "warn":
            return  # warned once; every rank knows (the record was gathered), so every rank skips
        device = trainer.strategy.root_device
        if self._loss_first is None or self._loss_value is None or self._loss_count is None:
            record = torch.tensor([_NO_STEP, 0, 0], dtype=torch.int64, device=device)
        else:
            value = self._loss_value
            kind = torch.where(value.isnan(), 1, torch.where(value > 0, 2, 3))
            kind = torch.where(self._loss_count > 0, kind, 0)
            record = torch.stack([self._loss_first, self._loss_count, kind]).to(device)
        # Every rank reaches this at the same optimizer steps, so the collective is matched.
        rows = (trainer.strategy.all_gather(record) if trainer.world_size > 1 else record[None]).tolist()
        bad = [(rank, row) for rank, row in enumerate(rows) if row[1] > 0]
        if not bad:
            return
        self._nonfinite_seen = True
        code, _, kind = min(row for _, row in bad)
        step, phase = divmod(code, _PHASE_SLOTS)
        phase_name = self.phase_names[phase] if phase < len(self.phase_names) else str(phase)
        where = f" on rank {', '.join(str(rank) for rank, _ in bad)}" if trainer.world_size > 1 else ""
        count = max(row[1] for _, row in bad)
        message = (
            f"{type(self).__name__}: non-finite training loss ({_LOSS_KINDS[kind]}) at optimizer step {step} in "
            f"phase {phase_name!r}{where}; {count} optimizer step(s) up to step {self._opt_steps} had a non-finite "
            "loss. Usual causes: a learning rate too high, exploding gradients (set `trainer.gradient_clip_val`), "
            "fp16 overflow (try `trainer.precision: bf16-mixed`), bad input data; `trainer.detect_anomaly: true` "
            "finds the operation that produced it."
        )
        if self.on_nonfinite_loss == "raise":
            raise FloatingPointError(message + " Set `on_nonfinite_loss: warn` in the recipe callback's init_args "
                                               "to keep training anyway.")
        rank_zero_warn(message + " Training continues (`on_nonfinite_loss='warn'`); the count is logged as "
                                 "`train/nonfinite_loss_steps`.")

    def _check_ranks(self, trainer: pl.Trainer, when: str) -> None:
        """Under DDP, verify with one all_gather that every rank holds the same masks, phase and steps.

        Collective: every rank must call it at the same point (never inside a rank-0-only branch).
        """
        if trainer.world_size <= 1 or self._engine is None:
            return
        engine = self._engine
        device = trainer.strategy.root_device
        scalars = self._rank_scalars()
        masks = engine.masks
        if masks is None and not engine.applied:
            # No stored masks yet (STEP right at its switch, or dense until the end): those of the
            # current weights, i.e. the ones the next step would use and `export` would write.
            masks = engine.compute_masks()
        if masks is None:
            layers = torch.full((len(engine.names), 2), -1, dtype=torch.int64, device=device)
        else:
            layers = mask_fingerprint(masks).to(device)
        values = torch.tensor([-1 if v is None else v for v in scalars.values()], dtype=torch.int64, device=device)
        gathered = trainer.strategy.all_gather(torch.cat([values, layers.reshape(-1)]))
        gathered = gathered.cpu()
        problems = describe_rank_mismatch(gathered, list(scalars), engine.names)
        if problems:
            rank0 = ", ".join(f"{name} {'none' if v < 0 else v}"
                              for name, v in zip(scalars, gathered[0, :len(scalars)].tolist(), strict=True))
            raise RuntimeError(
                f"{type(self).__name__}: the {trainer.world_size} DDP ranks disagree {when} (rank 0: {rank0}): "
                + " | ".join(problems) + ". Every rank computes "
                "the N:M masks from its own copy of the weights and must end up with the same masks and switch step. "
                "Usual causes: non-deterministic kernels or different GPU models / library versions across nodes "
                "(try `trainer.deterministic: true`), ranks that started from different weights or callback state "
                "(initialise or load checkpoints identically on every rank), or a custom sampler or data pipeline that "
                "lets ranks run different numbers of steps (use Lightning's distributed sampler: "
                "`trainer.use_distributed_sampler: true`)."
            )
        rank_zero_info(f"{type(self).__name__}: all {trainer.world_size} ranks agree {when} (optimizer step "
                       f"{self._opt_steps}): {', '.join(scalars)} and the masks of {len(engine.names)} weights.")

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
        # Before anything is restored; every rank runs on_train_end once, so the collectives match.
        self._check_loss(trainer)
        self._check_ranks(trainer, "at the end of fit")
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
