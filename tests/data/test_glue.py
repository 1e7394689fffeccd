"""GLUEDataModule: the official TSV formats of all nine tasks, HF label order, the tokenisation cache, padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from step_lightning.data import glue
from step_lightning.data.glue import GLUEDataModule, load_glue_dir, read_glue_tsv
from step_lightning.data.hf import tokenizer_fingerprint
from step_lightning.tasks.glue import TASKS
from tests.hf_tiny import FOLDERS, make_glue, make_tiny_bert, make_tokenizer

# Label names in the order of Hugging Face `datasets`' nyu-mll/glue ClassLabel features (its dataset card).
HF_LABELS: dict[str, list[str] | None] = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "stsb": None,
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}
HF_TEXT = {"cola": ["sentence"], "sst2": ["sentence"], "mrpc": ["sentence1", "sentence2"],
           "stsb": ["sentence1", "sentence2"], "qqp": ["question1", "question2"], "mnli": ["premise", "hypothesis"],
           "qnli": ["question", "sentence"], "rte": ["sentence1", "sentence2"], "wnli": ["sentence1", "sentence2"]}
N_TRAIN, N_DEV = 24, 10


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def glue_dir(tmp_path: Path) -> tuple[Path, dict[str, dict[str, list[Any]]]]:
    root = tmp_path / "glue_data"
    return root, make_glue(root, n_train=N_TRAIN, n_dev=N_DEV)


def _expected(task: str, written: list[Any]) -> list[Any]:
    names = HF_LABELS[task]
    if names is None:
        return [pytest.approx(float(v), abs=1e-6) for v in written]
    return [names.index(v) if isinstance(v, str) else int(v) for v in written]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_parses_with_hf_labels(glue_dir: tuple[Path, dict[str, Any]], task: str) -> None:
    root, written = glue_dir
    splits = load_glue_dir(root, task)
    val = ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]
    assert list(splits) == ["train", *val]
    stems = dict(zip(["train", *val], written[task], strict=True))  # train, dev / dev_matched, dev_mismatched
    for split, stem in stems.items():
        data = splits[split]
        assert data.column_names == [*HF_TEXT[task], "label"]
        assert len(data) == (N_TRAIN if split == "train" else N_DEV)  # CoLA: no header row lost or added
        assert data["label"] == _expected(task, written[task][stem])
    label = splits["train"].features["label"]
    assert (getattr(label, "names", None)) == HF_LABELS[task]
    assert TASKS[task].num_labels == (1 if task == "stsb" else 3 if task == "mnli" else 2)
    # An unmatched double quote stays in its field (csv.QUOTE_NONE): the rows after it are intact.
    assert splits["train"][HF_TEXT[task][0]][0] == 'the " movie was good'
    assert GLUEDataModule(task).num_labels == TASKS[task].num_labels


def test_mnli_string_labels_map_to_hf_order(tmp_path: Path) -> None:
    folder = tmp_path / "MNLI"
    folder.mkdir()
    header = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = "".join(f"{i}\t0\t0\tg\t-\t-\t-\t-\ta\tb\t{lab}\t{lab}\n"
                   for i, lab in enumerate(["contradiction", "entailment", "neutral"]))
    (folder / "dev_matched.tsv").write_text(header + rows, encoding="utf-8")
    assert read_glue_tsv(folder / "dev_matched.tsv", "mnli")["label"] == [2, 0, 1]


def test_mrpc_with_byte_order_mark_and_malformed_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta b\tc d\n0\t3\t4\tcut short\n",
                    encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row"):
        columns = read_glue_tsv(path, "mrpc")
    assert columns == {"sentence1": ["a b"], "sentence2": ["c d"], "label": [1]}


def test_tsv_content_errors(tmp_path: Path) -> None:
    path = tmp_path / "dev.tsv"
    path.write_text("index\tquestion\tsentence\tlabel\n0\ta\tb\tmaybe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev.tsv:2: label 'maybe' is not one of \['entailment', 'not_entailment'"):
        read_glue_tsv(path, "qnli")
    with pytest.raises(ValueError, match=r"has no column\(s\) \['sentence1', 'sentence2'\]"):
        read_glue_tsv(path, "rte")
    path.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\thigh\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"the score 'high' is not a number"):
        read_glue_tsv(path, "stsb")


def test_constructor_errors_name_the_flags() -> None:
    with pytest.raises(ValueError, match=r"`--data.task` must be one of 'cola', 'sst2'.*got 'sst5'"):
        GLUEDataModule("sst5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`--data.max_length` must be an integer >= 4, got 0") as err:
        GLUEDataModule("sst2", max_length=0, batch_size=0)
    assert "`--data.batch_size` must be an integer >= 1, got 0" in str(err.value)  # all problems at once
    with pytest.raises(ValueError, match=r"`--data.eval_batch_size` must be an integer >= 1 or null, got -1"):
        GLUEDataModule("sst2", eval_batch_size=-1)
    with pytest.raises(ValueError, match=r"`--data.num_workers` must be an integer >= 0, got -2"):
        GLUEDataModule("sst2", num_workers=-2)


def test_missing_folder_and_file_errors(tmp_path: Path, tiny_bert: Path) -> None:
    root = tmp_path / "glue_data"
    make_glue(root, tasks=["sst2", "mnli"])
    with pytest.raises(FileNotFoundError, match=r"has no RTE/ folder for `--data.task`='rte' \(found: \['MNLI', "
                                                r"'SST-2'\]\)"):
        GLUEDataModule("rte", str(tiny_bert), data_dir=str(root), max_length=32).prepare_data()
    (root / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['dev_mismatched.tsv'\]; `--data.task`='mnli' needs "
                                                r"\['train.tsv', 'dev_matched.tsv', 'dev_mismatched.tsv'\]"):
        GLUEDataModule("mnli", str(tiny_bert), data_dir=str(root), max_length=32).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"`--data.data_dir`='.*nowhere' is not a directory"):
        GLUEDataModule("sst2", str(tiny_bert), data_dir=str(tmp_path / "nowhere")).prepare_data()


def test_tokenizer_errors(tmp_path: Path, tiny_bert: Path) -> None:
    root = tmp_path / "glue_data"
    make_glue(root, tasks=["sst2"])
    with pytest.raises(ValueError, match=r"`--data.max_length`=128 exceeds the tokenizer's model_max_length 64"):
        GLUEDataModule("sst2", str(tiny_bert), data_dir=str(root), max_length=128).prepare_data()
    with pytest.raises(RuntimeError, match=r"no tokenizer could be loaded from `--data.model_name_or_path`="):
        GLUEDataModule("sst2", str(tmp_path / "no_model"), data_dir=str(root), max_length=32).prepare_data()
    with pytest.raises(RuntimeError, match=r"no tokenised data at .*; call prepare_data\(\) first"):
        GLUEDataModule("sst2", str(tiny_bert), data_dir=str(root), max_length=32).setup("fit")


class CountTokenize:
    """Wraps :func:`glue.tokenize_splits`, counting calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.inner = glue.tokenize_splits
        monkeypatch.setattr(glue, "tokenize_splits", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def _ready(dm: GLUEDataModule) -> GLUEDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_tokenized_cache_is_reused_and_invalidated(glue_dir: tuple[Path, Any], tiny_bert: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = glue_dir
    counter = CountTokenize(monkeypatch)

    def dm(**kwargs: Any) -> GLUEDataModule:
        return _ready(GLUEDataModule(**{"task": "sst2", "model_name_or_path": str(tiny_bert),
                                        "data_dir": str(root), "max_length": 32, **kwargs}))

    first = dm()
    assert counter.calls == 1
    cache = first.cache_path(first._load_tokenizer())
    assert cache.parent == root / "tokenized" and cache.is_dir()
    stamp = (cache / "dataset_dict.json").stat().st_mtime_ns
    again = dm()  # a new run: nothing is tokenised, the saved data is loaded
    assert counter.calls == 1 and (cache / "dataset_dict.json").stat().st_mtime_ns == stamp
    assert again.datasets is not None and again.datasets["train"][:] == first.datasets["train"][:]

    dm(max_length=16)
    assert counter.calls == 2
    other_tokenizer = make_tokenizer(tmp_path / "tok2", words=["the", "movie", "good"])  # another vocabulary
    dm(model_name_or_path=str(other_tokenizer))
    assert counter.calls == 3
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nthe film\t0\n", encoding="utf-8")  # new data
    changed = dm()
    assert counter.calls == 4 and changed.datasets is not None and len(changed.datasets["validation"]) == 1
    dm(cache_dir=str(tmp_path / "elsewhere"))
    assert counter.calls == 5 and any((tmp_path / "elsewhere").iterdir())
    dm(task="cola")  # per task
    assert counter.calls == 6
    assert len(list((root / "tokenized").iterdir())) == 5  # no temporary folders left behind


def test_tokenizer_fingerprint_ignores_call_state(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["the movie"], truncation=True, max_length=8, padding="max_length")  # sets backend state
    assert tokenizer_fingerprint(tokenizer) == before


def test_dynamic_padding_and_loaders(glue_dir: tuple[Path, Any], tiny_bert: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    root, written = glue_dir
    dm = _ready(GLUEDataModule("mrpc", str(tiny_bert), data_dir=str(root), max_length=12, batch_size=4,
                               eval_batch_size=5))
    assert dm.datasets is not None
    lengths = [len(ids) for ids in dm.datasets["validation"]["input_ids"]]
    assert max(lengths) <= 12 and len(set(lengths)) > 1  # truncated, not padded at tokenisation
    loader = dm.val_dataloader()
    assert isinstance(loader, StatefulDataLoader) and isinstance(dm.train_dataloader(), StatefulDataLoader)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [5, 5]
    for i, batch in enumerate(batches):
        longest = max(lengths[5 * i:5 * i + 5])
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
        assert batch["input_ids"].shape[1] == -(-longest // 8) * 8  # the batch's longest item, rounded up to 8
        assert batch["attention_mask"].sum(1).tolist() == lengths[5 * i:5 * i + 5]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [int(v) for v in written["mrpc"]["dev"]]
    assert len(next(iter(dm.train_dataloader()))["labels"]) == 4


def test_train_loader_resumes_mid_epoch(glue_dir: tuple[Path, Any], tiny_bert: Path) -> None:
    root, _ = glue_dir
    dm = _ready(GLUEDataModule("sst2", str(tiny_bert), data_dir=str(root), max_length=32, batch_size=4))
    loader = dm.train_dataloader()
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    rest = [b["input_ids"] for b in batches]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    again = [b["input_ids"] for b in resumed]
    assert len(again) == len(rest) == N_TRAIN // 4 - 2
    assert all(torch.equal(a, b) for a, b in zip(again, rest, strict=True))


def test_mnli_has_matched_then_mismatched_loaders(glue_dir: tuple[Path, Any], tiny_bert: Path) -> None:
    root, written = glue_dir
    dm = _ready(GLUEDataModule("mnli", str(tiny_bert), data_dir=str(root), max_length=32, batch_size=4))
    names = HF_LABELS["mnli"]
    assert names is not None
    for loaders in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loaders, list) and len(loaders) == 2
        for loader, stem in zip(loaders, ["dev_matched", "dev_mismatched"], strict=True):
            labels = torch.cat([b["labels"] for b in loader]).tolist()
            assert labels == [names.index(v) for v in written["mnli"][stem]]
    assert dm.val_splits == ("validation_matched", "validation_mismatched")


def test_stsb_labels_are_float_scores(glue_dir: tuple[Path, Any], tiny_bert: Path) -> None:
    root, written = glue_dir
    dm = _ready(GLUEDataModule("stsb", str(tiny_bert), data_dir=str(root), max_length=32, batch_size=4))
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx(written["stsb"]["dev"][:4], abs=1e-6)


def test_hub_source_is_loaded_in_prepare_data_only(glue_dir: tuple[Path, Any], tiny_bert: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = glue_dir
    calls: list[str] = []

    def fake_hub(task: str) -> Any:  # what load_dataset("nyu-mll/glue", task) yields, from the local files
        calls.append(task)
        return load_glue_dir(root, task)

    monkeypatch.setattr(glue, "load_glue_hub", fake_hub)
    dm = GLUEDataModule("rte", str(tiny_bert), max_length=32, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert calls == ["rte"]
    dm.setup("fit")
    assert calls == ["rte"] and dm.datasets is not None and len(dm.datasets["train"]) == N_TRAIN
    GLUEDataModule("rte", str(tiny_bert), max_length=32, cache_dir=str(tmp_path / "cache")).prepare_data()
    assert calls == ["rte"]  # cached: not even loaded again
    # The same data from the TSV folder gets a separate cache (the source is part of the key).
    assert dm.cache_path(dm._load_tokenizer()) != GLUEDataModule(
        "rte", str(tiny_bert), data_dir=str(root), max_length=32, cache_dir=str(tmp_path / "cache")
    ).cache_path(dm._load_tokenizer())


def test_hub_failure_points_to_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"loading nyu-mll/glue/cola with datasets failed .*Set `--data.data_dir`"):
        glue.load_glue_hub("cola")


def test_folders_match_the_official_download() -> None:
    assert {task: spec.folder for task, spec in TASKS.items()} == FOLDERS
