"""StepAdamW: Adam(W) whose second moment can be frozen per parameter (STEP, Lu et al., ICML 2023, arXiv 2302.01172)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from step_lightning.checks import NonNegativeFloat, PositiveFloat, UnitIntervalOpenRight, check_arguments
from step_lightning.optim import fused
from step_lightning.optim.watched_levels import WatchedLevels

Implementation = Literal["auto", "fused", "foreach"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)

FROZEN_V = "frozen_exp_avg_sq"
"""State key of the raw second moment ``v*`` of a frozen parameter (the key ``exp_avg_sq`` had before the freeze)."""
# v at or below the smallest normal float32 counts as 0 (never had a gradient): it maps to log(v / TINY) = 0 exactly.
_TINY = torch.finfo(torch.float32).tiny
_LOG_TINY = math.log(_TINY)


class StepAdamW(Optimizer):
    r"""AdamW that can freeze the second moment of chosen parameters: the optimizer of STEP.

    Until :meth:`freeze_second_moment` is called it is ``torch.optim.AdamW`` (same update, same state
    names; ``weight_decay=0`` gives Adam): bitwise ``AdamW(fused=True)`` where the fused kernel applies,
    bitwise ``AdamW(foreach=True)`` with ``implementation="foreach"`` (see ``implementation``). For a frozen parameter
    the second moment stops updating and acts as a fixed preconditioner (the STEP paper's phase 2)::

        m = beta1 * m + (1 - beta1) * g          # continues, never reset
        w = w * (1 - lr * weight_decay)
        w = w - lr * (m / (1 - beta1 ** k)) / denom

    with ``denom = sqrt(v*) + frozen_eps`` (reference: ``v*`` the raw ``v`` at the freeze,
    ``frozen_eps = eps ** 0.75``) or, with ``frozen_bias_correction=True``,
    ``denom = sqrt(v* / (1 - beta2 ** T0)) + eps`` (bitwise AdamW's denominator of step ``T0``). The
    state keeps the raw ``v*`` in place of ``exp_avg_sq`` (state key ``frozen_exp_avg_sq``, with the
    freeze step ``T0`` in ``frozen_step``) and derives ``denom`` from it in every step, so that
    ``frozen_eps`` and ``frozen_bias_correction`` are settings, not baked into the state: an optimizer
    built with other values than a loaded state dict's keeps its own (with a warning) and they take
    effect from the next step. A frozen step still costs fewer passes than an AdamW step (no update of
    ``v``). Everything, including which parameters are frozen, round-trips through ``state_dict()`` /
    ``load_state_dict()``; a state dict from before this change (a ``frozen_denom`` key) is converted.

    For the AutoSwitch test it can also measure, for parameters passed to :meth:`watch`, how fast the
    second moment still moves: after each step :attr:`second_moment_stats` holds device scalars (no
    host sync), over the elements of the watched, unfrozen parameters that have a gradient in that step
    (a watched weight without one is left out of every mean, as if it were not watched):

    * ``abs_dv = mean |v_t - v_{t-1}|`` (``v_t - v_{t-1} = (1 - beta2)(g^2 - v_{t-1})``, so no copy of
      ``v`` is kept);
    * ``rel_dv = sum |v_t - v_{t-1}| / sum v_t``, of the raw, bias-uncorrected ``v``;
    * ``log_v_hat = mean log v_hat_t``, the log of the geometric mean of the bias-corrected second moment
      ``v_hat = v / (1 - beta2 ** k)``, over the elements with ``v > 0`` (an element that never had a
      nonzero gradient has no scale to measure). Scaling the loss by ``c`` shifts it by ``2 log c``, so
      its changes are scale-free. One extra pass over ``v``, in the scratch buffer of ``abs_dv``;
    * ``log_v_hat_layers``: the same mean, per watched tensor (a 1-D tensor in :meth:`watch` order; a tensor
      without a gradient in the step keeps its last value, NaN before its first gradient, 0 while it has no
      ``v > 0``): what the ``"layer_rise"`` AutoSwitch test watches, so that weights moving in opposite
      directions cannot cancel in one global mean.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: Adam's epsilon (added to ``sqrt(v_hat)``).
        weight_decay: decoupled weight decay, as in AdamW (``0`` for Adam without decay).
        frozen_eps: the epsilon of the frozen denominator; ``None`` means ``eps ** 0.75``, the
            reference (1e-6 for eps = 1e-8). Ignored with ``frozen_bias_correction``.
        frozen_bias_correction: use ``sqrt(v* / (1 - beta2 ** T0)) + eps`` instead of the reference
            ``sqrt(v*) + frozen_eps``; the two agree for a freeze after several thousand steps.
        implementation: ``"foreach"``, the reference: ``torch._foreach_*`` ops, one pass over the weights per
            op (bitwise ``AdamW(foreach=True)`` before the freeze). ``"fused"``: PyTorch's fused AdamW kernel
            before the freeze (bitwise ``AdamW(fused=True)``, which differs from foreach in the last bits),
            and ``torch.compile``d kernels for the watched statistic and the frozen update (same values to
            rounding; :mod:`step_lightning.optim.fused`); every parameter must be floating point on a
            device with fused kernels (CPU, CUDA...). ``"auto"`` (default): the fused AdamW kernel where
            the device and dtype allow, foreach elsewhere, and the compiled kernels on CUDA only (on CPU a
            compile takes 20-60 s, which short runs do not repay: benchmarks/RESULTS.md). A compile that
            fails falls back to foreach with one warning. The state dict is the same for all three, so a
            checkpoint resumes under any of them.

    Example (YAML, with the STEP recipe callback)::

        optimizer:
          class_path: step_lightning.StepAdamW
          init_args: {lr: 1.0e-3, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.0}
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: NonNegativeFloat = 1e-3,
        betas: tuple[UnitIntervalOpenRight, UnitIntervalOpenRight] = (0.9, 0.999),
        eps: PositiveFloat = 1e-8,
        weight_decay: NonNegativeFloat = 1e-2,
        frozen_eps: PositiveFloat | None = None,
        frozen_bias_correction: bool = False,
        implementation: Implementation = "auto",
    ) -> None:
        check_arguments(StepAdamW, locals())
        # Plain floats in a tuple (YAML gives lists, the parser its constraint types): the param groups go into
        # checkpoints, which a `weights_only` load must read.
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay), frozen_eps=None if frozen_eps is None else float(frozen_eps),
                        frozen_bias_correction=frozen_bias_correction)
        super().__init__(params, defaults)
        self.implementation: Implementation = implementation
        if implementation == "fused":
            unfit = [p for g in self.param_groups for p in g["params"] if not fused.fused_supported(p)]
            if unfit:
                raise ValueError(
                    f"StepAdamW: `implementation`='fused' needs floating-point parameters on a device with fused "
                    f"kernels; got one of dtype {unfit[0].dtype} on {unfit[0].device}. Use implementation='auto' "
                    "(fused where possible, foreach elsewhere) or 'foreach'.")
        self._watched = WatchedLevels()
        self._scratch: dict[int, Tensor] = {}
        self.second_moment_stats: dict[str, Tensor] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups (deepcopy, pickling): watching is
        # configuration, set again by whoever watches.
        super().__setstate__(state)
        self.__dict__.setdefault("implementation", "auto")
        self._watched, self._scratch, self.second_moment_stats = WatchedLevels(), {}, None

    # ----------------------------------------------------------------------------------------------
    # Freezing and watching
    # ----------------------------------------------------------------------------------------------
    def _group_of(self, params: Iterable[Tensor], what: str) -> list[tuple[Tensor, dict[str, Any]]]:
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        found = []
        for p in params:
            if id(p) not in owner:
                raise ValueError(f"StepAdamW.{what}: a parameter of shape {tuple(p.shape)} is not in this "
                                 "optimizer's param_groups.")
            found.append((p, owner[id(p)]))
        return found

    def watch(self, params: Iterable[Tensor]) -> None:
        """Measure the second-moment change of ``params`` in every step (see :attr:`second_moment_stats`)."""
        found = self._group_of(params, "watch")
        self._watched = WatchedLevels([p for p, _ in found])
        self._scratch = {k: v for k, v in self._scratch.items() if k in self._watched.positions}
        self.second_moment_stats = None

    def _scratch_for(self, params: list[Tensor]) -> list[Tensor]:
        out = []
        for p in params:
            buf = self._scratch.get(id(p))
            if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != p.dtype:
                buf = self._scratch[id(p)] = torch.empty_like(p)
            out.append(buf)
        return out

    def is_frozen(self, param: Tensor) -> bool:
        return FROZEN_V in self.state.get(param, {})

    @torch.no_grad()
    def freeze_second_moment(self, params: Iterable[Tensor], names: Sequence[str] | None = None) -> None:
        """Freeze ``v`` of ``params`` at its current value; they follow the frozen update from the next step.

        Args:
            params: the parameters to freeze (already frozen ones are left as they are).
            names: a name per parameter, for error messages (e.g. ``net.fc1.weight``); default: shapes.

        Raises:
            ValueError: a parameter is not in this optimizer, or has no state yet (it has never taken
                a step, so there is no second moment to freeze).
            FloatingPointError: the second moment of a parameter holds NaN or inf (every later update of
                it would be NaN); nothing is frozen then.
        """
        found = self._group_of(params, "freeze_second_moment")
        labels = list(names) if names is not None else [f"a parameter of shape {tuple(p.shape)}" for p, _ in found]
        if len(labels) != len(found):
            raise ValueError(f"StepAdamW.freeze_second_moment: got {len(labels)} names for {len(found)} parameters.")
        todo = [(p, group, label) for (p, group), label in zip(found, labels, strict=True)
                if FROZEN_V not in self.state.get(p, {})]
        stateless = [label for p, _, label in todo if "exp_avg_sq" not in self.state.get(p, {})]
        if stateless:
            raise ValueError(
                f"StepAdamW.freeze_second_moment: {', '.join(stateless)} has not taken an optimizer step yet (it never "
                "had a gradient), so it has no second moment to freeze. Freeze after at least one step in which it "
                "gets a gradient."
            )
        if todo:  # one host sync for all of them, before anything changes
            finite = torch.stack([self.state[p]["exp_avg_sq"].isfinite().all().cpu() for p, _, _ in todo]).tolist()
            bad = [label for (_, _, label), ok in zip(todo, finite, strict=True) if not ok]
            if bad:
                raise FloatingPointError(
                    f"StepAdamW.freeze_second_moment: the second moment of {', '.join(bad)} holds NaN or inf; frozen, "
                    "it would make every later update NaN, so nothing was frozen. A non-finite gradient reached the "
                    "optimizer before the freeze: check the loss and the gradients (e.g. gradient clipping, a lower "
                    "learning rate, bf16 instead of fp16)."
                )
        for p, _, _ in todo:
            state = self.state[p]
            state[FROZEN_V] = state.pop("exp_avg_sq")
            state["frozen_step"] = int(state["step"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, except that ``frozen_eps`` and ``frozen_bias_correction``
        stay this optimizer's (a warning names any that differ from the state dict's): they only choose how the
        frozen denominator is derived from the stored ``v*``. A state dict from before the raw ``v*`` was kept
        (a ``frozen_denom`` key) is converted back to ``v*`` with its own settings."""
        configured = [(g["frozen_eps"], g["frozen_bias_correction"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for index, (group, (frozen_eps, bias_correction)) in enumerate(zip(self.param_groups, configured,
                                                                             strict=True)):
            for p in group["params"]:
                state = self.state.get(p, {})
                if "frozen_denom" in state:
                    state[FROZEN_V] = _v_from_frozen_denom(state.pop("frozen_denom"), group, state["frozen_step"])
            saved = (group["frozen_eps"], group["frozen_bias_correction"])
            if saved != (frozen_eps, bias_correction):
                warnings.warn(
                    f"StepAdamW.load_state_dict: param group {index} was saved with frozen_eps={saved[0]}, "
                    f"frozen_bias_correction={saved[1]}; this optimizer's frozen_eps={frozen_eps}, "
                    f"frozen_bias_correction={bias_correction} apply from the next step, to the frozen second moment "
                    "already in the state as well.", stacklevel=2)
                group["frozen_eps"], group["frozen_bias_correction"] = frozen_eps, bias_correction

    # ----------------------------------------------------------------------------------------------
    # Step
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Per (group, device, dtype) bucket of watched weights with a gradient: device scalars and host counts.
        sums: dict[str, list[Any]] = {"abs_dv": [], "v": [], "log_v_hat": [], "nonzero": [], "numel": [],
                                      "layers": []}
        for group in self.param_groups:
            # (device, dtype, frozen) -> lists, so each foreach call sees one device and dtype.
            buckets: dict[tuple[torch.device, torch.dtype, bool], dict[str, list[Any]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StepAdamW does not support sparse gradients.")
                if torch.is_complex(p):
                    raise RuntimeError("StepAdamW does not support complex parameters.")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                frozen = FROZEN_V in state
                b = buckets.setdefault((p.device, p.dtype, frozen), {k: [] for k in
                                       ("params", "grads", "exp_avgs", "second", "steps", "watched")})
                b["params"].append(p)
                b["grads"].append(p.grad)
                b["exp_avgs"].append(state["exp_avg"])
                b["second"].append(state[FROZEN_V] if frozen else state["exp_avg_sq"])
                b["steps"].append(state["step"])
                b["watched"].append(self._watched.watches(p))
            for (device, _, frozen), b in buckets.items():
                compiled = self._compiled(device)
                if frozen:
                    self._frozen_update(group, b, compiled)
                elif self.implementation != "foreach" and all(fused.fused_supported(p) for p in b["params"]):
                    self._fused_adamw_update(group, b, sums, compiled)
                else:
                    self._adamw_update(group, b, sums)

        if self._watched and sums["numel"]:
            def total(key: str) -> Tensor:
                return torch.stack([x.to(sums[key][0].device, torch.float32) for x in sums[key]]).sum()

            abs_dv = total("abs_dv")
            self.second_moment_stats = {"abs_dv": abs_dv / sum(sums["numel"]), "rel_dv": abs_dv / total("v"),
                                        "log_v_hat": total("log_v_hat") / total("nonzero"),
                                        "log_v_hat_layers": self._watched.update(sums["layers"])}
        else:
            self.second_moment_stats = None
        return loss

    def _compiled(self, device: torch.device) -> bool:
        """Whether the compiled statistic and frozen kernels serve the parameters on ``device`` (else foreach)."""
        if self.implementation == "foreach" or not fused.compiled_available(device):
            return False
        return self.implementation == "fused" or device.type == "cuda"

    @staticmethod
    def _count_steps(steps: list[Tensor]) -> None:
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)

    def _adamw_update(self, group: dict[str, Any], b: dict[str, list[Any]], sums: dict[str, list[Any]]) -> None:
        # Mirrors torch.optim.adam._multi_tensor_adam (decoupled decay, not capturable) op for op, so
        # that before any freeze the result is bitwise that of torch.optim.AdamW(foreach=True).
        params, grads, exp_avgs, exp_avg_sqs = b["params"], b["grads"], b["exp_avgs"], b["second"]
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        steps = self._steps_on(params, b["steps"], device_side=False)
        self._count_steps(steps)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        watched = [i for i, w in enumerate(b["watched"]) if w]
        if watched:
            self._watched_stats(group, b, sums, watched, after=False)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        if watched:
            self._watched_stats(group, b, sums, watched, after=True)
        bias_correction1 = [1 - beta1 ** s.item() for s in steps]
        bias_correction2 = [1 - beta2 ** s.item() for s in steps]
        step_size = [(lr / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    def _watched_stats(self, group: dict[str, Any], b: dict[str, list[Any]], sums: dict[str, list[Any]],
                       watched: list[int], after: bool) -> None:
        """The foreach statistic of the watched tensors: ``after=False`` before ``v`` is updated (``|dv|``),
        ``after=True`` after it (``sum v``, ``log v_hat``)."""
        _, beta2 = group["betas"]
        # A scratch buffer kept while watching (phase 1 only, where the masked-forward buffers of
        # phase 2 do not exist yet): a fresh allocation per step costs page faults on CPU.
        dv = self._scratch_for([b["params"][i] for i in watched])
        if not after:
            # |v_t - v_{t-1}| = (1 - beta2) |g^2 - v_{t-1}|, from the old v, before it is overwritten.
            w_grads = [b["grads"][i] for i in watched]
            torch._foreach_copy_(dv, [b["second"][i] for i in watched])
            torch._foreach_addcmul_(dv, w_grads, w_grads, -1.0)  # v - g^2
            sums["abs_dv"].append(torch.stack(torch._foreach_norm(dv, 1)).sum() * (1 - beta2))
            sums["numel"].append(sum(g.numel() for g in w_grads))
            return
        w_v = [b["second"][i] for i in watched]
        sums["v"].append(torch.stack(torch._foreach_norm(w_v, 1)).sum())
        # sum of log v_hat over v > 0 with foreach ops only: l = log(max(v, TINY) / TINY) is >= 0 (so its
        # 1-norm is its sum) and exactly 0 where v is 0 (so its 0-norm counts the v > 0);
        # log v_hat = l + log(TINY) - log(1 - beta2 ** k) on those. The scratch buffer is free again.
        torch._foreach_copy_(dv, w_v)
        torch._foreach_clamp_min_(dv, _TINY)
        torch._foreach_log_(dv)
        torch._foreach_add_(dv, -_LOG_TINY)
        nonzero = torch._foreach_norm(dv, 0, dtype=torch.float32)
        shift = [_LOG_TINY - math.log(1 - beta2 ** b["steps"][i].item()) for i in watched]  # host numbers: no copy
        log_sums = torch.stack(torch._foreach_norm(dv, 1, dtype=torch.float32)) + torch.stack(
            torch._foreach_mul(nonzero, shift))
        self._add_log_sums(sums, [b["params"][i] for i in watched], log_sums, torch.stack(nonzero))

    def _add_log_sums(self, sums: dict[str, list[Any]], params: list[Tensor], log_sums: Tensor,
                      nonzero: Tensor) -> None:
        """Record, for watched ``params``, the sums of ``log v_hat`` over their elements with ``v > 0`` and the
        counts of those elements (1-D tensors, one entry per parameter)."""
        sums["log_v_hat"].append(log_sums.sum())
        sums["nonzero"].append(nonzero.sum())
        sums["layers"].append(self._watched.part(params, log_sums, nonzero))

    def _fused_adamw_update(self, group: dict[str, Any], b: dict[str, list[Any]], sums: dict[str, list[Any]],
                            compiled: bool) -> None:
        # As torch.optim.adam._fused_adam (not capturable, no grad scaler): bitwise AdamW(fused=True).
        params, grads, exp_avgs, exp_avg_sqs = b["params"], b["grads"], b["exp_avgs"], b["second"]
        beta1, beta2 = group["betas"]
        steps = self._steps_on(params, b["steps"], device_side=params[0].device.type != "cpu")
        self._count_steps(steps)
        watched = [i for i, w in enumerate(b["watched"]) if w]
        totals = None
        if watched and compiled:  # the statistic from the old v and g, in one read of each
            totals = fused.watched_sums([exp_avg_sqs[i] for i in watched], [grads[i] for i in watched],
                                        [steps[i] for i in watched], beta2)
        if watched and totals is None:
            self._watched_stats(group, b, sums, watched, after=False)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                            beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                            maximize=False)
        if watched and totals is None:
            self._watched_stats(group, b, sums, watched, after=True)
        elif totals is not None:
            sums["abs_dv"].append(totals[:, 0].sum() * (1 - beta2))
            sums["numel"].append(sum(grads[i].numel() for i in watched))
            sums["v"].append(totals[:, 1].sum())
            self._add_log_sums(sums, [params[i] for i in watched], totals[:, 2], totals[:, 3])

    def _steps_on(self, params: list[Tensor], steps: list[Tensor], device_side: bool) -> list[Tensor]:
        """The step counters, moved (once, in the state) to the parameters' device for the fused kernels on an
        accelerator, back to the CPU for the foreach path (which reads them on the host)."""
        out = []
        for p, s in zip(params, steps, strict=True):
            want = p.device if device_side else torch.device("cpu")
            if s.device != want:
                s = self.state[p]["step"] = s.to(want)
            out.append(s)
        return out

    def _frozen_update(self, group: dict[str, Any], b: dict[str, list[Any]], compiled: bool = False) -> None:
        params, grads, exp_avgs, frozen_vs = b["params"], b["grads"], b["exp_avgs"], b["second"]
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        steps = self._steps_on(params, b["steps"], device_side=compiled and params[0].device.type != "cpu")
        self._count_steps(steps)
        if compiled:
            tensors = (params, grads, exp_avgs, frozen_vs)
            fit = [i for i in range(len(params)) if all(t[i].is_contiguous() for t in tensors)]
            if group["frozen_bias_correction"]:
                scales = [(1 - beta2 ** self.state[params[i]]["frozen_step"]) ** -0.5 for i in fit]
                eps = group["eps"]
            else:
                scales, eps = [1.0] * len(fit), _frozen_eps(group)
            done = fused.frozen_step(group, *([t[i] for i in fit] for t in tensors), [steps[i] for i in fit],
                                     scales, eps)
            fitted = set(fit) if done else set()
            rest = [i for i in range(len(params)) if i not in fitted]
            if not rest:
                return
            params, grads, exp_avgs, frozen_vs, steps = ([t[i] for i in rest] for t in
                                                         (params, grads, exp_avgs, frozen_vs, steps))
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        # Derived from the raw v* in every step rather than stored, so the settings are read where they apply.
        denoms = torch._foreach_sqrt(frozen_vs)
        if group["frozen_bias_correction"]:
            # As _adamw_update at step T0, so that the denominator is bitwise AdamW's of the freeze step.
            torch._foreach_div_(denoms, [(1 - beta2 ** self.state[p]["frozen_step"]) ** 0.5 for p in params])
            torch._foreach_add_(denoms, group["eps"])
        else:
            torch._foreach_add_(denoms, _frozen_eps(group))
        step_size = [-lr / (1 - beta1 ** s.item()) for s in steps]
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_size)


def _frozen_eps(group: dict[str, Any]) -> float:
    """The epsilon of the reference frozen denominator ``sqrt(v*) + frozen_eps`` for a param group."""
    return group["frozen_eps"] if group["frozen_eps"] is not None else group["eps"] ** 0.75


def _v_from_frozen_denom(denom: Tensor, group: dict[str, Any], frozen_step: int) -> Tensor:
    """The raw ``v*`` of a frozen denominator stored by an earlier step_lightning (state key ``frozen_denom``),
    exact up to rounding."""
    _, beta2 = group["betas"]
    if group["frozen_bias_correction"]:
        return denom.sub(group["eps"]).clamp_(min=0).square_().mul_(1 - beta2**frozen_step)
    return denom.sub(_frozen_eps(group)).clamp_(min=0).square_()
