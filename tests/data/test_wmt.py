"""WMTDataModule: SentencePiece trained once and cached, token-count batches, seeded shuffling, DDP shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_translation

pytestmark = requires_translation

from step_lightning.data.wmt import WMTDataModule  # noqa: E402
from tests.wmt_tiny import make_parallel  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_parallel(tmp_path_factory.mktemp("wmt"))


def _dm(corpus: Path, **kwargs: object) -> WMTDataModule:
    args: dict[str, object] = dict(data_dir=str(corpus), vocab_size=48, max_tokens=128, max_seq_len=24,
                                   num_workers=1, shuffle_window=0, seed=3)
    args.update(kwargs)
    dm = WMTDataModule(**args)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_sentencepiece_trained_once_and_keyed_by_vocab_size(corpus: Path) -> None:
    dm = _dm(corpus)
    path = dm.spm_path()
    assert path.is_file() and path.parent == corpus / "spm"
    stamp = path.stat().st_mtime_ns
    dm.prepare_data()  # cached: not retrained
    assert path.stat().st_mtime_ns == stamp
    other = _dm(corpus, vocab_size=40)
    assert other.spm_path() != path and other.spm_path().is_file()
    assert dm.tokenizer.vocab_info.size == dm.num_tokens == 48 + 6
    assert dm.tokenizer.vocab_info.pad_idx == dm.pad_idx == 0


def test_batches_hold_padded_ids_within_the_token_budget(corpus: Path) -> None:
    dm = _dm(corpus)
    vocab = dm.tokenizer.vocab_info
    src_lang = dm.tokenizer.create_encoder(task="translation", lang="de", mode="source").prefix_indices.tolist()
    tgt_prefix = dm.tokenizer.create_encoder(task="translation", lang="en", mode="target").prefix_indices.tolist()
    assert tgt_prefix[0] == vocab.eos_idx and len(src_lang) == 1
    batches = list(dm.train_dataloader())
    assert len(batches) > 2
    pairs = 0
    for batch in batches:
        src, tgt = batch["source"], batch["target"]
        assert src.dtype == torch.int64 and src.shape[0] == tgt.shape[0] == len(batch["target_text"])
        assert src.numel() <= 128 and tgt.numel() <= 128 and max(src.shape[1], tgt.shape[1]) <= 24
        assert batch["source_lens"] == (src != 0).sum(1).tolist()
        assert batch["target_lens"] == (tgt != 0).sum(1).tolist()
        assert (src[:, 0] == src_lang[0]).all() and (tgt[:, : len(tgt_prefix)] == torch.tensor(tgt_prefix)).all()
        last = src.gather(1, (torch.tensor(batch["source_lens"]) - 1).unsqueeze(1)).squeeze(1)
        assert (last == vocab.eos_idx).all()
        pairs += src.shape[0]
    assert pairs == 300  # every training pair fits max_seq_len here
    val = list(dm.val_dataloader())
    assert sum(len(b["target_text"]) for b in val) == 12
    assert all(text.isupper() for b in val for text in b["target_text"])


def test_empty_and_overlong_pairs_are_left_out_and_counted_and_eval_keeps_the_end(tmp_path: Path,
                                                                                  corpus: Path) -> None:
    root = make_parallel(tmp_path / "noisy", n_train=60, n_eval=4)
    long = " ".join(["w1 w2 w3"] * 20)
    for suffix, extra in (("de", ["", "w1 w2", long]), ("en", ["W1", "", long.upper()])):
        with open(root / f"train.{suffix}", "a", encoding="utf-8") as file:
            file.write("\n".join(extra) + "\n")
        with open(root / f"valid.{suffix}", "a", encoding="utf-8") as file:
            file.write((long if suffix == "de" else long.upper()) + "\n")
    dm = _dm(root, vocab_size=32, max_tokens=96)
    stats: dict[str, int] = {}
    kept = sum(len(b["target_text"]) for b in dm.build_pipeline("train", True, 0, stats=stats))
    assert kept == 60 and stats["read"] == 63 and stats["dropped"] == 3
    val = next(b for b in dm.val_dataloader() if long.upper() in b["target_text"])
    row = val["target_text"].index(long.upper())
    assert val["source_lens"][row] == 24 and int(val["source"][row, 23]) == dm.tokenizer.vocab_info.eos_idx


def test_a_copy_of_the_corpus_elsewhere_finds_the_same_sentencepiece_model(tmp_path: Path, corpus: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("spm"))
    original = _dm(corpus).spm_path()
    moved = WMTDataModule(data_dir=str(copy), vocab_size=48, spm_dir=str(corpus / "spm"))
    assert moved.spm_path() == original  # keyed by content, not by path or modification time
    (copy / "train.en").write_text("CHANGED\n" * 300, encoding="utf-8")
    assert moved.spm_path() != original


def test_batch_size_caps_the_sentences_per_batch(corpus: Path) -> None:
    uncapped = max(len(b["target_text"]) for b in _dm(corpus).build_pipeline("train", True, 0))
    capped = list(_dm(corpus, batch_size=5).build_pipeline("train", True, 0))
    assert uncapped > 5 and max(len(b["target_text"]) for b in capped) == 5
    assert sum(len(b["target_text"]) for b in capped) == 300


def test_shuffling_is_seeded_and_changes_per_epoch(corpus: Path) -> None:
    dm = _dm(corpus)

    def order(epoch: int, seed: int = 3) -> list[str]:
        dm.seed = seed
        return [t for b in dm.build_pipeline("train", True, epoch) for t in b["target_text"]]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert order(0, seed=4) != order(0)
    loader = dm.train_dataloader()  # each pass over the loader is the next epoch
    first, second = ([t for b in loader for t in b["target_text"]] for _ in range(2))
    assert first == order(0, seed=3) and second == order(1)


def test_ranks_get_the_same_number_of_training_batches(corpus: Path) -> None:
    dm = _dm(corpus, max_tokens=100)
    whole = list(dm.build_pipeline("train", True, 0))
    shards = [list(dm.build_pipeline("train", True, 0, rank, 3)) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(whole) // 3
    texts = [tuple(b["target_text"]) for s in shards for b in s]
    assert len(set(texts)) == len(texts) and set(texts) <= {tuple(b["target_text"]) for b in whole}
    # evaluation: uneven shards, every pair scored exactly once
    evals = [list(dm.build_pipeline("valid", False, 0, rank, 3)) for rank in range(3)]
    assert sorted(t for s in evals for b in s for t in b["target_text"]) == sorted(
        t for b in dm.val_dataloader() for t in b["target_text"])


def test_errors_name_the_flags(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(ValueError) as err:
        WMTDataModule(src_lang="en", tgt_lang="en", dataset="glue", vocab_size=8, max_tokens=0)
    message = str(err.value)
    for flag in ("--data.src_lang", "--data.vocab_size", "--data.max_tokens", "--data.dataset"):
        assert flag in message
    with pytest.raises(ValueError, match=r"--data.max_tokens.*--data.max_seq_len"):
        WMTDataModule(data_dir=str(corpus), max_tokens=16, max_seq_len=32)
    with pytest.raises(FileNotFoundError, match=r"lacks \['train.fr'"):
        WMTDataModule(src_lang="fr", tgt_lang="en", data_dir=str(corpus)).prepare_data()
    misaligned = make_parallel(tmp_path / "misaligned", n_train=40, n_eval=4)
    (misaligned / "valid.en").write_text("ONE\nTWO\nTHREE\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"valid\.de has 4 lines but .*valid\.en has 3"):
        WMTDataModule(data_dir=str(misaligned), vocab_size=40).prepare_data()
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        WMTDataModule(data_dir=str(tmp_path / "nowhere")).prepare_data()
    with pytest.raises(ValueError, match=r"--data\.vocab_size`=5000"):
        WMTDataModule(data_dir=str(corpus), vocab_size=5000, spm_dir=str(tmp_path / "spm")).prepare_data()
    with pytest.raises(RuntimeError, match="call prepare_data"):
        WMTDataModule(data_dir=str(corpus), vocab_size=56, spm_dir=str(tmp_path / "empty")).setup("fit")


def test_download_writes_the_hub_pair_as_text_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, config: str) -> datasets.DatasetDict:
        calls.append((name, config))
        rows = [{"translation": {"de": f"hallo w{i}\nwelt", "en": f"HELLO W{i} WORLD"}} for i in range(30)]
        return datasets.DatasetDict({split: datasets.Dataset.from_list(rows[:n]) for split, n in
                                     (("train", 30), ("validation", 4), ("test", 3))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = WMTDataModule(dataset="wmt17", download_dir=str(tmp_path / "dl"), vocab_size=31, max_tokens=64,
                       max_seq_len=16, num_workers=1)
    dm.prepare_data()
    dm.prepare_data()  # written once
    assert calls == [("wmt/wmt17", "de-en")]
    lines = (tmp_path / "dl" / "train.de").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30 and lines[1] == "hallo w1 welt"
    assert len((tmp_path / "dl" / "valid.en").read_text(encoding="utf-8").splitlines()) == 4
    dm.setup("fit")
    assert sum(len(b["target_text"]) for b in dm.val_dataloader()) == 4
    en_de = WMTDataModule(src_lang="en", tgt_lang="de", download_dir=str(tmp_path / "dl2"), vocab_size=31,
                          max_tokens=64, max_seq_len=16)
    en_de.prepare_data()
    assert calls[-1] == ("wmt/wmt17", "de-en") and (tmp_path / "dl2" / "train.en").is_file()


@pytest.mark.slow  # a fresh interpreter importing step_lightning: about 10 s on 2 CPU cores
def test_importing_the_translation_modules_does_not_import_fairseq2() -> None:
    code = ("import sys, step_lightning.data.wmt, step_lightning.models.translation; "
            "assert not [m for m in sys.modules if m.startswith('fairseq2')], 'fairseq2 imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
