"""The language-model configs through `python -m step_lightning fit`, on a tiny local BERT / GPT-2 (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_lightning import check_nm_sparse
from tests.test_cli import fit_every_recipe


@pytest.mark.slow
@pytest.mark.parametrize("config", ["glue/bert_base.yaml", "wikitext/gpt2.yaml"])
def test_language_model_config_fits_every_recipe_and_exports_a_hugging_face_model(in_tmp: Path, config: str) -> None:
    cli = fit_every_recipe(config, in_tmp, "--data.init_args.batch_size", "4")["step_2of4"]
    recipe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "STEPCallback")
    assert recipe.switch_step == 2
    names = [t.name for t in recipe.targets]
    if config.startswith("glue"):
        assert any("attention.self.query" in n for n in names) and any("intermediate.dense" in n for n in names)
        assert not any("pooler" in n or "classifier" in n or "embeddings" in n for n in names)
        assert torch.isfinite(cli.trainer.callback_metrics["val/score"])
    else:
        assert {t.layout for t in recipe.targets} == {"conv1d_hf"} and any("c_attn" in n for n in names)
        assert torch.isfinite(cli.trainer.callback_metrics["val/ppl"])
    export = Path(cli.trainer.log_dir) / "export"
    state = torch.load(export / "model.pt", weights_only=True)
    for target in recipe.targets:
        check_nm_sparse(state[target.name], 2, 4, target.layout, name=target.name)
    assert (export / "hf" / "config.json").is_file()  # save_pretrained of the masked model
