"""The parallel text of a WMT pair: its file layout, checks that it is complete and aligned, and its download.

A pair is six plain text files, ``{train,valid,test}.{src_lang,tgt_lang}``, one sentence per line, aligned by
line. ``datasets`` is imported only inside :func:`download_wmt`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_info

SPLITS = ("train", "valid", "test")


def parallel_files(data_dir: str | Path, src_lang: str, tgt_lang: str) -> dict[str, tuple[Path, Path]]:
    """``split -> (source file, target file)`` under ``data_dir``: ``{train,valid,test}.{src_lang,tgt_lang}``."""
    root = Path(data_dir)
    return {split: (root / f"{split}.{src_lang}", root / f"{split}.{tgt_lang}") for split in SPLITS}


def check_parallel_dir(data_dir: str | Path, src_lang: str, tgt_lang: str,
                       splits: tuple[str, ...] = ("train", "valid")) -> dict[str, tuple[Path, Path]]:
    """The files of ``splits`` under ``data_dir``, checked to exist (every missing one is named).

    Raises:
        FileNotFoundError: ``data_dir`` or one of the files is missing.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"WMT: `--data.data_dir`={str(data_dir)!r} is not a directory; it must hold "
                                f"train/valid/test.{{{src_lang},{tgt_lang}}} (one sentence per line).")
    files = parallel_files(root, src_lang, tgt_lang)
    missing = [path.name for split in splits for path in files[split] if not path.is_file()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_file())
        raise FileNotFoundError(f"WMT: `--data.data_dir`={str(data_dir)!r} lacks {missing} (found: {found}); "
                                f"expected {{train,valid,test}}.{{{src_lang},{tgt_lang}}} for `--data.src_lang`="
                                f"{src_lang!r}, `--data.tgt_lang`={tgt_lang!r}.")
    return {split: files[split] for split in splits}


def count_lines(path: Path) -> int:
    """Lines of a text file (a last line without a newline counts), read in 1 MiB blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def check_aligned(files: dict[str, tuple[Path, Path]]) -> None:
    """Each split's source and target files have as many lines (one sentence per line, aligned by line).

    Raises:
        ValueError: a pair of different lengths, with both counts.
    """
    for src, tgt in files.values():
        counts = count_lines(src), count_lines(tgt)
        if counts[0] != counts[1]:
            raise ValueError(f"WMT: {src} has {counts[0]:,} lines but {tgt} has {counts[1]:,}: parallel files hold "
                             "one sentence per line and must align line by line (is a file truncated, or does a "
                             "sentence contain a line break?).")


def hub_pair(src_lang: str, tgt_lang: str) -> str:
    """The config name of a pair in the Hub's ``wmt/wmt14``, ``wmt/wmt17``, ... datasets (English last: ``de-en``)."""
    return f"{tgt_lang}-{src_lang}" if src_lang == "en" else f"{src_lang}-{tgt_lang}"


def download_wmt(dataset: str, src_lang: str, tgt_lang: str, out_dir: str | Path) -> Path:
    """Write the Hub's ``wmt/<dataset>`` pair as ``{train,valid,test}.{src,tgt}`` text files under ``out_dir``.

    Loads with Hugging Face ``datasets`` (downloads unless cached); the ``validation`` split becomes ``valid``.
    Line breaks inside a sentence become spaces (one sentence per line). Written aside, then renamed.

    Raises:
        RuntimeError: ``datasets`` could not load the pair (no network, unknown edition or pair).
    """
    from datasets import load_dataset

    out = Path(out_dir)
    if _complete(out, src_lang, tgt_lang):
        return out
    name, pair = f"wmt/{dataset}", hub_pair(src_lang, tgt_lang)
    try:
        loaded = load_dataset(name, pair)
    except Exception as err:  # no network, offline mode without a cache, unknown config, ...
        raise RuntimeError(f"WMT: loading {name} ({pair}) with datasets failed ({type(err).__name__}: {err}). Set "
                           "`--data.data_dir` to a folder of {train,valid,test}.{src,tgt} text files to work "
                           "offline.") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
            if hub_split not in loaded:
                raise RuntimeError(f"WMT: {name} ({pair}) has no {hub_split!r} split (has {list(loaded)}).")
            with open(tmp / f"{split}.{src_lang}", "w", encoding="utf-8") as fs, \
                    open(tmp / f"{split}.{tgt_lang}", "w", encoding="utf-8") as ft:
                for row in loaded[hub_split]:
                    pair_text = row["translation"]
                    fs.write(" ".join(pair_text[src_lang].split()) + "\n")
                    ft.write(" ".join(pair_text[tgt_lang].split()) + "\n")
        # The whole folder is renamed into place (over an empty one too), so readers (other nodes on a shared
        # filesystem) see all files or none; a node that loses the race keeps the winner's identical files.
        try:
            os.rename(tmp, out)
        except OSError:
            if not _complete(out, src_lang, tgt_lang):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank_zero_info(f"WMTDataModule: wrote {name} ({pair}) as text files under {out}")
    return out


def _complete(folder: Path, src_lang: str, tgt_lang: str) -> bool:
    return all(p.is_file() for pair in parallel_files(folder, src_lang, tgt_lang).values() for p in pair)
