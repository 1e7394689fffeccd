"""The hf/ export: masked weights and the tokenizer, both loadable by transformers' Auto classes (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_lightning import SRSTECallback, check_nm_sparse
from step_lightning.export import export_model, load_safetensors, verify_nm

transformers = pytest.importorskip("transformers")
from tests import hf_tiny, hf_tiny_lm  # noqa: E402  (after the skip: they import transformers lazily)


def test_sequence_classifier_export_loads_model_and_tokenizer(tmp_path: Path) -> None:
    from step_lightning.models.sequence_classifier import SequenceClassifier

    module = SequenceClassifier(str(hf_tiny.make_tiny_bert(tmp_path / "bert")), task="sst2", num_labels=2)
    recipe = SRSTECallback()
    export_model(module, recipe, tmp_path / "out")
    hf = tmp_path / "out" / "hf"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    batch = tokenizer(["the movie was good"], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0])[:3] == ["[CLS]", "the", "movie"]
    assert model(**batch).logits.shape == (1, 2)
    params = dict(model.named_parameters())
    for t in recipe.targets:
        check_nm_sparse(params[t.name.removeprefix("model.")], t.n, t.m, t.layout, name=t.name)


def test_causal_lm_export_has_tokenizer_and_ties_once(tmp_path: Path) -> None:
    from step_lightning.models.causal_lm import CausalLM

    module = CausalLM(str(hf_tiny_lm.build_gpt2(tmp_path / "gpt2")))
    export_model(module, SRSTECallback(), tmp_path / "out")
    hf = tmp_path / "out" / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    ids = tokenizer("The cat", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    # GPT-2 ties lm_head to the token embedding: stored once in model.safetensors, given back tied.
    state = load_safetensors(tmp_path / "out" / "model.safetensors")
    assert state["model.lm_head.weight"] is state["model.transformer.wte.weight"]
    assert torch.equal(state["model.lm_head.weight"], module.model.lm_head.weight)
    assert all(row[2] == "conv1d_hf" for row in verify_nm(tmp_path / "out" / "model.safetensors")[1:])
