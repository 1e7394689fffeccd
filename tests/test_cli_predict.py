"""`python -m step_lightning predict` writes a predictions file per task family (PredictionWriter)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from step_lightning.callbacks import PredictionWriter
from step_lightning.cli import QUICKSTART, main
from tests.conftest import TinyModule, tiny_trainer
from tests.test_cli import CONFIGS, DEBUG, offline_overrides


def _read(path: Path, delimiter: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.reader(file, delimiter=delimiter))


def test_quickstart_predict_writes_class_names_and_probabilities(in_tmp: Path) -> None:
    cli = main(["predict", "--config", str(QUICKSTART), "--config", str(DEBUG)])
    rows = _read(Path(cli.trainer.log_dir) / "predictions.csv", ",")
    assert rows[0] == ["index", "class", "probability"]
    assert [int(r[0]) for r in rows[1:]] == list(range(32))  # debug.yaml: 2 batches of 16, in dataset order
    assert {r[1] for r in rows[1:]} <= {str(d) for d in range(10)}
    assert all(0.1 <= float(r[2]) <= 1.0 for r in rows[1:])  # the largest of 10 probabilities
    # The rows are the N:M model's (predict evaluates it): the first batch again, by hand.
    recipe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "STEPCallback")
    cli.model.load_state_dict(recipe.masked_state_dict(cli.model))
    images = torch.stack([cli.datamodule.val_set[i][0] for i in range(16)])
    with torch.no_grad():
        best, label = cli.model.eval()(images).softmax(-1).max(-1)
    assert [r[1] for r in rows[1:17]] == [str(c) for c in label.tolist()]
    assert [float(r[2]) for r in rows[1:17]] == pytest.approx(best.tolist(), abs=1e-6)


def test_a_configured_writer_replaces_the_default(in_tmp: Path) -> None:
    cli = main(["predict", "--config", str(QUICKSTART), "--config", str(DEBUG),
                "--trainer.callbacks+=step_lightning.callbacks.PredictionWriter",
                "--trainer.callbacks.output_dir", "mine"])
    writers = [cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter)]
    assert len(writers) == 1 and writers[0].written == [Path("mine") / "predictions.csv"]
    assert not (Path(cli.trainer.log_dir) / "predictions.csv").exists()


@pytest.mark.parametrize(("task", "files", "labels"), [
    ("mnli", ["MNLI-m.tsv", "MNLI-mm.tsv"], {"entailment", "neutral", "contradiction"}),
    ("sst2", ["SST-2.tsv"], {"0", "1"}),
    ("stsb", ["STS-B.tsv"], None),
])
def test_glue_predict_writes_the_submission_format(in_tmp: Path, task: str, files: list[str],
                                                   labels: set[str] | None) -> None:
    config = "glue/bert_base.yaml"
    cli = main(["predict", "--config", str(CONFIGS / config), "--config", str(DEBUG),
                *offline_overrides(config, in_tmp), "--data.init_args.task", task])
    for name in files:
        rows = _read(Path(cli.trainer.log_dir) / name, "\t")
        assert rows[0] == ["index", "prediction"]
        assert [int(r[0]) for r in rows[1:]] == list(range(10))  # tests/hf_tiny.py: 10 dev examples per file
        if labels is None:
            assert all(len(r) == 2 and float(r[1]) == pytest.approx(float(r[1])) for r in rows[1:])
        else:
            assert {r[1] for r in rows[1:]} <= labels


def test_writer_needs_a_model_that_formats_its_predictions(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = tiny_trainer(tmp_path, [PredictionWriter()])
    with pytest.raises(ValueError, match=r"PredictionWriter: TinyModule has no `format_predictions`"):
        trainer.predict(TinyModule(), data)


def test_wikitext_predict_continues_the_prompts_of_a_file(in_tmp: Path) -> None:
    config = "wikitext/gpt2.yaml"
    prompts = ["The history of the city began", "", "He said", "In 1990 the"]
    (in_tmp / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    base = ["predict", "--config", str(CONFIGS / config), "--config", str(CONFIGS / "recipes" / "srste_2of4.yaml"),
            "--config", str(DEBUG), *offline_overrides(config, in_tmp), "--data.init_args.predict_file", "prompts.txt",
            "--model.init_args.max_new_tokens", "5"]
    cli = main(base)
    rows = _read(Path(cli.trainer.log_dir) / "continuations.tsv", "\t")
    assert rows[0] == ["index", "prompt", "continuation"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3"] and [r[1] for r in rows[1:]] == prompts
    # Row 0 (the longest prompt: no padding) is the greedy continuation of the N:M model.
    recipe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "SRSTECallback")
    model = cli.model
    model.load_state_dict(recipe.masked_state_dict(model))
    ids = model.tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.model.eval().generate(ids, max_new_tokens=5, do_sample=False,
                                      pad_token_id=model.tokenizer.eos_token_id)
    assert rows[1][2] == model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    sampled = [*base, "--model.init_args.do_sample", "true", "--model.init_args.temperature", "2.0"]
    first = (Path(main(sampled).trainer.log_dir) / "continuations.tsv").read_text(encoding="utf-8")
    second = (Path(main(sampled).trainer.log_dir) / "continuations.tsv").read_text(encoding="utf-8")
    assert first == second  # seeded by --model.init_args.sample_seed


def test_wikitext_predict_without_prompts_says_how_to_give_them(in_tmp: Path) -> None:
    config = "wikitext/gpt2.yaml"
    with pytest.raises(ValueError, match=r"`predict` continues prompts and WikiText has none; .*"
                                         r"`--data\.init_args\.predict_file PATH`"):
        main(["predict", "--config", str(CONFIGS / config), "--config", str(DEBUG), *offline_overrides(config, in_tmp)])


def test_image_folder_predictions_are_keyed_by_path_with_class_names(tmp_path: Path) -> None:
    from step_lightning.data.image_folder import ImageFolderDataModule
    from step_lightning.models.image_classifier import ImageClassifier
    from tests.data.test_image_folder import make_image_folder

    dm = ImageFolderDataModule(str(make_image_folder(tmp_path / "images")), image_size=16, batch_size=2, num_workers=0)
    model = ImageClassifier(backbone="small_cnn", num_classes=dm.num_classes, in_channels=3, image_size=16)
    writer = PredictionWriter(str(tmp_path / "out"))
    tiny_trainer(tmp_path, [writer]).predict(model, dm)
    rows = _read(tmp_path / "out" / "predictions.csv", ",")
    assert rows[0] == ["path", "class", "probability"]
    assert [r[0] for r in rows[1:]] == [path for path, _ in dm.sets["val"].samples]
    assert {r[1] for r in rows[1:]} <= set(dm.classes)
