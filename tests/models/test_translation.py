"""TranslationModule: fairseq2 Transformer as torch modules, N:M targets, training under STEP, beam search, BLEU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tests.conftest import requires_translation

pytestmark = requires_translation

from step_lightning import ASPCallback, SRSTECallback, StepAdamW, STEPCallback, check_nm_sparse  # noqa: E402
from step_lightning._fairseq2 import import_fairseq2  # noqa: E402
from step_lightning.data.wmt import WMTDataModule  # noqa: E402
from step_lightning.models.translation import ARCHS, TARGET_PROMPT, TranslationModule  # noqa: E402
from step_lightning.sparsity import select_targets  # noqa: E402
from tests.conftest import MetricsLog, assert_train_loss_per_step, tiny_trainer  # noqa: E402
from tests.wmt_tiny import make_parallel  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_parallel(tmp_path_factory.mktemp("wmt"), n_train=200, n_eval=8)
    _dm(root).prepare_data()  # the SentencePiece model, shared by the tests
    return root


def _dm(corpus: Path, **kwargs: Any) -> WMTDataModule:
    args: dict[str, Any] = dict(data_dir=str(corpus), vocab_size=48, max_tokens=240, max_seq_len=24,
                                num_workers=1, seed=0)
    args.update(kwargs)
    return WMTDataModule(**args)


def _model(dm: WMTDataModule, **kwargs: Any) -> TranslationModule:
    args: dict[str, Any] = dict(arch="tiny", num_tokens=dm.num_tokens, dropout_p=0.0, beam_size=2, max_gen_len=(1.5, 6),
                                optimizer=lambda p: StepAdamW(p, lr=3e-3, betas=(0.9, 0.98)))
    args.update(kwargs)
    return TranslationModule(**args)


def expected_targets(layers: tuple[int, int] = (2, 2)) -> set[str]:
    names = set()
    for layer in range(layers[0]):
        names |= {f"model.encoder.layers.{layer}.self_attn.{p}.weight" for p in ATTN}
        names |= {f"model.encoder.layers.{layer}.ffn.{p}.weight" for p in ("inner_proj", "output_proj")}
    for layer in range(layers[1]):
        for attn in ("self_attn", "encoder_decoder_attn"):
            names |= {f"model.decoder.layers.{layer}.{attn}.{p}.weight" for p in ATTN}
        names |= {f"model.decoder.layers.{layer}.ffn.{p}.weight" for p in ("inner_proj", "output_proj")}
    return names


def test_projections_are_targets_and_the_tied_embedding_stays_dense() -> None:
    model = TranslationModule(arch="tiny", num_tokens=70)
    targets, skipped = select_targets(model, 2, 4)
    assert {t.name for t in targets} == expected_targets()
    assert all(t.layout == "linear" for t in targets)
    assert [s.name for s in skipped] == ["model.final_proj.weight"] and "tied" in skipped[0].reason
    inner = model.model
    embed = inner.encoder_frontend.embed
    assert isinstance(embed, nn.Embedding) and embed.padding_idx == 0
    assert embed.weight is inner.decoder_frontend.embed.weight is inner.final_proj.weight
    assert isinstance(inner.encoder.layers[0].self_attn.q_proj, nn.Linear)
    assert ARCHS["base"]["model_dim"] == 512 and ARCHS["big"]["ffn_inner_dim"] == 4096
    # What the docs and the WMT config say: pre-LN layers and a final LayerNorm per stack (not Vaswani's post-LN).
    pre = import_fairseq2("fairseq2.models.transformer").TransformerNormOrder.PRE
    for stack in (inner.encoder, inner.decoder):
        assert all(layer.norm_order == pre for layer in stack.layers)
        assert isinstance(stack.layer_norm, nn.Module)


def test_swapped_modules_compute_what_fairseq2_computes() -> None:
    from step_lightning._fairseq2 import import_fairseq2, to_torch_modules

    nllb = import_fairseq2("fairseq2.models.nllb")
    layout = import_fairseq2("fairseq2.nn").BatchLayout
    torch.manual_seed(0)
    original = nllb.create_nllb_model(nllb.NllbConfig(vocab_size=40, pad_idx=0, max_seq_len=32, dropout_p=0.0,
                                                      **ARCHS["tiny"])).eval()
    src = torch.randint(4, 40, (3, 7))
    tgt = torch.randint(4, 40, (3, 5))
    src[1, 5:] = 0
    args = (src, layout.of(src, [7, 5, 7]), tgt, layout.of(tgt, [5, 5, 5]))
    before = original(*args)
    after = to_torch_modules(original)(*args)
    torch.testing.assert_close(before, after)


def test_errors_name_the_flags() -> None:
    with pytest.raises(ValueError) as err:
        TranslationModule(arch="huge", num_tokens=1, label_smoothing=1.5, beam_size=0)  # type: ignore[arg-type]
    for flag in ("--model.arch", "--model.num_tokens", "--model.label_smoothing", "--model.beam_size"):
        assert flag in str(err.value)


class ValidationWeights(pl.Callback):
    """Copies the weights the model is validated with (after the recipe has put its masks in place)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


RECIPES = {"dense": lambda: None, "step": lambda: STEPCallback(switch=1), "srste": lambda: SRSTECallback(),
           "asp": lambda: ASPCallback(prune_at=1)}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fit_under_recipe_logs_loss_and_bleu(tmp_path: Path, corpus: Path, recipe: str) -> None:
    dm = _dm(corpus)
    model = _model(dm, bleu_max_batches=1)
    callback = RECIPES[recipe]()
    seen = ValidationWeights()
    log = MetricsLog()
    trainer = tiny_trainer(tmp_path, [c for c in (callback, seen) if c is not None], max_steps=3,
                           val_check_interval=3, limit_val_batches=2, check_val_every_n_epoch=None, logger=log)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 3
    assert_train_loss_per_step(log, 3)
    for key in ("train/loss", "val/loss", "val/nll", "val/bleu"):
        assert torch.isfinite(metrics[key]), key
    assert log.hparams["val/bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert float(metrics["val/nll"]) != float(metrics["val/loss"])  # val/loss is label-smoothed, val/nll is not
    if callback is None:
        return
    assert {t.name for t in callback.targets} == expected_targets()
    for target in callback.targets:  # validation (and beam search) saw the N:M model
        check_nm_sparse(seen.weights[target.name], 2, 4, target.layout, name=target.name)
    embedding = seen.weights["model.encoder_frontend.embed.weight"]
    assert (embedding != 0).all()  # the embedding / output projection stays dense


def test_batch_layout_is_fairseq2s_layout() -> None:
    from step_lightning._fairseq2 import batch_layout, import_fairseq2

    reference = import_fairseq2("fairseq2.nn").BatchLayout.of
    for lens, width in (([7, 5, 7], 7), ([3], 3), ([4, 4], 5), ([1, 2, 3, 9], 9)):
        seqs = torch.zeros(len(lens), width, dtype=torch.long)
        expected, built = reference(seqs, lens), batch_layout(seqs, lens)
        for field in ("width", "seq_begin_indices", "seq_lens", "min_seq_len", "max_seq_len", "padded", "packed"):
            assert getattr(built, field) == getattr(expected, field), field
        for field in ("seq_begin_indices_pt", "seq_lens_pt", "position_indices"):
            a, b = getattr(built, field), getattr(expected, field)
            assert a.dtype == b.dtype and torch.equal(a, b), field
    with pytest.raises(ValueError, match=r"every length must be in \[1, 3\]"):
        batch_layout(torch.zeros(2, 3), [4, 1])


def test_predict_writes_one_translation_per_input_line_in_order(tmp_path: Path, corpus: Path) -> None:
    lines = ["w1 w2 w3", "", "w7", "w3 w3 w9 w11 w12 w13", "w5 w6", "w8 w8"]
    source = tmp_path / "news.de"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = _dm(corpus, predict_file=str(source), eval_max_tokens=48)  # several batches, sorted by length
    output = tmp_path / "out" / "news.en"
    model = _model(dm, predict_output=str(output))
    trainer = tiny_trainer(tmp_path, [])
    batches = trainer.predict(model, dm)  # real beam search
    assert sum(len(b) for b in batches) == len(lines) and len(batches) > 1
    assert output.read_text(encoding="utf-8").count("\n") == len(lines)

    # A "translation" that decodes the source shows where each sentence lands: line i must be input line i.
    def echo(source: torch.Tensor, lens: list[int], tokenizer: Any, tgt_lang: str) -> list[str]:
        decoder = tokenizer.create_decoder(skip_special_tokens=True)
        return [str(decoder(row[:n])) for row, n in zip(source, lens, strict=True)]

    model.translate = echo  # type: ignore[method-assign]
    trainer.predict(model, dm)
    assert output.read_text(encoding="utf-8").split("\n") == [*lines, ""]
    with pytest.raises(FileNotFoundError, match=r"--data\.predict_file"):
        _dm(corpus, predict_file=str(tmp_path / "missing.de")).prepare_data()


def test_loss_covers_the_sentence_and_its_end_not_the_given_prompt(corpus: Path) -> None:
    dm = _dm(corpus)
    dm.setup("fit")
    prompt = dm.tokenizer.create_encoder(task="translation", lang="en", mode="target").prefix_indices
    assert len(prompt) == TARGET_PROMPT
    model = _model(dm)
    batch = next(iter(dm.train_dataloader()))
    _, targets = model(batch)
    assert int((targets != 0).sum()) == model.num_target_tokens(batch)
    assert (targets[:, 0] == 0).all() and not (targets == prompt[1]).any()  # the language symbol is given
    ends = torch.tensor(batch["target_lens"]) - 2  # target position of each sentence's </s>
    assert (targets.gather(1, ends.unsqueeze(1)) == dm.tokenizer.vocab_info.eos_idx).all()


def test_beam_search_produces_text(corpus: Path) -> None:
    dm = _dm(corpus)
    dm.prepare_data()
    dm.setup("fit")
    model = _model(dm).eval()
    batch = next(iter(dm.val_dataloader()))
    hyps = model.translate(batch["source"], batch["source_lens"], dm.tokenizer, "en")
    assert len(hyps) == len(batch["target_text"]) and all(isinstance(h, str) for h in hyps)
    assert any(h.strip() for h in hyps)


class SeenBatches(pl.Callback):
    def __init__(self) -> None:
        self.texts: list[tuple[int, tuple[str, ...]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.texts.append((trainer.global_step, tuple(batch["target_text"])))


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end", "limited_epoch_end", "epoch_end_hook"])
def test_resume_sees_the_same_batches_and_ends_with_the_same_weights(tmp_path: Path, corpus: Path,
                                                                      where: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    epoch_len = sum(1 for _ in _dm(corpus).build_pipeline("train", True, 0))
    # limited: `limit_train_batches` ends each epoch early; the next epoch must still be a new shuffle
    limit = 4 if where == "limited_epoch_end" else 1.0
    save_at = {"mid_epoch": 3, "epoch_end": epoch_len, "limited_epoch_end": 4, "epoch_end_hook": epoch_len}[where]
    total = epoch_len + 3

    def run(out: Path, ckpt: str | None) -> tuple[list[Any], TranslationModule]:
        pl.seed_everything(0)
        dm = _dm(corpus)
        model = _model(dm, bleu_every_n_val=0)
        seen = SeenBatches()
        if where == "epoch_end_hook":  # saved in on_train_epoch_end: Lightning restores no loader state
            saver = ModelCheckpoint(dirpath=out, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1,
                                    filename="{step}")
        else:
            saver = ModelCheckpoint(dirpath=out, every_n_train_steps=save_at, save_top_k=-1, filename="{step}")
        trainer = tiny_trainer(out, [seen, STEPCallback(switch=2), saver], max_steps=total, max_epochs=None,
                               limit_val_batches=0, limit_train_batches=limit, enable_checkpointing=True)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return seen.texts, model

    full, uninterrupted = run(tmp_path / "a", None)
    if where == "limited_epoch_end":  # every epoch a different order
        assert full[0][1] != full[4][1] != full[8][1]
    resumed_texts, resumed = run(tmp_path / "b", str(tmp_path / "a" / f"step={save_at}.ckpt"))
    assert resumed_texts == full[save_at:]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_copy_task_reaches_a_high_bleu(tmp_path: Path) -> None:
    """A short overfit of the upper-casing task: beam search must get most words right (BLEU 70-90 over seeds
    0-2 at 400 steps; 200 steps gave 31-61)."""
    root = make_parallel(tmp_path / "copy", n_train=300, n_eval=16)
    pl.seed_everything(0)
    dm = _dm(root, max_tokens=480)
    model = _model(dm, label_smoothing=0.0, max_gen_len=(4.0, 10),  # uppercase targets take more pieces
                   optimizer=lambda p: StepAdamW(p, lr=5e-3, betas=(0.9, 0.98)))
    trainer = tiny_trainer(tmp_path, [], max_steps=400, max_epochs=None, limit_val_batches=2, val_check_interval=None,
                           check_val_every_n_epoch=100)
    trainer.fit(model, dm)
    trainer.test(model, dm)
    assert float(trainer.callback_metrics["test/bleu"]) > 50


# ---- two CPU processes (gloo) through Lightning's DDP launcher ------------------------------------------------
DDP_SCRIPT = '''
import json, sys
from pathlib import Path
import lightning.pytorch as pl
from step_lightning import StepAdamW, STEPCallback
from step_lightning.data.wmt import WMTDataModule
from step_lightning.models.translation import TranslationModule

corpus, out = Path(sys.argv[1]), Path(sys.argv[2])


class Report(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.batches += 1

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"batches": self.batches, "step": trainer.global_step, "metrics": metrics}))


pl.seed_everything(0)
# eval_max_tokens: the whole dev set fits one batch; each rank must still get one (DDP syncs on its first batch)
dm = WMTDataModule(data_dir=str(corpus), vocab_size=48, max_tokens=96, max_seq_len=24, num_workers=1,
                   eval_max_tokens=480)
model = TranslationModule(arch="tiny", num_tokens=dm.num_tokens, dropout_p=0.0, beam_size=2,
                          optimizer=lambda p: StepAdamW(p, lr=3e-3))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=[STEPCallback(switch=1), Report()])
trainer.fit(model, dm)
'''


@pytest.mark.slow
def test_ddp_ranks_run_the_same_steps_and_agree_on_bleu(tmp_path: Path, corpus: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    # The corpus fixture trained SentencePiece, before the ranks start.
    script = tmp_path / "ddp_translation.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(corpus), str(tmp_path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is a child of this process group
        log, _ = proc.communicate()
        pytest.fail("DDP run timed out (a rank waiting on another?):\n" + log.decode()[-3000:])
    assert proc.returncode == 0, log.decode()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["step"] > 1
    assert ranks[0]["metrics"]["val/bleu"] == ranks[1]["metrics"]["val/bleu"]
    assert ranks[0]["metrics"]["val/loss"] == pytest.approx(ranks[1]["metrics"]["val/loss"])
    assert "ranks agree" in log.decode()


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_training_step_makes_no_host_sync(corpus: Path) -> None:
    dm = _dm(corpus)
    dm.setup("fit")
    model = _model(dm).cuda()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in next(iter(dm.train_dataloader())).items()}

    def step() -> None:
        logits, targets = model(batch)
        (model.loss(logits, targets, 0.1) / model.num_target_tokens(batch)).backward()

    step()  # lazy initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_bf16_fit_under_step(tmp_path: Path, corpus: Path) -> None:
    dm = _dm(corpus)
    model = _model(dm, bleu_max_batches=1)
    callback, seen = STEPCallback(switch=2), ValidationWeights()
    trainer = tiny_trainer(tmp_path, [callback, seen], accelerator="cuda", precision="bf16-mixed", max_steps=4,
                           val_check_interval=4, limit_val_batches=2, check_val_every_n_epoch=None,
                           deterministic=False)
    trainer.fit(model, dm)
    assert callback.switch_step == 2 and torch.isfinite(trainer.callback_metrics["val/bleu"])
    for target in callback.targets:
        check_nm_sparse(seen.weights[target.name], 2, 4, target.layout, name=target.name)
