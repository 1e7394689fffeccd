"""Which parameters of a model get N:M masks.

Default rule: every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and Hugging Face ``Conv1D``
weight, and the packed Q/K/V input projection of ``nn.MultiheadAttention`` (``in_proj_weight``, or
``q/k/v_proj_weight``; an ``(out, in)`` Linear weight), whose reduction size divides by ``m``, except

* the first layer that sees the raw input: the first such layer in registration order, unless an
  ``nn.Embedding`` is registered before it (then the input is token ids and no layer sees it raw);
* the final classifier / LM head: the last such layer in registration order, any layer inside a
  module named ``pooler`` (a Hugging Face encoder's pooler, e.g. ``BertPooler``, feeds only the
  sequence classifier: it is part of the head), and any layer whose weight is shared with an
  ``nn.Embedding`` (tied LM heads).

``include`` / ``exclude`` are regular expressions matched with :func:`re.search` against the
fully-qualified parameter name (``"model.layer1.0.conv1.weight"``). When ``include`` is given it
replaces the default rule: exactly the candidates matching one of its patterns are targets (the first
layer and the head too, if they match). A parameter matching ``exclude`` is never a target. Candidates
that cannot be grouped (reduction size not divisible by ``m``) are skipped and reported, never fatal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from step_lightning.sparsity.nm import Layout, check_nm, reduction_size


@dataclass(frozen=True)
class SparseTarget:
    """One masked weight: its fully-qualified parameter name, the parameter, and how it is grouped."""

    name: str
    param: nn.Parameter = field(repr=False, compare=False)
    layout: Layout
    n: int
    m: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@dataclass(frozen=True)
class Skipped:
    """A weight the selection considered and left dense, with the reason."""

    name: str
    shape: tuple[int, ...]
    reason: str


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Detected by name so that the core never imports transformers.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def module_layout(module: nn.Module) -> Layout | None:
    """The N:M layout of ``module.weight``, or ``None`` if the module type is never masked."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if _is_hf_conv1d(module):
        return "conv1d_hf"
    return None


def _maskable_weights(module: nn.Module) -> list[tuple[str, Layout]]:
    """``(attribute, layout)`` of each maskable weight a module owns directly (not its children's)."""
    if isinstance(module, nn.MultiheadAttention):
        # Its out_proj is an nn.Linear child, found on its own; the input projections are raw parameters.
        packed = module.in_proj_weight is not None
        names = ["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [(name, "linear") for name in names]
    layout = module_layout(module)
    return [] if layout is None else [("weight", layout)]


def _compile(patterns: Sequence[str] | None, arg: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise ValueError(f"`{arg}` must be a list of regular expressions, got the string {patterns!r}; "
                         f"write [{patterns!r}].")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"`{arg}` holds an invalid regular expression {p!r}: {err}.") from None
    return compiled


def select_targets(
    model: nn.Module,
    n: int,
    m: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[list[SparseTarget], list[Skipped]]:
    """Choose the weights of ``model`` that get N:M masks (see the module docstring for the rule).

    Returns:
        ``(targets, skipped)``: targets in registration order; the candidates left dense, with why.

    Raises:
        ValueError: invalid ``n``/``m`` or an invalid regular expression.
    """
    check_nm(n, m)
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")

    candidates: list[tuple[str, nn.Parameter, Layout]] = []
    embedding_weights: set[int] = set()
    embedding_first = False
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            embedding_weights.add(id(module.weight))
            if not candidates:
                embedding_first = True
        for attr, layout in _maskable_weights(module):
            weight = getattr(module, attr, None)
            if not isinstance(weight, nn.Parameter) or id(weight) in seen:
                continue
            seen.add(id(weight))
            candidates.append((f"{mod_name}.{attr}" if mod_name else attr, weight, layout))

    default_out: dict[str, str] = {}
    if candidates and not embedding_first:
        default_out[candidates[0][0]] = "first layer (sees the raw input)"
    if candidates:
        default_out.setdefault(candidates[-1][0], "final classifier / head")
    for name, weight, _ in candidates:
        if "pooler" in name.split(".")[:-1]:
            default_out[name] = "pooler of the classification head"
        if id(weight) in embedding_weights:
            default_out[name] = "tied to an embedding"

    targets: list[SparseTarget] = []
    skipped: list[Skipped] = []
    for name, weight, layout in candidates:
        shape = tuple(weight.shape)
        if any(p.search(name) for p in exc):
            skipped.append(Skipped(name, shape, "matches `exclude`"))
            continue
        if inc:
            if not any(p.search(name) for p in inc):
                continue
        elif name in default_out:
            skipped.append(Skipped(name, shape, default_out[name] + "; name it in `include` to mask it"))
            continue
        if not weight.requires_grad:
            skipped.append(Skipped(name, shape, "frozen (requires_grad=False)"))
            continue
        red = reduction_size(weight.shape, layout)
        if red % m != 0:
            skipped.append(Skipped(name, shape, f"reduction size {red} is not divisible by m={m}"))
            continue
        targets.append(SparseTarget(name=name, param=weight, layout=layout, n=n, m=m))
    return targets, skipped


def format_table(targets: Sequence[SparseTarget], skipped: Sequence[Skipped] = ()) -> str:
    """A fixed-width table of the masked weights (name, shape, layout, N:M, kept %) and the skipped ones."""
    rows = [(t.name, "x".join(map(str, t.shape)), t.layout, f"{t.n}:{t.m}", f"{100 * t.n / t.m:.1f}")
            for t in targets]
    rows += [(s.name, "x".join(map(str, s.shape)), "-", "dense", f"100.0  ({s.reason})") for s in skipped]
    header = ("parameter", "shape", "layout", "N:M", "kept %")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    masked = sum(t.param.numel() for t in targets)
    kept = sum(t.param.numel() * t.n // t.m for t in targets)
    lines.append(f"{len(targets)} masked weights, {masked:,} entries, {kept:,} kept "
                 f"({100 * kept / max(masked, 1):.1f} %); {len(skipped)} left dense.")
    return "\n".join(lines)
