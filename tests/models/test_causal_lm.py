"""CausalLM: token-weighted perplexity, samples in TensorBoard, and every recipe masks GPT-2 / Llama projections."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from step_lightning import ASPCallback, SRSTECallback, StepAdamW, STEPCallback, check_nm_sparse
from step_lightning.data.wikitext import WikiTextDataModule
from step_lightning.models.causal_lm import CausalLM, TokenMeanLoss, TokenPerplexity
from tests.conftest import MetricsLog, assert_train_loss_per_step, tiny_trainer
from tests.hf_tiny_lm import build_gpt2, build_llama, write_wikitext

RECIPES: dict[str, Any] = {
    "dense": lambda: None,
    "step": lambda: STEPCallback(switch=1),
    "srste": lambda: SRSTECallback(),
    "asp": lambda: ASPCallback(prune_at=1),
}
GPT2_MASKED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LLAMA_MASKED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 16


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lms")
    raw = root / "raw"
    write_wikitext(raw)
    return {"gpt2": build_gpt2(root / "gpt2"), "llama": build_llama(root / "llama"), "raw": raw,
            "cache": root / "cache"}


def _data(dirs: dict[str, Path], model: str = "gpt2", **kwargs: Any) -> WikiTextDataModule:
    kwargs = {"block_size": BLOCK, "batch_size": 4, "eval_batch_size": 3, **kwargs}
    return WikiTextDataModule(model_name_or_path=str(dirs[model]), data_dir=str(dirs["raw"]),
                              cache_dir=str(dirs["cache"]), **kwargs)


class ValidationWeights(pl.Callback):
    """Copies the weights the model is validated with (after every recipe has put its masks in place)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _assert_dense(weight: torch.Tensor, name: str) -> None:
    # A 2:4-masked weight is half zeros; a dense one has none but for a padding row of an embedding.
    assert float((weight == 0).float().mean()) < 0.1, f"{name} should stay dense"


def _samples(log_dir: str) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    events.Reload()
    if "val/sample/text_summary" not in events.Tags()["tensors"]:
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("val/sample/text_summary")]


def _fit(tmp_path: Path, dirs: dict[str, Path], model_name: str, recipe: Any, **trainer_kwargs: Any
         ) -> tuple[pl.Trainer, CausalLM, ValidationWeights]:
    # A small lr: STEP switching after one step freezes a one-sample second moment.
    model = CausalLM(str(dirs[model_name]), optimizer=lambda p: StepAdamW(p, lr=1e-4), max_new_tokens=8)
    seen = ValidationWeights()
    callbacks = [c for c in (recipe, seen) if c is not None]
    kwargs: dict[str, Any] = dict(max_steps=2, limit_val_batches=2, val_check_interval=2,
                                  logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer = tiny_trainer(tmp_path, callbacks, **{**kwargs, **trainer_kwargs})
    trainer.fit(model, _data(dirs, model_name))
    return trainer, model, seen


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gpt2_trains_under_recipe(tmp_path: Path, lm_dirs: dict[str, Path], recipe: str) -> None:
    callback = RECIPES[recipe]()
    log = MetricsLog()
    trainer, _, seen = _fit(tmp_path, lm_dirs, "gpt2", callback, num_sanity_val_steps=1,
                            logger=[TensorBoardLogger(tmp_path, name="tb"), log])
    assert trainer.global_step == 2
    assert_train_loss_per_step(log, 2)
    ppl = trainer.callback_metrics["val/ppl"]
    assert torch.isfinite(ppl) and float(ppl) == pytest.approx(math.exp(float(trainer.callback_metrics["val/loss"])))
    samples = _samples(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert [step for step, _ in samples] == [2]  # once per validation, none for the sanity check
    assert samples[0][1].startswith("The")
    assert (Path(trainer.logger.log_dir) / "val_samples.md").read_text() == f"## step 2\n\n{samples[0][1]}\n\n"  # type: ignore[union-attr]
    if callback is None:
        return
    names = sorted(t.name for t in callback.targets)
    assert names == sorted(f"model.transformer.h.{i}.{w}" for i in range(2) for w in GPT2_MASKED)
    assert {t.layout for t in callback.targets} == {"conv1d_hf"}
    for target in callback.targets:  # validation (and the sample) saw the N:M model
        check_nm_sparse(seen.weights[target.name], 2, 4, "conv1d_hf", name=target.name)
    for dense in ("model.transformer.wte.weight", "model.transformer.wpe.weight"):  # lm_head is tied to wte
        _assert_dense(seen.weights[dense], dense)
    if recipe == "step":
        assert callback.switch_step == 1


def test_llama_projections_are_masked(tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    callback = STEPCallback(switch=1)
    trainer, _, seen = _fit(tmp_path, lm_dirs, "llama", callback)
    assert torch.isfinite(trainer.callback_metrics["val/ppl"])
    names = sorted(t.name for t in callback.targets)
    assert names == sorted(f"model.model.layers.{i}.{block}.{p}.weight" for i in range(2) for p in LLAMA_MASKED
                           for block in (("self_attn",) if p in LLAMA_MASKED[:4] else ("mlp",)))
    assert {t.layout for t in callback.targets} == {"linear"}
    for target in callback.targets:
        check_nm_sparse(seen.weights[target.name], 2, 4, "linear", name=target.name)
    for dense in ("model.model.embed_tokens.weight", "model.lm_head.weight"):
        _assert_dense(seen.weights[dense], dense)


def test_perplexity_is_exp_of_the_token_weighted_mean_loss(tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    model = CausalLM(str(lm_dirs["gpt2"]))
    dm = _data(lm_dirs, eval_batch_size=4)  # batches of unequal size: a mean of batch means would differ
    trainer = tiny_trainer(tmp_path, [])
    val = trainer.validate(model, dm, verbose=False)[0]
    test = trainer.test(model, dm, verbose=False)[0]
    assert len(dm.datasets["valid"]) % 4 != 0
    model.eval()

    for split, result, prefix in (("valid", val, "val"), ("test", test, "test")):
        blocks = torch.from_numpy(dm.datasets[split].blocks.astype("int64"))
        with torch.no_grad():
            logits = model.model(blocks).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                blocks[:, 1:].reshape(-1), reduction="sum")
        mean = float(nll) / blocks[:, 1:].numel()
        assert result[f"{prefix}/loss"] == pytest.approx(mean, rel=1e-5)
        assert result[f"{prefix}/ppl"] == pytest.approx(math.exp(mean), rel=1e-5)


def test_token_weighted_metrics() -> None:
    loss, ppl = TokenMeanLoss(), TokenPerplexity()
    for metric in (loss, ppl):
        metric.update(torch.tensor(1.0), torch.tensor(3))
        metric.update(torch.tensor(2.0), 1)
    assert float(loss.compute()) == pytest.approx(1.25) and float(ppl.compute()) == pytest.approx(math.exp(1.25))
    loss.update(torch.tensor(float("nan")), 5)
    assert math.isnan(float(loss.compute()))  # not dropped


def test_sample_is_greedy_and_leaves_the_rng_alone(lm_dirs: dict[str, Path]) -> None:
    model = CausalLM(str(lm_dirs["gpt2"]), prompt="the cat", max_new_tokens=6)
    model.train()
    state = torch.get_rng_state()
    first = model.generate_sample()
    assert torch.equal(state, torch.get_rng_state())
    assert model.model.training  # put back in the mode it was in
    assert first == model.generate_sample() and first.startswith("the cat") and len(first) > len("the cat")


def test_samples_go_to_the_run_folder_with_any_logger_and_none_when_disabled(tmp_path: Path,
                                                                            lm_dirs: dict[str, Path]) -> None:
    calls: list[str] = []
    model = CausalLM(str(lm_dirs["gpt2"]), max_new_tokens=2)
    model.generate_sample = lambda *a, **k: calls.append("generated") or "x"  # type: ignore[method-assign]
    logger = CSVLogger(tmp_path)
    trainer = tiny_trainer(tmp_path, [], max_steps=2, limit_val_batches=1, val_check_interval=1, logger=logger)
    trainer.fit(model, _data(lm_dirs))
    assert calls == ["generated", "generated"] and "val/ppl" in trainer.callback_metrics
    assert (Path(logger.log_dir) / "val_samples.md").read_text() == "## step 1\n\nx\n\n## step 2\n\nx\n\n"
    calls.clear()

    off = CausalLM(str(lm_dirs["gpt2"]), generate_every_n_val=0)
    off.generate_sample = lambda *a, **k: calls.append("generated") or "x"  # type: ignore[method-assign]
    logger = TensorBoardLogger(tmp_path, name="off")
    tiny_trainer(tmp_path, [], max_steps=1, limit_val_batches=1, val_check_interval=1, logger=logger).fit(
        off, _data(lm_dirs))
    assert calls == [] and _samples(logger.log_dir) == [] and not (Path(logger.log_dir) / "val_samples.md").exists()


def test_default_optimizer_and_parameter_groups(lm_dirs: dict[str, Path]) -> None:
    model = CausalLM(str(lm_dirs["gpt2"]))
    opt = model.configure_optimizers()
    assert isinstance(opt, StepAdamW)
    decay, plain = opt.param_groups
    assert decay["lr"] == 5e-5 and decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.model.parameters())  # the tied LM head counted once


def test_from_scratch_reinitialises(lm_dirs: dict[str, Path]) -> None:
    torch.manual_seed(1)
    scratch = CausalLM(str(lm_dirs["gpt2"]), pretrained=False)
    pretrained = CausalLM(str(lm_dirs["gpt2"]))
    name = "transformer.h.0.attn.c_attn.weight"
    assert scratch.model.state_dict()[name].shape == pretrained.model.state_dict()[name].shape
    assert not torch.equal(scratch.model.state_dict()[name], pretrained.model.state_dict()[name])


def test_checkpoint_round_trip_keeps_the_tied_head(tmp_path: Path, lm_dirs: dict[str, Path]) -> None:
    trainer, model, _ = _fit(tmp_path, lm_dirs, "gpt2", None, max_steps=1, limit_val_batches=0)
    path = tmp_path / "last.ckpt"
    model.validation_runs = 5  # how many validations ran, for `generate_every_n_val` after a resume
    trainer.save_checkpoint(path)
    loaded = CausalLM.load_from_checkpoint(path)
    assert loaded.validation_runs == 5
    for name, value in model.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        CausalLM(str(tmp_path), generate_every_n_val=-1, prompt="", max_new_tokens=0)
    for expected in ("`--model.generate_every_n_val` must be an integer >= 0, got -1",
                     "`--model.prompt` must be a non-empty string, got ''",
                     "`--model.max_new_tokens` must be an integer >= 1, got 0"):
        assert expected in str(err.value)
    with pytest.raises(RuntimeError, match=r"cannot load a causal LM from `--model.model_name_or_path`="):
        CausalLM(str(tmp_path / "nowhere"))
