"""Each recipe end to end with a real CPU Trainer on a tiny model."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from step_lightning import ASPCallback, SRSTECallback, StepAdamW, STEPCallback, is_nm_sparse, nm_mask
from step_lightning.optim import WarmupDecayLR
from tests.conftest import TARGETS, TinyModule, tiny_loaders, tiny_trainer


def layout(name: str) -> str:
    return "conv" if "conv" in name else "linear"


def all_nm(tensors: dict[str, torch.Tensor]) -> bool:
    return all(is_nm_sparse(tensors[n], 2, 4, layout(n)) for n in TARGETS)


def fit(tmp_path: Path, callback: pl.Callback, optimizer: str = "step_adamw", **kwargs: Any) -> TinyModule:
    pl.seed_everything(0)
    model = TinyModule(optimizer)
    model.record_train_weights = True
    train, val = tiny_loaders()
    kwargs.setdefault("val_check_interval", 4)
    kwargs.setdefault("check_val_every_n_epoch", None)
    tiny_trainer(tmp_path, [callback], **kwargs).fit(model, train, val)
    return model


def test_step_fixed_switch(tmp_path: Path) -> None:
    cb = STEPCallback(switch=5)
    model = fit(tmp_path, cb, max_steps=12)
    assert cb.phase == "mask_learning" and cb.switch_step == 5 and cb.optimizer_steps == 12
    # Training forward: dense for steps 1..5, N:M from step 6 on.
    assert [all_nm(w) for w in model.train_weights] == [False] * 5 + [True] * 7
    # Validation after steps 4, 8, 12: always the N:M model (before the switch: magnitude masks).
    assert model.val_nm == [True, True, True]
    opt = model.trainer.optimizers[0]
    params = dict(model.named_parameters())
    assert all(opt.is_frozen(params[n]) for n in TARGETS)
    assert not any(opt.is_frozen(p) for n, p in params.items() if n not in TARGETS)
    assert opt.state[params[TARGETS[0]]]["frozen_step"] == 5
    # The trained dense shadow is not N:M; the model's N:M form is.
    assert not all_nm(params)
    assert all_nm(cb.masked_state_dict(model))


def test_step_autoswitch_threshold_and_logging(tmp_path: Path) -> None:
    # A relative threshold of 10 is always met: the switch comes right after t_min.
    cb = STEPCallback(switch="auto", autoswitch_statistic="relative", autoswitch_threshold=10.0,
                      autoswitch_window=2, autoswitch_t_min=3, autoswitch_t_max=0.9, per_layer_log_interval=1,
                      autoswitch_check_every=1)
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, cb, max_steps=8, logger=logger)
    assert cb.switch_step == 4 and cb.autoswitch is not None and cb.autoswitch.switched_by == "threshold"
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ["sparsity/phase", "sparsity/density", "sparsity/flip_rate", "sparsity/autoswitch_stat",
                "sparsity/autoswitch_threshold", "sparsity/autoswitch_abs_dv", "sparsity/autoswitch_rel_dv",
                "sparsity/autoswitch_log_v_hat", "sparsity/autoswitch_window_mean",
                "sparsity/switch_step", "sparsity/layers/net.fc1.weight/flip_rate",
                "sparsity/layers/net.conv.weight/kept"]:
        assert key in header, key


class WarmupModule(TinyModule):
    """TinyModule with a WarmupDecayLR warm-up of ``warmup`` optimizer steps."""

    def __init__(self, warmup: int) -> None:
        super().__init__()
        self.warmup = warmup

    def configure_optimizers(self) -> Any:
        optimizer = StepAdamW(self.parameters(), lr=self.lr)
        scheduler = WarmupDecayLR(optimizer, warmup=self.warmup, decay="constant")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize(("warmup", "t_min", "switch_step"), [(6, None, 7), (1, None, 3), (6, 2, 3)])
def test_step_autoswitch_waits_for_the_end_of_the_warmup(tmp_path: Path, warmup: int, t_min: int | None,
                                                         switch_step: int) -> None:
    # A relative threshold of 10 is always met: the switch comes right after t_min, which defaults to the
    # later of the window (2) and the end of the learning-rate warm-up; an explicit t_min wins.
    cb = STEPCallback(switch="auto", autoswitch_statistic="relative", autoswitch_threshold=10.0,
                      autoswitch_window=2, autoswitch_t_min=t_min, autoswitch_t_max=0.9, autoswitch_check_every=1)
    train, _ = tiny_loaders()
    tiny_trainer(tmp_path, [cb], max_steps=10).fit(WarmupModule(warmup), train)
    assert cb.switch_step == switch_step and cb.autoswitch.switched_by == "threshold"


def test_step_autoswitch_t_max_warns(tmp_path: Path) -> None:
    cb = STEPCallback(switch="auto", autoswitch_window=2, autoswitch_t_max=3)
    with pytest.warns(UserWarning, match=r"reached autoswitch_t_max=3 without the layer_rise statistic"):
        fit(tmp_path, cb, max_steps=6)
    assert cb.switch_step == 4 and cb.autoswitch.switched_by == "t_max"


def test_step_switch_as_fraction(tmp_path: Path) -> None:
    cb = STEPCallback(switch=0.25)
    fit(tmp_path, cb, max_steps=12)
    assert cb.switch_step == 3


def test_the_parser_keeps_whole_steps_as_ints_and_fractions_as_floats(tmp_path: Path) -> None:
    # The step-valued arguments are `PositiveInt | OpenUnitInterval`-style unions: a YAML `4000` stays a step.
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(STEPCallback, "recipe")
    parsed = parser.parse_args(["--recipe.switch=5", "--recipe.autoswitch_t_min=4000", "--recipe.autoswitch_t_max=0.5"])
    assert (parsed.recipe.switch, parsed.recipe.autoswitch_t_min) == (5, 4000)
    assert all(isinstance(v, int) for v in (parsed.recipe.switch, parsed.recipe.autoswitch_t_min))
    assert parsed.recipe.autoswitch_t_max == 0.5
    for bad in ("--recipe.switch=1.5", "--recipe.switch=0", "--recipe.sr_ste_decay=-1"):
        with pytest.raises(jsonargparse.ArgumentError):
            parser.parse_args([bad])
    cb = STEPCallback(**{k: v for k, v in vars(parsed.recipe).items() if k in ("switch", "autoswitch_t_min")})
    fit(tmp_path, cb, max_steps=8)
    assert cb.switch_step == 5


def test_srste_masks_from_the_first_step(tmp_path: Path) -> None:
    cb = SRSTECallback(sr_ste_decay=2e-4)
    model = fit(tmp_path, cb, optimizer="sgd", max_steps=6)
    assert all(all_nm(w) for w in model.train_weights)
    assert model.val_nm == [True]
    assert all_nm(cb.masked_state_dict(model))


class GradCapture(pl.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.grads:
            params = dict(pl_module.named_parameters())
            self.grads = {n: params[n].grad.clone() for n in TARGETS}
            self.weights = {n: params[n].detach().clone() for n in TARGETS}


@pytest.mark.parametrize("recipe", ["srste", "step"])
def test_sr_ste_term_is_added_to_the_straight_through_gradient(tmp_path: Path, recipe: str) -> None:
    captured = {}
    for decay in (0.0, 0.5):
        cb = SRSTECallback(sr_ste_decay=decay) if recipe == "srste" else STEPCallback(switch=1, sr_ste_decay=decay)
        capture = GradCapture()
        if recipe == "step":  # capture the first step after the switch
            capture.grads = {"skip": torch.zeros(())}
            capture.on_train_batch_end = lambda *a, c=capture: c.grads.pop("skip", None)  # type: ignore[method-assign]
        pl.seed_everything(0)
        model = TinyModule("sgd" if recipe == "srste" else "step_adamw")
        train, _ = tiny_loaders()
        tiny_trainer(tmp_path, [cb, capture], max_steps=2).fit(model, train)
        captured[decay] = capture
    plain, refined = captured[0.0], captured[0.5]
    for n in TARGETS:
        w = refined.weights[n]  # dense weights (restored before the step)
        assert torch.equal(w, plain.weights[n])
        pruned = w - w * _mask_of(w, n)
        torch.testing.assert_close(refined.grads[n] - plain.grads[n], 0.5 * pruned)


def _mask_of(w: torch.Tensor, name: str) -> torch.Tensor:
    from step_lightning import nm_mask

    return nm_mask(w, 2, 4, layout(name))


def test_asp_prunes_once_and_keeps_the_mask(tmp_path: Path) -> None:
    cb = ASPCallback(prune_at=4)
    model = fit(tmp_path, cb, optimizer="adamw", max_steps=10)
    assert [all_nm(w) for w in model.train_weights] == [False] * 4 + [True] * 6
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert all_nm(params)  # the weights themselves stay N:M after every step
    assert model.val_nm == [True, True]
    # The mask never changed: the zeros after the last step are where the first pruned forward had them.
    first = model.train_weights[4]
    for n in TARGETS:
        assert torch.equal(params[n] == 0, first[n] == 0)


def test_asp_prune_at_zero_and_fraction(tmp_path: Path) -> None:
    model = fit(tmp_path, ASPCallback(prune_at=0), optimizer="adamw", max_steps=3)
    assert all(all_nm(w) for w in model.train_weights)
    cb = ASPCallback(prune_at=0.5)
    fit(tmp_path, cb, optimizer="adamw", max_steps=8)
    assert cb.prune_step == 4


def test_asp_gradient_clipping_sees_the_masked_gradients(tmp_path: Path) -> None:
    # Lightning clips after `on_before_optimizer_step`, where ASP zeroes the pruned gradients: the clipping norm
    # is that of the masked gradients, as in apex (which masks inside the step), not of the dense ones.
    class Gradients(pl.Callback):
        def __init__(self) -> None:
            self.raw: list[dict[str, torch.Tensor]] = []
            self.stepped: list[dict[str, torch.Tensor]] = []

        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.raw.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.stepped.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})  # what the step used

    cb, grads, clip = ASPCallback(prune_at=0), Gradients(), 1e-2
    train, _ = tiny_loaders()
    tiny_trainer(tmp_path, [cb, grads], max_steps=3, gradient_clip_val=clip).fit(TinyModule("adamw"), train)
    masks = dict(zip(cb.masked_weights.names, cb.masked_weights.masks, strict=True))
    for raw, stepped in zip(grads.raw, grads.stepped, strict=True):
        masked = {n: g * masks[n] if n in masks else g for n, g in raw.items()}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in masked.values()]))
        dense_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()]))
        assert clip < norm < 0.95 * dense_norm  # clipping is active, and the two norms differ
        for n, g in masked.items():
            torch.testing.assert_close(stepped[n], g * (clip / (norm + 1e-6)), msg=n)


def test_gradient_accumulation_keeps_the_mask_across_micro_batches(tmp_path: Path) -> None:
    cb = STEPCallback(switch=2)
    model = fit(tmp_path, cb, max_steps=5, accumulate_grad_batches=2)
    assert cb.optimizer_steps == 5 and cb.switch_step == 2
    seen = model.train_weights
    assert len(seen) == 10
    # Micro-batches of one optimizer step see identical weights; after the switch they are N:M.
    for a, b in zip(seen[0::2], seen[1::2], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in TARGETS)
    assert [all_nm(w) for w in seen[0::2]] == [False, False, True, True, True]


def test_bf16_mixed_precision(tmp_path: Path) -> None:
    cb = STEPCallback(switch=3)
    model = fit(tmp_path, cb, max_steps=6, precision="bf16-mixed")
    assert cb.switch_step == 3 and model.val_nm[-1]


def test_fp16_overflow_steps_are_not_counted(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    class OverflowAtStep2(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.trainer.global_step == 2 else loss

    cb = STEPCallback(switch="auto", autoswitch_window=2, autoswitch_t_max=100, autoswitch_check_every=1,
                      autoswitch_statistic="log_drift", autoswitch_threshold=1e-30)  # observes every step
    train, _ = tiny_loaders()
    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = tiny_trainer(tmp_path, [cb], max_steps=6, plugins=[fp16])
    trainer.fit(OverflowAtStep2(), train)
    assert trainer.global_step == 6  # Lightning counts the skipped step ...
    assert cb.optimizer_steps == 5 and cb.autoswitch.t == 5  # ... the recipe and AutoSwitch do not


@pytest.mark.slow
def test_torch_compiled_model_sees_the_masked_weights(tmp_path: Path) -> None:
    cb = STEPCallback(switch=2)
    pl.seed_everything(0)
    model = TinyModule()
    model.net = torch.compile(model.net, backend="aot_eager")
    train, val = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [cb], max_steps=6)
    trainer.fit(model, train)
    preds = torch.cat(trainer.predict(model, val))
    eager = TinyModule()
    eager.net.load_state_dict({k.removeprefix("net._orig_mod."): v for k, v in cb.masked_state_dict(model).items()})
    eager.eval()
    expected = torch.cat([eager(x) for x, _ in val])
    torch.testing.assert_close(preds, expected)


def test_validate_and_predict_outside_fit_use_the_nm_model(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TinyModule()
    _, val = tiny_loaders()
    cb = STEPCallback()
    trainer = tiny_trainer(tmp_path, [cb])
    trainer.validate(model, val)
    assert model.val_nm == [True]
    preds = torch.cat(trainer.predict(model, val))
    masked = TinyModule()
    masked.load_state_dict(cb.masked_state_dict(model))
    masked.eval()
    torch.testing.assert_close(preds, torch.cat([masked(x) for x, _ in val]))
    # Evaluation leaves the dense weights as they were.
    assert not all_nm(dict(model.named_parameters()))


@pytest.mark.parametrize(("recipe", "stage"), [("srste", "test"), ("srste", "validate"), ("srste", "predict"),
                                             ("step", "test"), ("asp", "test")])
def test_evaluation_from_a_checkpoint_uses_that_checkpoints_masks(tmp_path: Path, recipe: str, stage: str) -> None:
    # "best" is the checkpoint of step 4. SR-STE with mask_update_interval=3: its masks are not a function of
    # its weights, so evaluating it uses the masks stored with it (those its validation score measured). STEP
    # (switch at 6) and ASP (prune at 6) stored none at step 4: magnitude masks of its weights, as validation
    # used then. Never the masks left in memory at the end of fit.
    class Evaluated(TinyModule):
        def __init__(self) -> None:
            super().__init__("adamw" if recipe != "step" else "step_adamw", lr=5e-2)
            self.evaluated: list[dict[str, torch.Tensor]] = []

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/order", float(self.trainer.global_step))  # the first validation is "best"
            self._record(batch_idx)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self._record(batch_idx)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self._record(batch_idx)
            return super().predict_step(batch, batch_idx)

        def _record(self, batch_idx: int) -> None:
            if batch_idx == 0:
                self.evaluated.append({n: p.detach().clone() for n, p in self.named_parameters() if n in TARGETS})

    pl.seed_everything(0)
    model = Evaluated()
    train, val = tiny_loaders()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/order", mode="min", save_top_k=1)
    cb = {"srste": lambda: SRSTECallback(mask_update_interval=3), "step": lambda: STEPCallback(switch=6,
          mask_update_interval=3), "asp": lambda: ASPCallback(prune_at=6)}[recipe]()
    trainer = tiny_trainer(tmp_path, [cb, best], max_steps=12, val_check_interval=4, check_val_every_n_epoch=None,
                           enable_checkpointing=True)
    trainer.fit(model, train, val)
    assert best.best_model_path.endswith("step=4.ckpt")
    ckpt = torch.load(best.best_model_path, weights_only=False)
    saved = ckpt["callbacks"][cb.state_key]["masks"]
    assert (saved is None) == (recipe != "srste")
    weights = {n: ckpt["state_dict"][n] for n in TARGETS}
    expected = saved or {n: nm_mask(w, 2, 4, layout(n)) for n, w in weights.items()}
    end_of_fit = dict(zip(cb.masked_weights.names, cb.masked_weights.masks, strict=True))
    assert any(not torch.equal(expected[n], end_of_fit[n]) for n in TARGETS)  # the masks moved on after step 4
    model.evaluated.clear()
    getattr(trainer, stage)(model, val, ckpt_path="best")
    for n in TARGETS:
        torch.testing.assert_close(model.evaluated[0][n], weights[n] * expected[n], msg=n)


def test_validate_before_fit_then_train(tmp_path: Path) -> None:
    # `trainer.validate` runs under inference mode; the masked-weight buffers it creates are reused by fit.
    pl.seed_everything(0)
    model = TinyModule("adamw")
    train, val = tiny_loaders()
    cb = SRSTECallback()
    trainer = tiny_trainer(tmp_path, [cb], max_steps=3)
    trainer.validate(model, val)
    trainer.fit(model, train)
    assert cb.optimizer_steps == 3


def test_nan_in_the_autoswitch_statistic_is_reported(tmp_path: Path) -> None:
    class NaNAtStep2(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 2 else loss

    cb = STEPCallback(switch="auto", autoswitch_window=2, autoswitch_t_min=0, autoswitch_t_max=100,
                      autoswitch_check_every=1)
    train, _ = tiny_loaders()
    with pytest.warns(UserWarning, match=r"AutoSwitch window holds NaN/inf at optimizer step 3"):
        tiny_trainer(tmp_path, [cb], max_steps=5).fit(NaNAtStep2(), train)
    assert not cb.autoswitch.switched and cb.autoswitch.num_nonfinite >= 1


def test_a_masked_weight_without_gradient_is_reported_after_the_first_step(tmp_path: Path) -> None:
    class UnusedLayer(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.net.unused = torch.nn.Linear(32, 32)  # maskable, never in the forward pass
            self.net.head = self.net._modules.pop("head")  # the head stays the last Linear (never masked)

    cb = STEPCallback(switch=5)
    train, _ = tiny_loaders()
    with pytest.raises(ValueError, match=r"got no gradient in optimizer step 1 \(phase 'precondition'\): "
                                         r"\['net.unused.weight'\].*List them in `exclude`"):
        tiny_trainer(tmp_path, [cb], max_steps=6).fit(UnusedLayer(), train)
    assert cb.optimizer_steps == 1  # not at the switch, four steps later


def test_the_switch_refuses_to_freeze_a_non_finite_second_moment(tmp_path: Path) -> None:
    class NaNAtStep2(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 2 else loss

    cb = STEPCallback(switch=4)
    train, _ = tiny_loaders()
    with pytest.raises(FloatingPointError, match=r"the second moment of net.conv.weight, net.fc1.weight, "
                                                 r"net.fc2.weight holds NaN or inf"):
        tiny_trainer(tmp_path, [cb], max_steps=6).fit(NaNAtStep2(), train)
    assert cb.phase == "precondition"


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (lambda: STEPCallback(switch=50), r"`switch`=50 is at or after the run's last optimizer step \(6\): this run "
                                          r"stays dense"),
        (lambda: STEPCallback(autoswitch_t_max=60), r"`autoswitch_t_max`=60 is at or after the run's last"),
        (lambda: ASPCallback(prune_at=6), r"`prune_at`=6 is at or after the run's last optimizer step \(6\): this run "
                                          r"never prunes"),
    ],
)
def test_switch_beyond_the_run_is_warned(tmp_path: Path, callback: Any, message: str) -> None:
    with pytest.warns(UserWarning, match=message):
        fit(tmp_path, callback(), optimizer="step_adamw", max_steps=6)


# ------------------------------------------------------------------------------------------------
# Errors a user can trigger
# ------------------------------------------------------------------------------------------------
def test_step_with_another_optimizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs the masked weights to be optimized by one step_lightning.StepAdamW.*"
                                         r"got \['AdamW'\]"):
        fit(tmp_path, STEPCallback(), optimizer="adamw", max_steps=1)


def test_two_recipe_callbacks(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, _ = tiny_loaders()
    trainer = tiny_trainer(tmp_path, [STEPCallback(), SRSTECallback()], max_steps=1)
    with pytest.raises(ValueError, match=r"Only one N:M recipe callback per Trainer, got \['SRSTECallback', "
                                         r"'STEPCallback'\]"):
        trainer.fit(TinyModule(), train)


def test_no_maskable_layer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no weight of TinyModule can be masked 2:4 \(include=\['nothing'\]"):
        fit(tmp_path, SRSTECallback(include=["nothing"]), max_steps=1)


def test_fraction_without_run_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`switch`=0.5 is a fraction of the run, but the run has no finite length"):
        fit(tmp_path, STEPCallback(switch=0.5), max_steps=-1, max_epochs=-1, max_time="00:00:00:05")


def test_masked_weight_outside_every_optimizer(tmp_path: Path) -> None:
    class HeadOnly(TinyModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.net.head.parameters())

    train, _ = tiny_loaders()
    with pytest.raises(ValueError, match=r"these masked weights are in no optimizer: \['net.conv.weight'"):
        tiny_trainer(tmp_path, [SRSTECallback()], max_steps=1).fit(HeadOnly(), train)


def test_manual_optimization_is_refused(tmp_path: Path) -> None:
    class Manual(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    train, _ = tiny_loaders()
    with pytest.raises(ValueError, match=r"supports automatic optimization only; Manual.automatic_optimization is"):
        tiny_trainer(tmp_path, [SRSTECallback()], max_steps=1).fit(Manual(), train)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: STEPCallback(n=4, m=4), "need 0 < n < m"),
        (lambda: STEPCallback(switch=0), r"`switch` must be 'auto' or an integer >= 1 or a number in \(0, 1\), got 0"),
        (lambda: STEPCallback(switch=1.5), r"`switch` must be 'auto' or an integer >= 1 or a number in \(0, 1\), "
                                           r"got 1.5"),
        (lambda: STEPCallback(switch=5.0), r"`switch` must be .* got 5.0"),  # a step is an int
        (lambda: STEPCallback(switch="sometimes"), r"`switch` must be 'auto' or .*, got 'sometimes'"),
        (lambda: STEPCallback(autoswitch_t_max=None), r"`autoswitch_t_max` must be an integer >= 1 or a number in "
                                                      r"\(0, 1\), got None"),
        (lambda: STEPCallback(autoswitch_statistic="median"), r"`autoswitch_statistic` must be one of 'layer_rise', "
                                                              r"'log_drift', 'reference', 'relative', got 'median'"),
        (lambda: STEPCallback(autoswitch_threshold=-1.0), r"`autoswitch_threshold` must be a number > 0, got -1.0"),
        (lambda: STEPCallback(autoswitch_window=0), r"`autoswitch_window` must be an integer >= 1 or null, got 0"),
        (lambda: STEPCallback(sr_ste_decay=-1.0), r"`sr_ste_decay` must be a number >= 0"),
        (lambda: SRSTECallback(sr_ste_decay=-2e-4), r"SRSTECallback: `sr_ste_decay` must be a number >= 0"),
        (lambda: SRSTECallback(mask_update_interval=0), r"`mask_update_interval` must be an integer >= 1"),
        (lambda: SRSTECallback(per_layer_log_interval=-1), r"SRSTECallback: `per_layer_log_interval` must be an "
                                                          r"integer >= 0"),
        (lambda: ASPCallback(prune_at=-1), r"`prune_at` must be an integer >= 0 or a number in \(0, 1\), got -1"),
        (lambda: ASPCallback(prune_at=1.5), r"`prune_at` must be .*, got 1.5"),
        (lambda: ASPCallback(n=3, m=2), r"ASPCallback: `n`:`m` = 3:2 is not a valid N:M ratio"),
        (lambda: ASPCallback(m=1), r"`m` must be an integer >= 2, got 1"),
        (lambda: SRSTECallback(include=["("]), r"`include` holds an invalid regular expression"),
    ],
)
def test_bad_constructor_arguments(factory: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_step_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError, match=re.compile(r"`switch`.*; `sr_ste_decay`.*; `autoswitch_statistic`.*; "
                                                    r"`n`:`m` = 4:4.*; `include` holds an invalid regular")):
        STEPCallback(4, 4, switch=-3, sr_ste_decay=-1.0, autoswitch_statistic="x", include=["("])  # type: ignore


def test_stepadamw_is_driven_by_lr_schedulers_as_a_torch_optimizer(tmp_path: Path) -> None:
    # torch's LRScheduler refuses anything but a torch.optim.Optimizer, and StepAdamW must read the learning rate
    # the scheduler writes into its param groups in every step, before and after the freeze.
    w = torch.nn.Parameter(torch.randn(4, 8))
    opt = StepAdamW([w], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: [1.0, 0.0, 0.0, 1.0, 1.0][k])
    moved = []
    for k in range(4):
        if k == 2:
            opt.freeze_second_moment([w])
        before, w.grad = w.detach().clone(), torch.randn_like(w)
        opt.step()
        scheduler.step()
        moved.append(not torch.equal(before, w))
    assert moved == [True, False, False, True]  # lr = 0 stops both the AdamW and the frozen update

    class Scheduled(TinyModule):  # and through Lightning's optimizer and scheduler handling
        def configure_optimizers(self) -> Any:
            optimizer = StepAdamW(self.parameters(), lr=1e-2)
            return {"optimizer": optimizer, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), "interval": "step"}}

    model, cb = Scheduled(), STEPCallback(switch=2)
    train, _ = tiny_loaders()
    tiny_trainer(tmp_path, [cb], max_steps=4).fit(model, train)
    assert model.optimizers().optimizer is model.trainer.optimizers[0]
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    assert cb.switch_step == 2


class BiasCorrectedFreeze(TinyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return StepAdamW(self.parameters(), lr=self.lr, weight_decay=0.01, frozen_bias_correction=True)


def test_an_early_switch_with_the_raw_second_moment_warns(tmp_path: Path) -> None:
    # The reference frozen denominator uses the raw v = (1 - beta2^T0) v_hat: 1 - 0.999^5 = 0.005, steps ~14x Adam's.
    with pytest.warns(UserWarning, match=r"frozen after step 5 .* 1 - beta2\^T0 = 0\.005 times .* about 14\.2x Adam's"
                                         r".*frozen_bias_correction true"):
        fit(tmp_path / "raw", STEPCallback(switch=5), max_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(validation_step|logging interval|workers).*")
        train, _ = tiny_loaders()
        tiny_trainer(tmp_path / "corrected", [STEPCallback(switch=5)], max_steps=6).fit(BiasCorrectedFreeze(), train)
