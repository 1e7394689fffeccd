"""WikiTextDataModule: exact blocks of the token stream, on-disk cache, offline raw files, every user error."""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from step_lightning.data import wikitext
from step_lightning.data.wikitext import WikiTextDataModule, text_pieces
from tests.hf_tiny_lm import N_POSITIONS, build_gpt2, write_wikitext


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def _module(gpt2_dir: Path, data_dir: Path | None, cache: Path, **kwargs: Any) -> WikiTextDataModule:
    return WikiTextDataModule(model_name_or_path=str(gpt2_dir), data_dir=None if data_dir is None else str(data_dir),
                              cache_dir=str(cache), **kwargs)


@pytest.mark.parametrize("subfolder", [None, "wikitext-2-raw"])
def test_blocks_are_the_token_stream_cut_into_block_size(gpt2_dir: Path, tmp_path: Path, subfolder: str | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wikitext, "_PIECE_CHARS", 200)  # many pieces per split: cuts must not change the ids
    texts = write_wikitext(tmp_path / "raw", subfolder)
    dm = _module(gpt2_dir, tmp_path / "raw", tmp_path / "cache", block_size=16)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    for split, text in texts.items():
        # One call on the whole split, whitespace-only lines empty (as the Hugging Face copy stores them).
        text = "".join(line if line.strip() else "" for line in text.splitlines(keepends=True))
        whole = np.asarray(dm.tokenizer(text, verbose=False)["input_ids"])
        blocks = dm.datasets[split].blocks
        assert blocks.shape == (len(whole) // 16, 16)
        np.testing.assert_array_equal(blocks.reshape(-1), whole[: blocks.size])
    assert "\n" in dm.tokenizer.decode(dm.datasets["train"].blocks[:4].reshape(-1).tolist())  # newlines kept


def test_pieces_cut_between_a_word_and_whitespace() -> None:
    lines = ["a b\n", " \n", " cc  dd \n", "\n", "e\n"]
    pieces = list(text_pieces(lines, piece_chars=3))
    assert "".join(pieces) == "".join(lines)
    for left, right in itertools.pairwise(pieces):
        assert not left[-1].isspace() and right[0].isspace()


def test_loaders_yield_input_ids_and_labels(gpt2_dir: Path, tmp_path: Path) -> None:
    write_wikitext(tmp_path / "raw")
    dm = _module(gpt2_dir, tmp_path / "raw", tmp_path / "cache", block_size=16, batch_size=4, eval_batch_size=5)
    dm.prepare_data()
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == (4, 16) and train["input_ids"].dtype == torch.long
    assert torch.equal(train["input_ids"], train["labels"])
    val = list(dm.val_dataloader())
    assert val[0]["input_ids"].shape == (5, 16)
    np.testing.assert_array_equal(torch.cat([b["input_ids"] for b in val]).numpy(), dm.datasets["valid"].blocks)
    torch.manual_seed(0)
    first = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
    assert not torch.equal(first, torch.from_numpy(dm.datasets["train"].blocks.astype(np.int64)))  # shuffled
    with pytest.raises(RuntimeError, match=r"call setup\(\) before asking for the test loader"):
        dm.test_dataloader()


def test_cache_is_reused_and_keyed_by_block_size(gpt2_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_wikitext(tmp_path / "raw")
    cache = tmp_path / "cache"
    dm = _module(gpt2_dir, tmp_path / "raw", cache, block_size=16)
    dm.prepare_data()
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 3 and all("block16" in f.name for f in files)

    calls: list[int] = []
    real = wikitext.tokenize_lines

    def counting(*args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(wikitext, "tokenize_lines", counting)
    again = _module(gpt2_dir, tmp_path / "raw", cache, block_size=16)
    again.prepare_data()
    again.setup("validate")
    assert calls == [] and again.cache_path("valid") == dm.cache_path("valid")

    other = _module(gpt2_dir, tmp_path / "raw", cache, block_size=32)
    other.prepare_data()
    assert len(calls) == 3 and len(list(cache.glob("*.npy"))) == 6
    other.setup("validate")
    assert other.datasets["valid"].blocks.shape[1] == 32

    before = dm.cache_path("valid")
    (tmp_path / "raw" / "wiki.valid.raw").write_text(" = Changed = \n" * 50, encoding="utf-8")  # another source
    assert dm.cache_path("valid") != before


def test_setup_without_prepare_data(gpt2_dir: Path, tmp_path: Path) -> None:
    write_wikitext(tmp_path / "raw")
    dm = _module(gpt2_dir, tmp_path / "raw", tmp_path / "cache", block_size=16)
    with pytest.raises(RuntimeError, match=r"tokenised valid split is not in `--data.cache_dir`.*prepare_data"):
        dm.setup("validate")


def test_missing_raw_files(gpt2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "wiki.train.raw").write_text("x\n", encoding="utf-8")
    dm = _module(gpt2_dir, tmp_path / "raw", tmp_path / "cache", variant="wikitext-103")
    with pytest.raises(FileNotFoundError, match=r"`--data.data_dir`=.* does not hold the raw wikitext-103") as err:
        dm.prepare_data()
    for name in ("wiki.valid.raw", "wiki.test.raw", str(Path("wikitext-103-raw") / "wiki.train.raw")):
        assert name in str(err.value)


def test_block_size_larger_than_the_model_context(gpt2_dir: Path, tmp_path: Path) -> None:
    write_wikitext(tmp_path / "raw")
    dm = _module(gpt2_dir, tmp_path / "raw", tmp_path / "cache", block_size=N_POSITIONS + 1)
    with pytest.raises(ValueError, match=rf"`--data.block_size`={N_POSITIONS + 1} exceeds the {N_POSITIONS} "
                                         rf"positions of `--data.model_name_or_path`.*<= {N_POSITIONS}"):
        dm.setup("fit")


def test_split_shorter_than_one_block(gpt2_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_wikitext(raw)
    (raw / "wiki.test.raw").write_text(" = Tiny = \n", encoding="utf-8")
    dm = _module(gpt2_dir, raw, tmp_path / "cache", block_size=64)
    with pytest.raises(ValueError, match=r"the test split of wikitext-2 has \d+ tokens, fewer than one block of "
                                         r"`--data.block_size`=64"):
        dm.prepare_data()


def test_argument_errors_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        WikiTextDataModule(variant="wikitext-3", block_size=1, batch_size=0, eval_batch_size=-1,  # type: ignore[arg-type]
                           num_workers=-2)
    message = str(err.value)
    for expected in ("`--data.variant` must be one of 'wikitext-2', 'wikitext-103', got 'wikitext-3'",
                     "`--data.block_size` must be an integer >= 2, got 1",
                     "`--data.batch_size` must be an integer >= 1, got 0",
                     "`--data.eval_batch_size` must be an integer >= 1 or null, got -1",
                     "`--data.num_workers` must be an integer >= 0, got -2"):
        assert expected in message


def test_unknown_tokenizer_path(tmp_path: Path) -> None:
    dm = WikiTextDataModule(model_name_or_path=str(tmp_path / "nowhere"), data_dir=str(tmp_path),
                            cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cannot load the tokenizer of `--data.model_name_or_path`="):
        dm.prepare_data()


class _FakeSplit:
    """The one method of ``datasets.Dataset`` the module uses, where ``datasets`` is not installed."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows

    def iter(self, batch_size: int) -> Any:
        for start in range(0, len(self.rows), batch_size):
            yield {"text": self.rows[start:start + batch_size]}


def _patch_load_dataset(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> Any:
    """Replace ``datasets.load_dataset`` (a stub module if ``datasets`` is missing); returns a split builder."""
    try:
        import datasets
    except ImportError:
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        return _FakeSplit
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return lambda rows: datasets.Dataset.from_dict({"text": rows})


def test_hugging_face_datasets_source(gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = write_wikitext(tmp_path / "raw")
    calls: list[tuple[str, str]] = []

    def load_dataset(path: str, name: str) -> dict[str, Any]:
        calls.append((path, name))
        # The Hub's rows are the lines of the raw files, blank lines as "".
        return {hf: make_split([line if line.strip() else "" for line in texts[split].splitlines(keepends=True)])
                for split, hf in (("train", "train"), ("valid", "validation"), ("test", "test"))}

    make_split = _patch_load_dataset(monkeypatch, load_dataset)
    dm = _module(gpt2_dir, None, tmp_path / "cache", block_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    joined = "".join(line for line in texts["valid"].splitlines(keepends=True) if line.strip())
    whole = np.asarray(dm.tokenizer(joined, verbose=False)["input_ids"])
    np.testing.assert_array_equal(dm.datasets["valid"].blocks.reshape(-1), whole[: dm.datasets["valid"].blocks.size])
    dm.prepare_data()  # cached: no second download
    assert len(calls) == 1
    raw = _module(gpt2_dir, tmp_path / "raw", tmp_path / "cache_raw", block_size=16)
    raw.prepare_data()
    raw.setup("fit")  # the raw files and the Hub give the same blocks
    np.testing.assert_array_equal(raw.datasets["valid"].blocks, dm.datasets["valid"].blocks)


def test_hugging_face_datasets_failure_names_the_offline_option(gpt2_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(path: str, name: str) -> None:
        raise ConnectionError("offline")

    _patch_load_dataset(monkeypatch, load_dataset)
    dm = _module(gpt2_dir, None, tmp_path / "cache", block_size=16)
    with pytest.raises(RuntimeError, match=r"ConnectionError: offline.*set `--data.data_dir` to a folder holding"):
        dm.prepare_data()
