"""A tiny parallel corpus in the WMTDataModule layout, generated offline: ``{train,valid,test}.{src,tgt}``."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(40)]


def make_parallel(root: Path, n_train: int = 300, n_eval: int = 12, seed: int = 0, src: str = "de",
                  tgt: str = "en") -> Path:
    """A toy language pair: the target is the source in upper case (a copy task up to casing)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]
        (root / f"{split}.{src}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / f"{split}.{tgt}").write_text("\n".join(s.upper() for s in lines) + "\n", encoding="utf-8")
    return root


# Data-module arguments that fit the corpus above: a 48-piece SentencePiece model and short sentences.
TINY_DATA = {"vocab_size": 48, "max_tokens": 240, "max_seq_len": 24}
