"""Tiny Hugging Face pieces built offline: a WordPiece tokenizer, a 2-layer BERT, and GLUE-format TSV folders.

Importing this module switches ``transformers`` and ``datasets`` to offline mode, provided neither has been
imported yet (both read the variables once, at import; step_lightning imports them lazily).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

# transformers, datasets and huggingface_hub read these once, when first imported (lazily, below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "movie", "film", "was", "is", "good", "bad", "great", "awful", "not", "very", "and", "but",
         "cat", "dog", "sat", "on", "mat", "who", "what", "why", "did", "he", "she", "it", "they", "runs", "likes",
         "question", "answer", "man", "woman", "park", "city", "?", ".", ",", '"']
HIDDEN = 32  # divisible by 4 (and 8): every projection can be 2:4 (and 1:8) masked
INTERMEDIATE = 64
MAX_POSITIONS = 64


def make_tokenizer(folder: str | Path, words: Sequence[str] = WORDS, model_max_length: int = MAX_POSITIONS) -> Path:
    """A lower-casing WordPiece ``BertTokenizerFast`` over ``words`` (plus BERT's special tokens) in ``folder``."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *words]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_bert(folder: str | Path, words: Sequence[str] = WORDS, seed: int = 0) -> Path:
    """A tokenizer and a randomly initialised 2-layer, 2-head, width-32 ``BertModel`` saved together in ``folder``.

    ``AutoModelForSequenceClassification.from_pretrained(folder, num_labels=...)`` adds a fresh head, as it
    does for ``bert-base-uncased``; ``AutoTokenizer.from_pretrained(folder)`` loads the tokenizer.
    """
    import torch
    from transformers import BertConfig, BertModel

    folder = make_tokenizer(folder, words)
    config = BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS,
                        type_vocab_size=2, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


# ---- GLUE in the official formats ------------------------------------------------------------------------
def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS[:-1]) for _ in range(n or rng.randint(2, 9)))


def _rows(task: str, n: int, rng: random.Random) -> tuple[list[str] | None, list[list[str]], list[object]]:
    """``(header, rows, labels)`` of one split: labels as the task's official file writes them."""
    s = _sentence
    rows: list[list[str]] = []
    labels: list[object] = []
    header: list[str] | None
    for i in range(n):
        if task == "cola":
            header = None
            label = rng.randint(0, 1)
            rows.append(["gj04", str(label), "" if label else "*", s(rng)])
        elif task == "sst2":
            header = ["sentence", "label"]
            label = rng.randint(0, 1)
            rows.append([s(rng), str(label)])
        elif task == "mrpc":
            header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
            label = rng.randint(0, 1)
            rows.append([str(label), str(1000 + i), str(2000 + i), s(rng), s(rng)])
        elif task == "stsb":
            header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                      "sentence2", "score"]
            label = round(rng.uniform(0, 5), 3)
            rows.append([str(i), "main-news", "headlines", "2015", str(i), "none", "none", s(rng), s(rng),
                         f"{label:.3f}"])
        elif task == "qqp":
            header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
            label = rng.randint(0, 1)
            rows.append([str(i), str(2 * i), str(2 * i + 1), s(rng) + " ?", s(rng) + " ?", str(label)])
        elif task == "mnli":
            header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                      "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
            label = rng.choice(["entailment", "neutral", "contradiction"])
            a, b = s(rng), s(rng)
            rows.append([str(i), str(i), f"{i}e", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})",
                         a, b, label, label])
        elif task in ("qnli", "rte"):
            header = ["index", "question", "sentence", "label"] if task == "qnli" else \
                ["index", "sentence1", "sentence2", "label"]
            label = rng.choice(["entailment", "not_entailment"])
            rows.append([str(i), s(rng), s(rng), label])
        elif task == "wnli":
            header = ["index", "sentence1", "sentence2", "label"]
            label = rng.randint(0, 1)
            rows.append([str(i), s(rng), s(rng), str(label)])
        else:
            raise ValueError(task)
        labels.append(label)
    return header, rows, labels


FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def make_glue(root: str | Path, tasks: Sequence[str] = tuple(FOLDERS), n_train: int = 24, n_dev: int = 10,
              seed: int = 0) -> dict[str, dict[str, list[object]]]:
    """Write tiny GLUE tasks under ``root`` in the official layout and formats; return the labels written.

    CoLA without a header; MNLI with ``dev_matched.tsv`` and ``dev_mismatched.tsv``; a sentence with an
    unmatched double quote in every training file (the reason GLUE must be read with ``QUOTE_NONE``).
    Returns ``{task: {file stem: labels as written in the file}}``.
    """
    rng = random.Random(seed)
    written: dict[str, dict[str, list[object]]] = {}
    for task in tasks:
        folder = Path(root) / FOLDERS[task]
        folder.mkdir(parents=True, exist_ok=True)
        stems = ["train", "dev_matched", "dev_mismatched"] if task == "mnli" else ["train", "dev"]
        written[task] = {}
        for stem in stems:
            header, rows, labels = _rows(task, n_train if stem == "train" else n_dev, rng)
            if stem == "train":
                text_col = 3 if task == "cola" else (header or []).index(
                    {"sst2": "sentence", "mrpc": "#1 String", "qqp": "question1", "qnli": "question"}.get(
                        task, "sentence1"))
                rows[0][text_col] = 'the " movie was good'
            lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(row) for row in rows]
            (folder / f"{stem}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
            written[task][stem] = labels
        (folder / "test.tsv").write_text("index\tsentence\n0\tunlabelled\n", encoding="utf-8")
    return written
