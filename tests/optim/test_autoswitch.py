"""AutoSwitch: window value below threshold after t_min, unconditional after t_max, never on NaN."""

from __future__ import annotations

import pytest
import torch

from step_lightning import AutoSwitch


def feed(switch: AutoSwitch, values: list[float] | torch.Tensor) -> int | None:
    for v in values:
        if switch.observe(torch.as_tensor(v)):
            return switch.t
    return None


def test_switches_when_window_mean_drops_below_threshold() -> None:
    s = AutoSwitch(threshold=1.0, window=3, t_min=0, t_max=100)
    # window means: 5, 5, 5, (5+5+0)/3=3.3, (5+0+0)/3=1.7, 0 -> switches at step 6
    assert feed(s, [5, 5, 5, 0, 0, 0, 0]) == 6
    assert s.switch_step == 6 and s.switched_by == "threshold" and s.switched
    assert s.observe(torch.tensor(0.0)) is False  # once only


def test_t_min_defaults_to_window_and_blocks_early_switch() -> None:
    s = AutoSwitch(threshold=1.0, window=4, t_max=100)
    assert s.t_min == 4
    assert feed(s, [0, 0, 0, 0, 0]) == 5  # first allowed at t > t_min


def test_t_max_switches_unconditionally() -> None:
    s = AutoSwitch(threshold=1e-8, window=2, t_min=0, t_max=5)
    assert feed(s, [1.0] * 10) == 6
    assert s.switched_by == "t_max"


def test_nan_never_switches_and_is_counted() -> None:
    s = AutoSwitch(threshold=1.0, window=2, t_min=0, t_max=100)
    assert feed(s, [float("nan"), 0.0, float("inf"), 0.0]) is None
    assert s.num_nonfinite == 4  # each check sees a NaN/inf in the window
    assert feed(s, [0.0]) == 5  # once the bad samples left the window


def test_check_every_delays_the_test() -> None:
    s = AutoSwitch(threshold=1.0, window=1, t_min=0, t_max=100, check_every=4)
    assert feed(s, [0.0] * 10) == 4


def test_window_defaults_to_one_over_one_minus_beta2() -> None:
    assert AutoSwitch(t_max=10).window == 1000
    assert AutoSwitch(t_max=10, beta2=0.98).window == 50


def test_state_dict_roundtrip_continues_identically() -> None:
    values = [3, 2, 2, 1, 1, 0.5, 0.2, 0.1, 0.1, 0.1]
    full = AutoSwitch(threshold=0.5, window=3, t_min=2, t_max=100)
    expected = feed(full, values)
    part = AutoSwitch(threshold=0.5, window=3, t_min=2, t_max=100)
    assert feed(part, values[:4]) is None
    resumed = AutoSwitch(threshold=0.5, window=3, t_min=2, t_max=100)
    resumed.load_state_dict(part.state_dict())
    assert expected is not None and feed(resumed, values[4:]) == expected
    assert resumed.switch_step == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(threshold=0.0, t_max=1), r"AutoSwitch: `threshold` must be a number > 0, got 0.0"),
        (dict(t_max=None), r"`t_max` must be an integer >= 1"),
        (dict(t_max=10, window=0), r"`window` must be an integer >= 1"),
        (dict(t_max=10, t_min=-1), r"`t_min` must be an integer >= 0"),
        (dict(t_max=10, statistic="median"),
         r"`statistic` must be one of 'layer_rise', 'log_drift', 'reference', 'relative', got 'median'"),
        (dict(threshold=float("inf"), t_max=10), r"`threshold` must be a number > 0, got inf"),
        (dict(t_max=10, check_every=0), r"`check_every` must be an integer >= 1"),
        (dict(t_max=10, beta2=1.0), r"`beta2` must be a number in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoSwitch(**kwargs)


def test_sync_decision_adopts_another_ranks_verdict() -> None:
    s = AutoSwitch(threshold=1.0, window=1, t_min=0, t_max=100)
    assert s.observe(torch.tensor(0.0))  # locally: switch at step 1 ...
    s.sync_decision(False)  # ... but rank 0 did not
    assert not s.switched
    assert s.observe(torch.tensor(5.0)) is False
    s.sync_decision(True)  # rank 0 switched at step 2
    assert s.switch_step == 2 and s.switched_by == "rank0"


def test_history_records_every_check_and_survives_state_dict() -> None:
    s = AutoSwitch(threshold=0.5, window=2, t_min=3, t_max=100, check_every=2)
    assert feed(s, [4, 2, 2, 0, 0, 0]) == 6
    assert s.history == [(2, 3.0), (4, 1.0), (6, 0.0)]  # checks before t_min are recorded too
    twin = AutoSwitch(threshold=0.5, window=2, t_min=3, t_max=100, check_every=2)
    twin.load_state_dict(s.state_dict())
    assert twin.history == s.history


def test_log_drift_tests_the_spread_of_the_levels_over_one_window() -> None:
    s = AutoSwitch(threshold=0.25, window=4, t_min=0, t_max=100, statistic="log_drift")
    # levels s_t rise, fall back (t=5 equals t=1: an end-to-end drift of 0 that must not pass), then settle.
    levels = [0.0, 0.3, 0.5, 0.3, 0.0, -0.1, -0.15, -0.2, -0.25, -0.3]
    assert s.observe(torch.tensor(levels[0])) is False and s.history == []  # one level: no spread yet
    assert feed(s, levels[1:]) == 10
    steps, values = zip(*s.history, strict=True)
    assert steps == tuple(range(2, 11))
    # before the window is full: the spread so far, per window (0.3 * 4 / 1, 0.5 * 4 / 2, 0.5 * 4 / 3); then the
    # spread of the last 5 levels: 0.5 at t=5 (though s_5 = s_1), 0.25 at t=9 (not below), 0.2 at t=10.
    expected = [1.2, 1.0, 0.5 * 4 / 3, 0.5, 0.6, 0.65, 0.5, 0.25, 0.2]
    torch.testing.assert_close(torch.tensor(values), torch.tensor(expected))


def test_log_drift_ignores_a_constant_shift_of_the_levels() -> None:
    # Loss x c shifts every level by 2 log c: the same switch step, also for rising levels (|drift|).
    levels = [0.1 * (1 - 0.8**t) for t in range(40)]
    steps = set()
    for shift in (-13.8, 0.0, 13.8):
        s = AutoSwitch(threshold=0.02, window=5, t_max=100, statistic="log_drift")
        steps.add(feed(s, [x + shift for x in levels]))
    assert len(steps) == 1 and None not in steps


def test_log_drift_state_dict_roundtrip_and_statistic_mismatch() -> None:
    levels = [-0.3 * 0.7**t for t in range(30)]
    full = AutoSwitch(threshold=0.05, window=4, t_max=100, statistic="log_drift")
    expected = feed(full, levels)
    part = AutoSwitch(threshold=0.05, window=4, t_max=100, statistic="log_drift")
    assert expected is not None and expected > 6 and feed(part, levels[:6]) is None
    resumed = AutoSwitch(threshold=0.05, window=4, t_max=100, statistic="log_drift")
    resumed.load_state_dict(part.state_dict())
    assert feed(resumed, levels[6:]) == expected
    other = AutoSwitch(threshold=0.05, window=4, t_max=100, statistic="relative")
    with pytest.raises(ValueError, match=r"watched the 'log_drift' statistic, this run is configured with "
                                         r"'relative'.*autoswitch_statistic log_drift"):
        other.load_state_dict(part.state_dict())


def test_layer_rise_waits_for_the_last_rising_layer() -> None:
    # Two layers: one's log v_hat rises 0.1 a step to a plateau, the other's falls as fast; their mean stays put. The
    # global log_drift test switches at its first check after t_min; layer_rise waits until the rise has ended.
    rising = [min(0.1 * t, 2.0) for t in range(40)]
    levels = torch.tensor([rising, [-x for x in rising]]).T  # (step, layer)
    by_mean = AutoSwitch(threshold=0.25, window=4, t_min=4, t_max=100, statistic="log_drift")
    by_layer = AutoSwitch(threshold=0.25, window=4, t_min=4, t_max=100, statistic="layer_rise")
    assert feed(by_mean, levels.mean(1)) == 5
    assert feed(by_layer, levels) == 23  # steps 19..23 hold 1.8, 1.9, 2, 2, 2: the first rise below 0.25
    assert by_layer.history[0] == (2, pytest.approx(0.1 * 4))  # 0.1 in one step, per window of 4


def test_layer_rise_lets_a_falling_second_moment_switch() -> None:
    # Gradients that keep shrinking (a model fitting its data): every level falls 0.1 a step, in a different order
    # of the ring each time. Frozen, such a v_hat only makes the steps smaller: layer_rise switches after t_min,
    # where the two-sided log_drift spread never falls below its threshold.
    levels = torch.tensor([[-0.1 * t, -0.2 * t] for t in range(40)])
    by_layer = AutoSwitch(threshold=0.25, window=4, t_min=4, t_max=30, statistic="layer_rise")
    by_spread = AutoSwitch(threshold=0.25, window=4, t_min=4, t_max=30, statistic="log_drift")
    assert feed(by_layer, levels) == 5 and by_layer.switched_by == "threshold"
    assert feed(by_spread, levels.mean(1)) == 31 and by_spread.switched_by == "t_max"
    # A rise anywhere in the window, also one that came before a fall, blocks the switch.
    bump = AutoSwitch(threshold=0.25, window=4, t_min=4, t_max=30, statistic="layer_rise")
    assert feed(bump, [0.0, 0.0, 0.0, 0.5] + [0.0] * 8) == 8  # the rise 3 -> 4 is in the windows of steps 5..7


def test_layer_rise_ignores_a_constant_shift_of_each_layer_and_survives_state_dict() -> None:
    base = torch.tensor([[0.5 * (1 - 0.7**t), -0.4 * 0.6**t, 0.2 * (1 - 0.8**t)] for t in range(40)])
    steps = set()
    for shift in (-13.8, 0.0, 13.8):
        s = AutoSwitch(threshold=0.02, window=5, t_max=100, statistic="layer_rise")
        steps.add(feed(s, base + shift + torch.tensor([0.0, 3.0, -7.0])))
    assert len(steps) == 1 and None not in steps
    expected = steps.pop()
    part = AutoSwitch(threshold=0.02, window=5, t_max=100, statistic="layer_rise")
    assert expected > 7 and feed(part, base[:7]) is None
    resumed = AutoSwitch(threshold=0.02, window=5, t_max=100, statistic="layer_rise")
    resumed.load_state_dict(part.state_dict())
    assert feed(resumed, base[7:]) == expected
    with pytest.raises(ValueError, match=r"sample of shape \(2,\) after samples of shape \(3,\)"):
        part.observe(torch.zeros(2))
