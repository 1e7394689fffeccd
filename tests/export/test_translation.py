"""The translation export: SentencePiece model and config beside the weights; translate from the folder alone."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fairseq2") is None or importlib.util.find_spec("sentencepiece") is None,
    reason="needs the translation extra (fairseq2, sentencepiece)")

from step_lightning import SRSTECallback  # noqa: E402
from step_lightning.export import export_model, translate_from_export  # noqa: E402
from step_lightning.models.translation import TranslationModule  # noqa: E402
from tests.conftest import tiny_trainer  # noqa: E402
from tests.models.test_translation import _dm, _model  # noqa: E402
from tests.wmt_tiny import make_parallel  # noqa: E402

SENTENCES = ["w1 w2 w3", "w7", "w3 w3 w9 w11 w12 w13", "w5 w6", "", "w8 w8"]


def test_translate_from_the_export_folder_alone_matches_predict(tmp_path: Path) -> None:
    corpus = make_parallel(tmp_path / "wmt", n_train=200, n_eval=8)
    source = tmp_path / "news.de"
    source.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    dm = _dm(corpus, predict_file=str(source))
    model = _model(dm, predict_output=str(tmp_path / "news.en"), bleu_every_n_val=0)
    recipe = SRSTECallback()
    trainer = tiny_trainer(tmp_path, [recipe], max_steps=40, enable_checkpointing=False)
    trainer.fit(model, dm)
    trainer.predict(model, dm)  # the N:M model, through the data module's pipeline
    expected = (tmp_path / "news.en").read_text(encoding="utf-8").splitlines()

    # A checkpoint carries the SentencePiece model, so `export` from it can write the folder too.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = TranslationModule.load_from_checkpoint(tmp_path / "last.ckpt", optimizer=model.optimizer_factory)
    assert restored.tokenizer_files == model.tokenizer_files
    assert restored.tokenizer_files["sentencepiece"] == dm.spm_path().read_bytes()

    result = export_model(model, recipe, tmp_path / "export")
    assert {p.name for p in result.files} >= {"model.safetensors", "sentencepiece.model", "translation.json"}
    shutil.rmtree(corpus)  # nothing of the corpus, its SentencePiece cache or the checkpoint is needed
    (tmp_path / "last.ckpt").unlink()
    got = translate_from_export(tmp_path / "export", SENTENCES)
    assert got == expected and any(got)


def test_export_without_a_tokenizer_warns_and_translate_says_what_is_missing(tmp_path: Path) -> None:
    model = TranslationModule(arch="tiny", num_tokens=54)
    with pytest.warns(UserWarning, match=r"gets no sentencepiece\.model/translation\.json: this model never ran with "
                                         r"a WMTDataModule"):
        export_model(model, SRSTECallback(), tmp_path / "out")
    assert not (tmp_path / "out" / "translation.json").exists()
    with pytest.raises(FileNotFoundError, match=r"translation\.json does not exist; export a TranslationModule"):
        translate_from_export(tmp_path / "out", ["w1"])
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True)  # the weights are still exported
