"""export_model on a Hugging Face model: save_pretrained output with the zeros in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from step_lightning import SRSTECallback, check_nm_sparse
from step_lightning.export import export_model

transformers = pytest.importorskip("transformers")


class TinyBert(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=50, max_position_embeddings=16, num_labels=3)
        self.model = transformers.BertForSequenceClassification(config)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_hf_model_exports_a_loadable_nm_directory(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = TinyBert()
    data = DataLoader(TensorDataset(torch.randint(0, 50, (8, 12)), torch.randint(0, 3, (8,))), batch_size=4)
    recipe = SRSTECallback()
    pl.Trainer(max_steps=2, callbacks=[recipe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(module, data)
    result = export_model(module, recipe, tmp_path / "out")
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "hf")
    params = dict(loaded.named_parameters())
    for t in recipe.targets:
        name = t.name.removeprefix("model.")
        check_nm_sparse(params[name], t.n, t.m, t.layout, name=name)
    assert "model.bert.encoder.layer.0.attention.self.query.weight" in result.table
