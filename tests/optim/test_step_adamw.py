"""StepAdamW: AdamW before any freeze, the STEP update after, state that round-trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from step_lightning import StepAdamW


def model_and_grads(seed: int = 0) -> tuple[nn.Module, list[list[torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    return model, grads


def run(model: nn.Module, opt: torch.optim.Optimizer, grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("implementation", ["foreach", "auto"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bitwise_equal_to_torch_adamw_before_freezing(weight_decay: float, implementation: str) -> None:
    model, grads = model_and_grads()
    twin = copy.deepcopy(model)
    groups = lambda m: [  # noqa: E731
        {"params": list(m[0].parameters()), "lr": 3e-3},
        {"params": list(m[1].parameters()) + list(m[2].parameters()), "weight_decay": 0.0},
    ]
    ours = StepAdamW(groups(model), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay,
                     implementation=implementation)
    # "auto" runs PyTorch's fused AdamW kernel on CPU: bitwise AdamW(fused=True), not foreach (last bits differ).
    ref = torch.optim.AdamW(groups(twin), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay,
                            foreach=implementation == "foreach", fused=implementation != "foreach")
    ours.watch(list(model[0].parameters()))  # measuring the statistic must not change the update
    run(model, ours, grads)
    run(twin, ref, grads)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.state.values(), ref.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_closure_returns_loss() -> None:
    model, _ = model_and_grads()
    opt = StepAdamW(model.parameters())
    x = torch.randn(4, 8)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and not torch.equal(before, model[0].weight)


@pytest.mark.parametrize("bias_corrected", [False, True])
def test_frozen_update_rule(bias_corrected: bool) -> None:
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(4, 8))
    b = nn.Parameter(torch.randn(4))
    lr, (beta1, beta2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.05
    opt = StepAdamW([w, b], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
                    frozen_bias_correction=bias_corrected)
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    v_star = opt.state[w]["exp_avg_sq"].clone()
    m = opt.state[w]["exp_avg"].clone()
    opt.freeze_second_moment([w])
    assert opt.is_frozen(w) and not opt.is_frozen(b)
    assert "exp_avg_sq" not in opt.state[w] and opt.state[w]["frozen_step"] == 3
    assert torch.equal(opt.state[w]["frozen_exp_avg_sq"], v_star)  # the raw v*, not a derived denominator
    b_v_before = opt.state[b]["exp_avg_sq"].clone()

    expected = w.detach().clone()
    for k in (4, 5):
        g = torch.randn_like(w)
        w.grad, b.grad = g.clone(), torch.randn_like(b)
        opt.step()
        m = beta1 * m + (1 - beta1) * g
        denom = ((v_star / (1 - beta2**3)).sqrt() + eps) if bias_corrected else (v_star.sqrt() + eps**0.75)
        expected = expected * (1 - lr * wd) - lr * (m / (1 - beta1**k)) / denom
        torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)
    # The unfrozen parameter keeps updating its second moment.
    assert not torch.equal(opt.state[b]["exp_avg_sq"], b_v_before)


def test_frozen_eps_overrides_reference_default() -> None:
    w = nn.Parameter(torch.zeros(2, 4))
    opt = StepAdamW([w], lr=1.0, weight_decay=0.0, frozen_eps=1e-3)
    w.grad = torch.zeros_like(w)
    opt.step()
    opt.freeze_second_moment([w])
    w.grad = torch.ones_like(w)
    opt.step()  # m = 0.1, m_hat = 0.1 / (1 - 0.9 ** 2), v* = 0: w = -m_hat / 1e-3
    torch.testing.assert_close(w.detach(), torch.full_like(w, -0.1 / 0.19 / 1e-3))


def frozen_run(frozen_eps: float | None = None, bias_correction: bool = False, resume_with: dict | None = None,
               legacy: bool = False) -> nn.Module:
    """Three AdamW steps, freeze the Linear weights, two frozen steps; with ``resume_with``, the last two
    steps run in a new optimizer built with those arguments from the first's state dict."""
    model, grads = model_and_grads()
    opt = StepAdamW(model.parameters(), lr=1e-2, frozen_eps=frozen_eps, frozen_bias_correction=bias_correction)
    run(model, opt, grads[:3])
    opt.freeze_second_moment([model[0].weight, model[2].weight])
    if resume_with is not None:
        state = copy.deepcopy(opt.state_dict())
        if legacy:  # as saved before the raw v* was kept: the reference denominator sqrt(v*) + eps ** 0.75
            for entry in state["state"].values():
                if "frozen_exp_avg_sq" in entry:
                    entry["frozen_denom"] = entry.pop("frozen_exp_avg_sq").sqrt() + 1e-8**0.75
        opt = StepAdamW(model.parameters(), lr=1e-2, **resume_with)
        opt.load_state_dict(state)
    run(model, opt, grads[3:5])
    return model


@pytest.mark.parametrize("changed", [dict(frozen_eps=1e-3), dict(bias_correction=True)])
def test_frozen_settings_changed_on_resume_take_effect(changed: dict) -> None:
    # The state keeps the raw v*: a resume with another frozen_eps or frozen_bias_correction continues exactly
    # like a run that had those settings from the start (before, the old denominator was silently kept).
    expected = frozen_run(**changed)
    resume_with = {"frozen_bias_correction" if k == "bias_correction" else k: v for k, v in changed.items()}
    with pytest.warns(UserWarning, match=r"param group 0 was saved with frozen_eps=None, frozen_bias_correction="
                                         r"False; this optimizer's .* apply from the next step"):
        resumed = frozen_run(resume_with=resume_with)
    for a, b in zip(expected.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    unchanged = frozen_run(resume_with={})
    assert not torch.equal(unchanged[0].weight, resumed[0].weight)


def test_a_frozen_denominator_of_an_earlier_version_is_converted() -> None:
    expected = frozen_run()
    resumed = frozen_run(resume_with={}, legacy=True)
    for a, b in zip(expected.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_freeze_refuses_a_non_finite_second_moment() -> None:
    model, grads = model_and_grads()
    opt = StepAdamW(model.parameters())
    grads[1][4][0, 3] = float("nan")  # the second Linear's weight, second step
    run(model, opt, grads[:3])
    with pytest.raises(FloatingPointError, match=r"of a parameter of shape \(4, 16\) holds NaN"):
        opt.freeze_second_moment([model[2].weight])
    with pytest.raises(FloatingPointError, match=r"the second moment of net.2.weight holds NaN or inf; frozen, it "
                                                 r"would make every later update NaN, so nothing was frozen"):
        opt.freeze_second_moment([model[0].weight, model[2].weight], names=["net.0.weight", "net.2.weight"])
    assert not opt.is_frozen(model[0].weight) and not opt.is_frozen(model[2].weight)


def test_second_moment_stats_match_a_manual_computation() -> None:
    torch.manual_seed(2)
    w1, w2, other = (nn.Parameter(torch.randn(s)) for s in ((4, 8), (8,), (3,)))
    opt = StepAdamW([{"params": [w1]}, {"params": [w2, other], "lr": 1e-4}], betas=(0.9, 0.99))
    opt.watch([w1, w2])
    old_v = [torch.zeros_like(w1), torch.zeros_like(w2)]
    for _ in range(3):
        for p in (w1, w2, other):
            p.grad = torch.randn_like(p)
        opt.step()
        new_v = [opt.state[p]["exp_avg_sq"] for p in (w1, w2)]
        dv = torch.cat([(n - o).abs().flatten() for n, o in zip(new_v, old_v, strict=True)])
        stats = opt.second_moment_stats
        torch.testing.assert_close(stats["abs_dv"], dv.mean())
        torch.testing.assert_close(stats["rel_dv"], dv.mean() / torch.cat([v.flatten() for v in new_v]).mean())
        k = int(opt.state[w1]["step"])
        log_v_hat = torch.cat([(v / (1 - 0.99**k)).log().flatten() for v in new_v]).mean()
        torch.testing.assert_close(stats["log_v_hat"], log_v_hat)
        # layer_rise's sample: the same mean per watched tensor, in watch() order
        per_layer = torch.stack([(v / (1 - 0.99**k)).log().mean() for v in new_v])
        torch.testing.assert_close(stats["log_v_hat_layers"], per_layer)
        old_v = [v.clone() for v in new_v]
    opt.freeze_second_moment([w1, w2])
    for p in (w1, w2, other):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.second_moment_stats is None  # only frozen parameters were watched


def test_log_v_hat_leaves_out_elements_that_never_had_a_gradient_and_is_scale_free() -> None:
    def final_stats(scale: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        w = nn.Parameter(torch.randn(4, 8))
        opt = StepAdamW([w])
        opt.watch([w])
        for _ in range(5):
            g = torch.randn_like(w) * scale
            g[0] = 0.0  # a row that never gets a gradient: v stays exactly 0 there
            w.grad = g
            opt.step()
        v_hat = opt.state[w]["exp_avg_sq"][1:] / (1 - 0.999**5)
        assert opt.second_moment_stats is not None
        torch.testing.assert_close(opt.second_moment_stats["log_v_hat"], v_hat.log().mean())
        return opt.second_moment_stats

    base, scaled = final_stats(1.0), final_stats(1e3)
    # Loss x c -> log v_hat + 2 log c, exactly (up to rounding): its changes do not see the gradients' scale.
    torch.testing.assert_close(scaled["log_v_hat"] - base["log_v_hat"], torch.tensor(2 * math.log(1e3)))


def test_stats_average_over_the_watched_weights_with_a_gradient_in_that_step_only() -> None:
    # A watched weight without a gradient in a step (an unused branch) must not dilute the means: every statistic
    # equals the one of an optimizer watching only the weights that got a gradient.
    torch.manual_seed(4)
    pairs = [(nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8, 8))) for _ in range(2)]
    (a, b), (a_ref, b_ref) = pairs
    a_ref.data.copy_(a.data)
    b_ref.data.copy_(b.data)
    opt, ref = StepAdamW([a, b]), StepAdamW([a_ref, b_ref])
    opt.watch([a, b])
    for step in range(6):
        b_gets_grad = step % 2 == 0
        ga, gb = torch.randn(4, 8), torch.randn(8, 8)
        a.grad, a_ref.grad = ga.clone(), ga.clone()
        b.grad = gb.clone() if b_gets_grad else None
        b_ref.grad = gb.clone() if b_gets_grad else None
        ref.watch([a_ref, b_ref] if b_gets_grad else [a_ref])
        opt.step()
        ref.step()
        assert opt.second_moment_stats is not None and ref.second_moment_stats is not None
        for key in ("abs_dv", "rel_dv", "log_v_hat"):
            torch.testing.assert_close(opt.second_moment_stats[key], ref.second_moment_stats[key], msg=key)
        # Per tensor: b keeps the level of its last step with a gradient (its v did not change since).
        last_b = opt.state[b]["exp_avg_sq"] / (1 - 0.999 ** int(opt.state[b]["step"]))
        torch.testing.assert_close(opt.second_moment_stats["log_v_hat_layers"][1], last_b.log().mean(), atol=1e-4,
                                   rtol=0)
        if not b_gets_grad:
            only_a = opt.state[a]["exp_avg_sq"] / (1 - 0.999 ** (step + 1))
            # log v_hat sums log(v / float32 tiny) ~ 80 per element in float32: ~1e-5 absolute, 1e-4 of a 1 % drift.
            torch.testing.assert_close(opt.second_moment_stats["log_v_hat"], only_a.log().mean(), atol=1e-4, rtol=0)


def test_state_dict_roundtrip_after_freeze_resumes_exactly() -> None:
    model, grads = model_and_grads()
    opt = StepAdamW(model.parameters(), lr=1e-2)
    run(model, opt, grads[:3])
    opt.freeze_second_moment([model[0].weight, model[2].weight])
    run(model, opt, grads[3:4])

    clone = copy.deepcopy(model)
    state = copy.deepcopy(opt.state_dict())
    opt2 = StepAdamW(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(state)
    assert opt2.is_frozen(clone[0].weight) and opt2.is_frozen(clone[2].weight) and not opt2.is_frozen(clone[0].bias)
    run(model, opt, grads[4:])
    run(clone, opt2, grads[4:])
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mixed_dtypes() -> None:
    a = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    opt = StepAdamW([a, b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    opt.freeze_second_moment([b])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[b]["frozen_exp_avg_sq"].dtype == torch.float64 and b.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), r"`lr` must be a number >= 0, got -1.0"),
        (dict(betas=(0.9, 1.0)), r"`betas` must be a list of 2 items, each a number in \[0, 1\), got \(0.9, 1.0\)"),
        (dict(betas=[0.9]), r"`betas` must be a list of 2 items"),
        (dict(eps=0.0), r"`eps` must be a number > 0"),
        (dict(weight_decay=-0.1), r"`weight_decay` must be a number >= 0"),
        (dict(frozen_eps=0.0), r"`frozen_eps` must be a number > 0 or null"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StepAdamW([nn.Parameter(torch.zeros(1))], **kwargs)


def test_all_bad_hyperparameters_reported_at_once() -> None:
    with pytest.raises(ValueError, match=r"`lr`.*; `eps`"):
        StepAdamW([nn.Parameter(torch.zeros(1))], lr=-1, eps=-1)


def test_freeze_errors() -> None:
    w = nn.Parameter(torch.zeros(2, 4))
    stranger = nn.Parameter(torch.zeros(3))
    opt = StepAdamW([w])
    with pytest.raises(ValueError, match=r"a parameter of shape \(2, 4\) has not taken an optimizer step yet"):
        opt.freeze_second_moment([w])
    with pytest.raises(ValueError, match=r"shape \(3,\) is not in this optimizer's param_groups"):
        opt.freeze_second_moment([stranger])
    with pytest.raises(ValueError, match=r"StepAdamW.watch: a parameter of shape \(3,\)"):
        opt.watch([stranger])


def test_sparse_gradients_rejected() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = StepAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_deepcopy_and_pickle_keep_state_and_drop_watching() -> None:
    import pickle

    model, grads = model_and_grads()
    opt = StepAdamW(model.parameters())
    opt.watch([model[0].weight])
    run(model, opt, grads[:2])
    opt.freeze_second_moment([model[0].weight])
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.state_dict()["state"][0]["frozen_step"] == 2
        assert twin.second_moment_stats is None
        twin.watch([])
