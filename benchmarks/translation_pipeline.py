"""Translation data pipeline vs the training step, side by side in one process: tokens/s of each.

Target (issue 6): the tokens/s of ``WMTDataModule``'s training pipeline alone is at least 20x what a training step
of ``TranslationModule(arch="base")`` consumes on the CPU, so the loader is never the bottleneck.

What is measured (CPU, ``torch.set_num_threads(2)`` unless ``--threads`` says otherwise):

0. **Setup** (timed, reported apart): a synthetic but realistic De-En-like parallel corpus of ``--lines`` pairs
   (default 150,000) is written to a temp dir (nothing is downloaded): pseudo-words of 1-4 syllables with
   German-like (umlauts, ß, capitalised nouns) and English-like spellings, frequent words shorter, drawn from
   a Zipf(1.1) law over 12,000 words per side; sentence lengths 3-60 words (gamma-shaped, mean about 25);
   the target is a word-for-word "translation" through a fixed lexicon with local reordering and dropped or
   added function words; commas, numbers and final punctuation. ``WMTDataModule(vocab_size=--vocab-size
   (32000), max_tokens=4096, max_seq_len=256).prepare_data()`` then trains the joint SentencePiece model on it.

1. **Pipeline throughput**: full passes over epoch 0 of ``dm.build_pipeline("train", True, 0)`` (after
   ``dm.setup("fit")``), exactly the batches ``train_dataloader`` yields: read, shuffle (100,000-line window),
   SentencePiece encoding in ``num_workers`` parallel calls, length filter, bucketing by length to 4,096
   tokens, batch shuffle, collation with padding. Counted per pass: batches, real tokens (the sum of
   ``source_lens`` and ``target_lens``, special tokens included) and padded tokens (the padded tensors'
   sizes). The wall time of a pass includes the pipeline's start (filling the shuffle window).
   ``num_workers`` in ``--workers`` (default 1,2,4; the machine may have fewer cores than that).

2. **Training consumption**: ``TranslationModule(arch="base", num_tokens=dm.num_tokens)`` (its own
   label-smoothed loss and parameter groups) with ``torch.optim.AdamW(lr=7e-4, betas=(0.9, 0.98),
   foreach=True)``, through a real Lightning ``Trainer`` (accelerator cpu), on the first ``--warmup + --steps``
   batches of that same pipeline (real ~4,096-token batches, collected beforehand so no loading is timed).
   A step is the time between consecutive ``on_train_batch_end`` calls (``overhead.py``'s ``StepTimer``); the
   first ``--warmup`` are discarded. Tokens consumed per second = real tokens of the timed batches / their
   summed step time.

The machine is shared and noisy, so the two run interleaved: every round does one pipeline pass per worker
count (order alternating) and one training fit, and the ratio (pipeline tokens/s over training tokens/s) is
taken within the round; the table reports medians over ``--rounds``.

Run (default: 2 rounds; on the shared 2-core CPU the corpus and SentencePiece take about 1 minute, a pipeline pass
about 33 s, a base training step on a ~8,000-token (two sides) batch about 27 s; about 9 minutes in all)::

    python benchmarks/translation_pipeline.py
    python benchmarks/translation_pipeline.py --quick          # smoke run: tiny corpus, arch tiny, ~30 s
    python benchmarks/translation_pipeline.py --lines 200000 --steps 4 --rounds 3 --workers 1,2

Output: Markdown on stdout (a header line, then tables); progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from overhead import StepTimer, quiet, round_orders, run_header, spread, table

from step_lightning.data import WMTDataModule
from step_lightning.models import TranslationModule

# --------------------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------------------
DE = {"onsets": ["", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "z", "sch", "st", "sp",
                 "ch", "pf", "kr", "tr", "gr", "br", "fl", "schw", "str"],
      "vowels": ["a", "e", "i", "o", "u", "ei", "au", "ie", "eu", "ä", "ö", "ü", "ee", "aa"],
      "codas": ["", "", "n", "r", "s", "t", "ch", "ng", "nd", "st", "ß", "tz", "ck", "rn", "lt", "cht", "ft"]}
EN = {"onsets": ["", "b", "c", "d", "f", "g", "h", "j", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "th",
                 "sh", "ch", "wh", "st", "tr", "pl", "gr", "cr", "qu"],
      "vowels": ["a", "e", "i", "o", "u", "y", "ea", "ou", "oo", "ai", "ee", "ow", "oa"],
      "codas": ["", "", "n", "r", "s", "t", "d", "ng", "nd", "st", "ck", "ll", "ss", "ght", "nt", "ve", "ty"]}
WORDS_PER_SIDE = 12000
FUNCTION_WORDS = 40  # the most frequent ranks: dropped or inserted freely in the "translation"


def pseudo_words(rng: np.random.Generator, spelling: dict[str, list[str]], count: int,
                 capitalise: float) -> np.ndarray:
    """``count`` distinct pseudo-words, shortest first (frequent words are short); a share capitalised (nouns)."""
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.choice([1, 2, 3, 4], p=[0.3, 0.38, 0.22, 0.1])
        word = "".join(rng.choice(spelling["onsets"]) + rng.choice(spelling["vowels"]) + rng.choice(spelling["codas"])
                       for _ in range(syllables))
        if len(word) >= 2 or len(words) < 20:
            words.add(word)
    ordered = sorted(words, key=lambda w: (len(w) + rng.normal(0, 1.5), w))
    out = np.array(ordered, dtype=object)
    nouns = rng.random(count) < capitalise
    nouns[:FUNCTION_WORDS] = False
    out[nouns] = [w[0].upper() + w[1:] for w in out[nouns]]
    return out


def write_corpus(root: Path, lines: int, seed: int = 0, src: str = "de", tgt: str = "en") -> dict[str, float]:
    """Write ``{train,valid,test}.{src,tgt}`` (``lines`` training pairs, 500 each for valid/test); return stats."""
    rng = np.random.default_rng(seed)
    src_words = pseudo_words(rng, DE, WORDS_PER_SIDE, capitalise=0.3)
    tgt_words = pseudo_words(rng, EN, WORDS_PER_SIDE, capitalise=0.03)
    # lexicon: source rank -> target rank, roughly frequency-preserving (a shuffle within windows of 50 ranks)
    lexicon = np.concatenate([rng.permutation(np.arange(i, min(i + 50, WORDS_PER_SIDE)))
                              for i in range(0, WORDS_PER_SIDE, 50)])
    function_words = set(tgt_words[:FUNCTION_WORDS].tolist())
    ranks = np.arange(1, WORDS_PER_SIDE + 1, dtype=np.float64)
    zipf = ranks ** -1.1
    zipf /= zipf.sum()
    root.mkdir(parents=True, exist_ok=True)
    stats = {"words": 0.0, "chars": 0.0}
    for split, count in (("train", lines), ("valid", 500), ("test", 500)):
        lengths = np.clip(np.rint(rng.gamma(3.0, 7.5, count)), 3, 60).astype(np.int64)
        ids = rng.choice(WORDS_PER_SIDE, size=int(lengths.sum()), p=zipf)
        numbers = rng.random(ids.size) < 0.015
        commas = rng.random(ids.size) < 0.06
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        with open(root / f"{split}.{src}", "w", encoding="utf-8") as fs, \
                open(root / f"{split}.{tgt}", "w", encoding="utf-8") as ft:
            for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                sl = slice(start, start + n)
                s_tok = src_words[ids[sl]].copy()
                t_idx = lexicon[ids[sl]]
                t_tok = tgt_words[t_idx].copy()
                for j in np.flatnonzero(numbers[sl]):
                    s_tok[j] = t_tok[j] = str(int(rng.integers(1, 2030)))
                for j in np.flatnonzero(commas[sl][:-1]):
                    s_tok[j] += ","
                    t_tok[j] += ","
                t_list = list(t_tok)
                for j in range(0, len(t_list) - 1, 3):  # local reordering
                    if rng.random() < 0.15:
                        t_list[j], t_list[j + 1] = t_list[j + 1], t_list[j]
                if len(t_list) > 3 and rng.random() < 0.3:  # a dropped function word ...
                    drop = [j for j, word in enumerate(t_list) if word in function_words]
                    if drop:
                        del t_list[drop[0]]
                if rng.random() < 0.3:  # ... or an added one
                    t_list.insert(int(rng.integers(0, len(t_list) + 1)), str(tgt_words[rng.integers(0, 10)]))
                end = "?" if rng.random() < 0.07 else "."
                s_line = " ".join(s_tok) + end
                t_line = " ".join(t_list) + end
                fs.write(s_line[0].upper() + s_line[1:] + "\n")
                ft.write(t_line[0].upper() + t_line[1:] + "\n")
                if split == "train":
                    stats["words"] += n
                    stats["chars"] += len(s_line) + len(t_line)
    return stats


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def batch_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a batch, both sides."""
    real = sum(batch["source_lens"]) + sum(batch["target_lens"])
    return real, batch["source"].numel() + batch["target"].numel()


def pipeline_pass(dm: WMTDataModule, workers: int) -> dict[str, float]:
    """One full pass over epoch 0 of the training pipeline with ``num_workers=workers``."""
    dm.num_workers = workers
    t0 = time.perf_counter()
    batches = real = padded = 0
    first = 0.0
    for batch in dm.build_pipeline("train", True, 0):
        if not batches:
            first = time.perf_counter() - t0
        r, p = batch_tokens(batch)
        batches, real, padded = batches + 1, real + r, padded + p
    wall = time.perf_counter() - t0
    return {"batches": batches, "real": real, "padded": padded, "wall": wall, "first": first}


def collect_batches(dm: WMTDataModule, count: int) -> list[dict[str, Any]]:
    """The first ``count`` batches of epoch 0 (the batches a run's first steps train on)."""
    out = []
    for batch in dm.build_pipeline("train", True, 0):
        out.append(batch)
        if len(out) == count:
            break
    if len(out) < count:
        raise RuntimeError(f"the pipeline yields only {len(out)} batches; use more --lines or fewer --steps")
    return out


def time_training(arch: str, vocab: int, batches: list[dict[str, Any]], warmup: int,
                  init_state: dict[str, torch.Tensor]) -> list[float]:
    """Fit a fresh ``TranslationModule`` on ``batches`` (one step each); return the timed step times."""
    def adamw(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=7e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, foreach=True)

    module = TranslationModule(arch=arch, num_tokens=vocab, dropout_p=0.1, optimizer=adamw)
    module.load_state_dict(init_state)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False, num_workers=0))
    times = timer.step_times(warmup)
    if len(times) != len(batches) - warmup:
        raise RuntimeError(f"expected {len(batches) - warmup} timed steps, got {len(times)}")
    return times


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=None, help="training pairs of the corpus (150000; --quick 3000)")
    parser.add_argument("--vocab-size", type=int, default=None, help="SentencePiece pieces (32000; --quick 1000)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per round (3; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded training steps per fit (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    parser.add_argument("--workers", default=None, help="comma-separated num_workers values (1,2,4; --quick 1,2)")
    parser.add_argument("--arch", default=None, choices=("tiny", "base", "big"), help="model (base; --quick tiny)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny corpus, arch tiny, 1024-token batches, 1 round; the numbers mean little")
    args = parser.parse_args(argv)
    defaults = {"lines": (150_000, 3000), "vocab_size": (32000, 1000), "steps": (3, 2), "rounds": (2, 1),
                "workers": ("1,2,4", "1,2"), "arch": ("base", "tiny")}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.max_tokens, args.max_seq_len = (1024, 128) if args.quick else (4096, 256)
    args.workers = [int(s) for s in args.workers.split(",") if s.strip()]
    if min(args.lines, args.steps, args.rounds, args.warmup + 1, *args.workers) < 1:
        parser.error("--lines, --steps, --rounds and --workers must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    print(run_header("translation_pipeline.py", argv,
                     f"{cpu_name()}, {os.cpu_count()} cores | fairseq2 {version('fairseq2')} | "))
    sys.stdout.flush()
    t_start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="translation-pipeline-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        stats = write_corpus(root, args.lines)
        t_corpus = time.perf_counter() - t0
        progress(f"corpus written ({t_corpus:.1f} s)")
        dm = WMTDataModule(data_dir=os.fspath(root), vocab_size=args.vocab_size, max_tokens=args.max_tokens,
                           max_seq_len=args.max_seq_len, num_workers=args.workers[0], seed=0)
        t0 = time.perf_counter()
        dm.prepare_data()
        t_spm = time.perf_counter() - t0
        progress(f"SentencePiece trained ({t_spm:.1f} s)")
        t0 = time.perf_counter()
        dm.setup("fit")
        t_setup = time.perf_counter() - t0

        batches = collect_batches(dm, args.warmup + args.steps)
        torch.manual_seed(0)
        init_module = TranslationModule(arch=args.arch, num_tokens=dm.num_tokens, dropout_p=0.1)
        init_state = {k: v.clone() for k, v in init_module.state_dict().items()}
        params = sum(p.numel() for p in init_module.parameters())
        del init_module

        passes: dict[int, list[dict[str, float]]] = {w: [] for w in args.workers}
        train_rates: list[float] = []
        step_times: list[float] = []
        ratios: dict[int, list[float]] = {w: [] for w in args.workers}
        timed = batches[args.warmup:]
        timed_tokens = sum(batch_tokens(b)[0] for b in timed)
        for order in round_orders(args.workers, args.rounds):
            round_rates = {}
            for workers in order:
                result = pipeline_pass(dm, workers)
                passes[workers].append(result)
                round_rates[workers] = result["real"] / result["wall"]
                progress(f"pipeline, num_workers={workers}: {result['batches']} batches, {result['wall']:.1f} s, "
                         f"{round_rates[workers]:,.0f} tokens/s")
            times = time_training(args.arch, dm.num_tokens, batches, args.warmup, init_state)
            step_times += times
            train_rate = timed_tokens / sum(times)
            train_rates.append(train_rate)
            progress("training steps: " + " ".join(f"{t:.2f}" for t in times) + f" s, {train_rate:,.0f} tokens/s")
            for workers, rate in round_rates.items():
                ratios[workers].append(rate / train_rate)
        wall = time.perf_counter() - t_start

    med = statistics.median
    print("### Setup\n")
    print(table(["step", "value"], [
        ["corpus", f"{args.lines:,} pairs ({stats['words'] / args.lines:.1f} source words/sentence, "
                   f"{stats['chars'] / 2 / args.lines:.0f} chars/side), written in {t_corpus:.1f} s"],
        ["`WMTDataModule.prepare_data()` (SentencePiece, unigram)", f"{args.vocab_size} pieces in {t_spm:.1f} s"],
        ["`setup` (tokenizer load)", f"{t_setup:.2f} s"],
        ["model", f"TranslationModule(arch={args.arch}), vocab {dm.num_tokens}, {params / 1e6:.1f} M parameters"],
        ["batches", f"max_tokens {args.max_tokens}, max_seq_len {args.max_seq_len}, "
                    f"{passes[args.workers[0]][0]['batches']:,} per epoch"],
    ]))
    print()
    rows = []
    for workers in args.workers:
        ps = passes[workers]
        real = ps[0]["real"]
        rows.append([f"num_workers={workers}", f"{med([p['real'] / p['wall'] for p in ps]):,.0f}",
                     f"{med([p['batches'] / p['wall'] for p in ps]):.1f}",
                     f"{med([p['padded'] / p['wall'] for p in ps]):,.0f}", f"{ps[0]['padded'] / real - 1:.1%}",
                     f"{med([p['first'] for p in ps]):.2f}", f"{med([p['wall'] for p in ps]):.1f}"])
    print(f"### Pipeline alone: full passes over epoch 0, {passes[args.workers[0]][0]['real']:,.0f} real tokens "
          "(source + target)\n")
    print(table(["pipeline", "real tokens/s", "batches/s", "padded tokens/s", "padding", "first batch [s]",
                 "pass [s]"], rows))
    print()
    mean_tokens = timed_tokens / len(timed)
    print(f"### Training consumption: TranslationModule(arch={args.arch}) + AdamW, Lightning Trainer (cpu)\n")
    print(f"{args.rounds} rounds x {args.steps} timed steps (after {args.warmup} warm-up), on the first batches "
          f"of the pipeline ({mean_tokens:,.0f} real tokens per timed batch on average).\n")
    print(table(["median step [s]", "step range [s]", "training tokens/s (median of rounds)"],
                [[f"{med(step_times):.2f}", spread(step_times), f"{med(train_rates):,.0f}"]]))
    print()
    print("### Pipeline / training\n")
    print("Ratio of real tokens/s, taken within each round (target: >= 20x).\n")
    rows = [[f"num_workers={w}", f"{med([p['real'] / p['wall'] for p in passes[w]]):,.0f}",
             f"{med(train_rates):,.0f}", f"{med(ratios[w]):,.0f}x",
             f"{min(ratios[w]):,.0f}-{max(ratios[w]):,.0f}x",
             "yes" if med(ratios[w]) >= 20 else "**no**"] for w in args.workers]
    print(table(["pipeline", "pipeline tokens/s", "training tokens/s", "ratio (median of rounds)", "per-round range",
                 ">= 20x?"], rows))
    print()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Total wall time {wall:.0f} s; load average at the end {load}.")


if __name__ == "__main__":
    main()
