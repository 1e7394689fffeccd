"""Overhead of the N:M recipes, measured as ratios to dense AdamW, side by side in one process.

What is measured (CPU, ``torch.set_num_threads(2)`` unless ``--threads`` says otherwise):

1. **Per-optimizer-step wall time through a real Lightning ``Trainer``** for

   * ``resnet18``: torchvision ResNet-18 (10 classes) with the CIFAR stem (3x3 stride-1 ``conv1``, no
     max-pool), batch 64 of random 3x32x32 images, cross-entropy;
   * ``bert4`` / ``bert_base``: a 4- / 12-layer BERT encoder (hidden 768, 12 heads, FFN 3072, vocab 30522) in
     ``BertForSequenceClassification`` built from the config (random weights, nothing downloaded),
     batch 16 of 128 random token ids;
   * ``transformer_base`` (opt-in: ``--models transformer_base``): the package's own
     ``TranslationModule(arch="base", num_tokens=32006, dropout_p=0.1)``, fairseq2's encoder-decoder
     Transformer in Vaswani et al.'s base shape (512 dims, 6+6 layers, 8 heads, FFN 2048; 60 M parameters with
     the tied 32006-token embedding), trained with its own label-smoothed loss on one fixed batch of 128
     sentence pairs padded to 32 tokens per side (4,096 padded tokens: the WMT configs' ``max_tokens``; random
     ids, lengths 16-32, padding 0, as a ``WMTDataModule`` batch); only ``configure_optimizers`` is replaced,
     by the recipe's optimizer below;

   under six recipes (every optimizer with lr 1e-3 and weight decay 1e-2 on all parameters): dense
   ``torch.optim.AdamW(foreach=True)`` (the baseline); dense ``StepAdamW``
   (no watch, before any freeze); the STEP precondition phase (``StepAdamW`` + ``STEPCallback(switch=
   "auto")``, so the optimizer computes the AutoSwitch statistic every step; ``autoswitch_t_max`` is set
   far beyond the run so it never switches); the STEP mask-learning phase (``STEPCallback(switch=1)``:
   every timed step runs after the switch, with a frozen second moment and the masked forward/backward);
   SR-STE (``SRSTECallback`` + AdamW); ASP (``ASPCallback(prune_at=0)`` + AdamW). All at 2:4.

   A step is the time between consecutive ``on_train_batch_end`` calls of a timing callback placed first
   in the callback list, so it contains everything: the recipe's mask update and weight swap in
   ``on_train_batch_start``, forward, backward, the restore in ``on_before_optimizer_step``, the optimizer
   step and the recipe's after-step work. The first ``--warmup`` steps of every fit are discarded.
   The machine is shared and noisy, so the recipes run interleaved: every round fits every recipe for a
   few steps (the order alternates between rounds), and the reported overhead is the median over rounds
   of (recipe's median step in the round) / (dense AdamW's median step in the same round).

2. **Micro-benchmarks** (``benchmarks/micro.py``), on the CPU and, when there is one, the GPU; interleaved
   repeats, medians of per-repeat ratios:

   * ``nm_mask`` of a 4096x4096 fp32 weight (layout ``linear``) at 2:4, 1:8 and 1:16, eager and compiled
     (the fused kernel), against a naive ``topk`` + ``scatter_`` mask and one ``copy_`` into a
     preallocated buffer (the memory-traffic floor);
   * the optimizer step on the ResNet-18's parameters with random gradients: ``AdamW`` foreach and fused,
     ``StepAdamW`` foreach, fused and auto, before any freeze, with ``watch()`` on every >=2-D weight (the
     AutoSwitch statistic), and after freezing the second moment of every >=2-D weight.

Run (on an idle 2-core CPU a step takes about 3.7 s for ResNet-18, 6.4 s for BERT-4, 19 s for BERT-base and 7 s
for the Transformer base; the default, ``resnet18,bert4,bert_base`` at 2 rounds x 2 timed steps plus the
micro-benchmarks, takes about 25 minutes; ``transformer_base`` alone, 2 rounds x 2 steps after 1 warm-up, about
6 minutes. Other processes on the cores slow it down, by 4x when they take a whole core)::

    python benchmarks/overhead.py
    python benchmarks/overhead.py --quick                  # smoke run: small batches, one round
    python benchmarks/overhead.py --models resnet18 --rounds 4 --steps 3 --skip-micro
    python benchmarks/overhead.py --models transformer_base --rounds 2 --steps 2 --warmup 1 --skip-micro

The output is Markdown (a header line, then tables) on stdout; one progress line per fit goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import logging
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from step_lightning import ASPCallback, SRSTECallback, StepAdamW, STEPCallback
from step_lightning.models import TranslationModule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import micro

RECIPES: tuple[str, ...] = ("adamw", "step_adamw", "step_precondition", "step_mask_learning", "srste", "asp")
RECIPE_LABELS: dict[str, str] = {
    "adamw": "dense AdamW(foreach=True)",
    "step_adamw": "dense StepAdamW (no watch)",
    "step_precondition": 'STEP precondition (switch="auto")',
    "step_mask_learning": "STEP mask learning (after switch)",
    "srste": "SR-STE (AdamW)",
    "asp": "ASP (prune_at=0, AdamW)",
}
MODELS: tuple[str, ...] = ("resnet18", "bert4", "bert_base", "transformer_base")
DEFAULT_MODELS: tuple[str, ...] = ("resnet18", "bert4", "bert_base")  # transformer_base is opt-in (long steps)
N, M = 2, 4
LR = 1e-3
TRANSLATION_VOCAB = 32006  # a 32000-piece SentencePiece model + the NLLB tokenizer's 6 symbols


# --------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------
def cifar_resnet18() -> nn.Module:
    """torchvision ResNet-18 (10 classes) with the CIFAR stem: 3x3 stride-1 conv1, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def bert(layers: int) -> nn.Module:
    """A BERT-base-width encoder (768/12 heads/3072) of ``layers`` layers, 2-class head, random weights."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=30522, num_labels=2)
    return BertForSequenceClassification(config)


def transformer_base() -> nn.Module:
    """The package's ``TranslationModule`` (fairseq2 Transformer base, vocab 32006), optimizer set per recipe."""
    return BenchTranslationModule(arch="base", num_tokens=TRANSLATION_VOCAB, dropout_p=0.1)


def translation_batch(sentences: int, width: int, seed: int = 0) -> dict[str, Any]:
    """A ``WMTDataModule``-style batch of random sentence pairs, each side padded (with 0) to ``width`` tokens.

    Lengths are drawn from ``[width // 2, width]`` per side, with the first pair at full width (the collater
    pads to the longest sentence); ids are in ``[4, TRANSLATION_VOCAB)`` (above the special tokens).
    """
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {}
    for side in ("source", "target"):
        lens = torch.randint(width // 2, width + 1, (sentences,), generator=g)
        lens[0] = width
        ids = torch.randint(4, TRANSLATION_VOCAB, (sentences, width), generator=g)
        ids[torch.arange(width) >= lens[:, None]] = 0
        batch[side], batch[f"{side}_lens"], batch[f"{side}_text"] = ids, lens.tolist(), [""] * sentences
    return batch


Batch = Any  # a (inputs, labels) pair of tensors, or a translation batch dict


class RepeatedBatch(Dataset[Batch]):
    """``length`` copies of one pre-built batch (use with ``batch_size=None``): no collation cost.

    ``DataLoader(batch_size=None)`` passes each item through ``default_convert``, which keeps tensors as they are
    and Python lists (a translation batch's lengths and texts) as lists.
    """

    def __init__(self, batch: Batch, length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        return self.batch


@dataclass
class Workload:
    """A model family at a given batch shape; ``make_batch`` is called once per fit (same seed).

    ``build`` returns a plain model (wrapped in :class:`BenchModule`) or a LightningModule that mixes in
    :class:`RecipeOptimizer` (used as it is; ``is_text`` is then unused).
    """

    name: str
    label: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[], Batch]
    is_text: bool


def workloads(quick: bool) -> dict[str, Workload]:
    img_batch = 16 if quick else 64
    txt_batch, seq = (4, 32) if quick else (16, 128)
    mt_batch, mt_width = (4, 8) if quick else (128, 32)  # 4,096 padded tokens per side: the configs' max_tokens
    mt_tokens = sum(translation_batch(mt_batch, mt_width)["target_lens"])

    def images() -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.randn(img_batch, 3, 32, 32, generator=g), torch.randint(0, 10, (img_batch,), generator=g)

    def tokens() -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 30522, (txt_batch, seq), generator=g), torch.randint(0, 2, (txt_batch,), generator=g)

    return {
        "resnet18": Workload("resnet18", f"ResNet-18 (CIFAR stem), batch {img_batch}, 3x32x32",
                             cifar_resnet18, images, is_text=False),
        "bert4": Workload("bert4", f"BERT 4 layers (768/12/3072), batch {txt_batch}, seq {seq}",
                          lambda: bert(4), tokens, is_text=True),
        "bert_base": Workload("bert_base", f"BERT-base, 12 layers (768/12/3072), batch {txt_batch}, seq {seq}",
                              lambda: bert(12), tokens, is_text=True),
        "transformer_base": Workload(
            "transformer_base", f"Transformer base (fairseq2, 512/6+6/8/2048, vocab {TRANSLATION_VOCAB}), batch "
            f"{mt_batch} pairs x {mt_width} tokens per side ({mt_tokens} real target tokens)",
            transformer_base, lambda: translation_batch(mt_batch, mt_width), is_text=True),
    }


# --------------------------------------------------------------------------------------------------
# Lightning pieces
# --------------------------------------------------------------------------------------------------
class RecipeOptimizer:
    """Mixin for a LightningModule: ``configure_optimizers`` builds the optimizer named by ``optimizer_name``."""

    optimizer_name = "adamw"
    # How torch.optim.AdamW runs (the dense baseline, SR-STE, ASP); gpu_check.py sets {"fused": True}.
    adamw_kwargs: ClassVar[dict[str, bool]] = {"foreach": True}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()  # type: ignore[attr-defined]
        if self.optimizer_name == "step_adamw":
            return StepAdamW(params, lr=LR, weight_decay=1e-2)
        return torch.optim.AdamW(params, lr=LR, weight_decay=1e-2, **self.adamw_kwargs)


class BenchModule(RecipeOptimizer, pl.LightningModule):
    """Wraps an image classifier or a Hugging Face sequence classifier; cross-entropy loss."""

    def __init__(self, model: nn.Module, is_text: bool, optimizer: str) -> None:
        super().__init__()
        self.model = model
        self.is_text = is_text
        self.optimizer_name = optimizer

    def forward(self, x: Tensor) -> Tensor:
        if self.is_text:
            return self.model(input_ids=x).logits
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


class BenchTranslationModule(RecipeOptimizer, TranslationModule):
    """``TranslationModule`` as shipped (model, loss, training step), with the recipe's optimizer."""


class StepTimer(Callback):
    """Records ``time.perf_counter()`` at the first ``on_train_batch_start`` and every ``on_train_batch_end``.

    Placed first in the callback list; the interval between consecutive marks is one whole optimizer step
    including every recipe hook (the recipes' end-of-step work of step k lands in interval k+1).
    """

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.marks:
            self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.device.type == "cuda":  # the step's kernels are queued, not done, when the hook runs
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        diffs = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return diffs[warmup:]


def recipe_setup(recipe: str) -> tuple[str, list[Callback]]:
    """The optimizer name and the recipe callbacks of ``recipe``."""
    if recipe == "adamw":
        return "adamw", []
    if recipe == "step_adamw":
        return "step_adamw", []
    if recipe == "step_precondition":
        # t_max far beyond the run: the whole fit stays in the precondition phase, watching every step.
        return "step_adamw", [STEPCallback(N, M, switch="auto", autoswitch_t_max=10**9, per_layer_log_interval=0)]
    if recipe == "step_mask_learning":
        return "step_adamw", [STEPCallback(N, M, switch=1, per_layer_log_interval=0)]
    if recipe == "srste":
        return "adamw", [SRSTECallback(N, M, sr_ste_decay=2e-4, per_layer_log_interval=0)]
    if recipe == "asp":
        return "adamw", [ASPCallback(N, M, prune_at=0, per_layer_log_interval=0)]
    raise ValueError(f"unknown recipe {recipe!r}")


def time_fit(work: Workload, init_state: dict[str, Tensor], recipe: str, steps: int, warmup: int,
             accelerator: str = "cpu", precision: str | None = None) -> list[float]:
    """Fit a fresh copy of the model for ``warmup + steps`` optimizer steps; return the timed step times.

    ``accelerator``/``precision`` go to the ``Trainer`` (``gpu_check.py`` runs ``"gpu"``, ``"bf16-mixed"``)."""
    gc.collect()  # free the previous fit's model and optimizer state (Trainer <-> module reference cycles)
    model = work.build()
    model.load_state_dict(init_state)
    optimizer, recipe_callbacks = recipe_setup(recipe)
    if isinstance(model, RecipeOptimizer):
        module = model
        module.optimizer_name = optimizer
    else:
        module = BenchModule(model, work.is_text, optimizer)
    timer = StepTimer()
    total = warmup + steps
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=total, max_epochs=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timer, *recipe_callbacks],
    )
    loader = DataLoader(RepeatedBatch(work.make_batch(), total), batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    for cb in recipe_callbacks:  # check that each STEP fit stayed in the phase it is meant to time
        if isinstance(cb, STEPCallback) and cb.masks_active != (recipe == "step_mask_learning"):
            raise RuntimeError(f"{recipe}: STEPCallback ended the fit in phase {cb.phase}")
    times = timer.step_times(warmup)
    if len(times) != steps:
        raise RuntimeError(f"{recipe}: expected {steps} timed steps, got {len(times)}")
    return times


# --------------------------------------------------------------------------------------------------
# Statistics and tables
# --------------------------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of a sample, for the tables."""
    return f"{min(xs):.3f}-{max(xs):.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    aligns = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def round_orders(recipes: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """Alternate forward and reverse order between rounds, so slow drift does not favour one recipe."""
    for r in range(rounds):
        yield list(recipes) if r % 2 == 0 else list(reversed(recipes))


def bench_training(args: argparse.Namespace) -> None:
    works = workloads(args.quick)
    for name in args.models:
        work = works[name]
        torch.manual_seed(0)
        init_state = copy.deepcopy(work.build().state_dict())
        per_round: dict[str, list[list[float]]] = {r: [] for r in args.recipes}
        t0 = time.perf_counter()
        for order in round_orders(args.recipes, args.rounds):
            for recipe in order:
                times = time_fit(work, init_state, recipe, args.steps, args.warmup)
                per_round[recipe].append(times)
                print(f"[{time.perf_counter() - t0:6.0f} s] {name} {recipe}: " + " ".join(f"{t:.2f}" for t in times),
                      file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
        base = [median(ts) for ts in per_round["adamw"]] if "adamw" in per_round else None
        rows = []
        for recipe in args.recipes:
            all_times = [t for ts in per_round[recipe] for t in ts]
            if base is not None:
                ratios = [median(ts) / b for ts, b in zip(per_round[recipe], base, strict=True)]
                ratio, ratio_range = f"{median(ratios):.3f}", spread(ratios)
            else:
                ratio = ratio_range = "n/a"
            rows.append([RECIPE_LABELS[recipe], f"{median(all_times):.3f}", ratio, ratio_range])
        print(f"### Step time: {work.label}\n")
        print(f"{args.rounds} rounds x {args.steps} timed steps per recipe (after {args.warmup} warm-up steps "
              f"per fit); {wall:.0f} s in all.\n")
        print(table(["recipe", "median step [s]", "x dense AdamW (median of rounds)", "per-round range"], rows))
        print()
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 2; --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded steps per fit (default 2; --quick 1)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)} (default {','.join(DEFAULT_MODELS)}; "
                             "transformer_base is opt-in)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {','.join(RECIPES)}")
    parser.add_argument("--mask-repeats", type=int, default=None, help="nm_mask repeats (default 15; --quick 3)")
    parser.add_argument("--opt-repeats", type=int, default=None, help="optimizer-step repeats (default 20; --quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--clock", choices=micro.CLOCKS, default="wall",
                        help="micro-benchmarks: wall time (default) or this thread's CPU time (needs --threads 1 "
                             "and times the CPU rows only: on a shared machine it leaves out the time other "
                             "processes hold the core)")
    parser.add_argument("--skip-training", action="store_true", help="only the micro-benchmarks")
    parser.add_argument("--skip-micro", action="store_true", help="only the training-step benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small batches and weight, 1 round x 1 step; the numbers mean little")
    args = parser.parse_args(argv)
    defaults = {"rounds": (2, 1), "steps": (2, 1), "warmup": (2, 1), "mask_repeats": (15, 3), "opt_repeats": (20, 3)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    args.recipes = [s.strip() for s in args.recipes.split(",") if s.strip()]
    for value, known, what in ((args.models, MODELS, "--models"), (args.recipes, RECIPES, "--recipes")):
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f"{what}: unknown {unknown}; choose from {list(known)}")
    if "step_mask_learning" in args.recipes and args.warmup < 1:
        parser.error("--warmup must be >= 1 when timing step_mask_learning (its first step precedes the switch)")
    if args.clock == "cpu" and args.threads != 1:
        parser.error(f"--clock cpu needs --threads 1 (it times this thread only); got --threads {args.threads}")
    if min(args.rounds, args.steps, args.mask_repeats, args.opt_repeats) < 1:
        parser.error("--rounds, --steps, --mask-repeats and --opt-repeats must be >= 1")
    return args


def quiet() -> None:
    """Only the tables on stdout: silence Lightning's info messages and the usual warnings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning",
                 "step_lightning", "transformers", "fairseq2"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def run_header(script: str, argv: Sequence[str] | None, details: str = "") -> str:
    """The Markdown line that opens a benchmark's output: time, ``details``, torch, threads, command, load."""
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else [script, *argv]))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"## {now} | {details}torch {torch.__version__} | threads {torch.get_num_threads()} | `{command}` | "
            f"load average at start {load}\n")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    print(run_header("overhead.py", argv))
    sys.stdout.flush()
    t0 = time.perf_counter()
    if not args.skip_training:
        bench_training(args)
    if not args.skip_micro:
        size = 1024 if args.quick else 4096
        cuda = torch.cuda.is_available() and args.clock == "wall"
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
        for device in devices:
            print(micro.bench_nm_mask(size, args.mask_repeats, device, clock=args.clock))
            print(micro.bench_optimizer(args.opt_repeats, device, clock=args.clock))
            sys.stdout.flush()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Total wall time {time.perf_counter() - t0:.0f} s; load average at the end {load}.")


if __name__ == "__main__":
    main()
