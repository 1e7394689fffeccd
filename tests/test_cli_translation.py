"""The WMT17 De-En configs through `python -m step_lightning`: fit, N:M export, test, predict (offline, arch tiny)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step_lightning import check_nm_sparse
from step_lightning.cli import main
from tests.conftest import requires_translation
from tests.test_cli import CONFIGS, DEBUG, fit_every_recipe, offline_overrides

pytestmark = requires_translation

TASK = "wmt17_de_en/transformer_base.yaml"
STEP = ["--config", str(CONFIGS / "recipes" / "step_2of4.yaml")]


@pytest.mark.slow
def test_every_recipe_fits_and_step_exports_tests_and_translates_a_file(in_tmp: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    generation = ["--model.init_args.beam_size", "2", "--model.init_args.max_gen_len", "[1.5, 6]"]
    cli = fit_every_recipe(TASK, in_tmp, *generation, "--trainer.val_check_interval", "6")["step_2of4"]
    overrides = [*offline_overrides(TASK, in_tmp), *generation]
    recipe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "STEPCallback")
    assert recipe.switch_step == 2 and cli.trainer.global_step == 12
    assert cli.model.hparams.num_tokens == cli.datamodule.num_tokens  # linked from the data module
    names = {t.name for t in recipe.targets}
    assert any("encoder_decoder_attn.q_proj" in n for n in names) and any("ffn.inner_proj" in n for n in names)
    assert not any("embed" in n or "final_proj" in n for n in names)
    for key in ("val/loss", "val/bleu"):
        assert torch.isfinite(cli.trainer.callback_metrics[key]), key
    run_dir = in_tmp / "logs" / "wmt17_de_en" / "transformer_base" / "step_2of4" / "version_0"
    assert Path(cli.trainer.log_dir).resolve() == run_dir.resolve()
    state = torch.load(run_dir / "export" / "model.pt", weights_only=True)
    for target in recipe.targets:
        check_nm_sparse(state[target.name], 2, 4, target.layout, name=target.name)

    last = run_dir / "checkpoints" / "last.ckpt"
    tested = main(["test", "--config", str(CONFIGS / TASK), *STEP, "--config", str(DEBUG), *overrides,
                   "--ckpt_path", str(last)])
    assert torch.isfinite(tested.trainer.callback_metrics["test/bleu"])

    source = in_tmp / "news.de"
    source.write_text("w1 w2 w3\nw4\n\nw5 w6 w7 w8\n", encoding="utf-8")
    capsys.readouterr()
    main(["predict", "--config", str(CONFIGS / TASK), *STEP, "--config", str(DEBUG), *overrides,
          "--ckpt_path", str(last), "--data.init_args.predict_file", str(source),
          "--trainer.limit_predict_batches", "1.0"])
    written = list((in_tmp / "logs" / "wmt17_de_en" / "transformer_base" / "step_2of4").glob("*/translations.en.txt"))
    assert len(written) == 1 and written[0].read_text(encoding="utf-8").count("\n") == 4
