"""The window score, the threshold fit, the alarm rule and channel shares: what every consumer
of a model applies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import model_meta

from smocsd.common.modelmeta import AlarmMeta, LevelMeta, ModelMeta, SustainedMeta
from smocsd.scoring import (
    BEYOND_SCORE,
    LEVEL_FLOOR,
    LEVEL_QUANTILE,
    SCALE_FLOOR,
    SCALE_QUANTILE,
    AlarmRule,
    LevelRule,
    LookBack,
    Model,
    ScoreKind,
    SustainedRule,
    WindowScore,
    decide,
    shares,
)
from smocsd.training import threshold
from smocsd.training.trainers.graph import build_model, init_weights


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(-4.0, 0.5, n))


def test_threshold_keeps_the_false_alarm_budget_on_normal_scores():
    fit = threshold.fit(lognormal(20000), window_size=1, stride=1, false_alarm_rate=0.001)
    fresh = lognormal(200000, seed=1)
    assert (fresh > fit.threshold).mean() <= 0.001
    assert (fresh > fit.threshold).mean() > 0.0002  # a bound, not a wall


def test_fewer_windows_give_a_wider_margin():
    scores = lognormal(400)
    few = threshold.fit(scores, window_size=10, stride=1, false_alarm_rate=0.001)
    many = threshold.fit(scores, window_size=1, stride=1, false_alarm_rate=0.001)
    assert few.effective_windows == 40 and many.effective_windows == 400
    assert few.k > many.k and few.threshold > many.threshold


def test_anomalies_among_the_training_windows_barely_move_the_threshold():
    clean = lognormal(5000)
    dirty = clean.copy()
    dirty[:500] *= 100  # a tenth of the windows anomalous
    a = threshold.fit(clean, 1, 1, 0.001).threshold
    b = threshold.fit(dirty, 1, 1, 0.001).threshold
    assert b / a < 1.5  # a mean + k sd bound would move by orders of magnitude
    assert np.percentile(dirty, 99) / np.percentile(clean, 99) > 10  # what a percentile does


def test_identical_or_zero_scores_still_give_a_finite_threshold():
    for scores in (np.zeros(100), np.full(100, 0.25)):
        fit = threshold.fit(scores, 10, 1, 0.001)
        assert np.isfinite(fit.threshold) and fit.threshold >= scores.max()
    with pytest.raises(ValueError):
        threshold.fit(np.empty(0), 10, 1, 0.001)


def test_quantiles_for_another_operating_point():
    q = threshold.quantiles(np.arange(1001, dtype=float))
    assert q["p50"] == 500 and q["p99"] == 990 and q["max"] == 1000
    assert list(q) == ["p50", "p90", "p95", "p99", "p99.9", "max"]


def test_alarm_rule_k_of_n():
    over = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], bool)
    assert AlarmRule(2, 3).apply(over).astype(int).tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert AlarmRule(1, 1).apply(over).tolist() == over.tolist()
    assert AlarmMeta.parse(AlarmRule(3, 5).to_meta(), "alarm") == AlarmMeta(3, 5)


def test_the_sustained_rule_counts_each_channel_on_its_own():
    """One channel a little high on 4 of the last 5 windows fires it; the same number of
    high windows spread over channels does not, nor does a level it never passes."""
    rule = SustainedRule(4, 5, 1.25)
    errors = np.full((12, 3), 0.5, np.float32)
    errors[[1, 2, 4, 5], 0] = 1.3  # channel 0: 4 of windows 1..5
    errors[[6, 8], 1] = errors[[7, 9], 2] = 2.0  # high, but never 4 of 5 in one channel
    high = errors > rule.level
    assert rule.apply(high).astype(int).tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert not SustainedRule(4, 5, 1.5).apply(errors > 1.5)[:6].any()
    assert SustainedMeta.parse(rule.to_meta(), "alarm.sustained") == SustainedMeta(4, 5, 1.25)
    assert SustainedRule.from_meta(SustainedMeta(4, 5, 1.25)) == rule


def test_channel_shares_sum_to_one_and_name_the_culprit():
    errors = np.array([[0.1, 0.1, 0.8], [0.0, 0.0, 0.0]])
    s = shares(errors)
    np.testing.assert_allclose(s[0], [0.1, 0.1, 0.8])
    assert s[1].tolist() == [0, 0, 0]


def channel_noise(windows: int, channels: int, seed: int = 0) -> np.ndarray:
    """(windows, channels) per-channel errors of normal windows, each channel its own level."""
    rng = np.random.default_rng(seed)
    levels = np.geomspace(0.01, 1.0, channels)
    return (levels * np.exp(rng.normal(0.0, 0.3, (windows, channels)))).astype(np.float32)


def fit_score(kind: ScoreKind, train: np.ndarray, val: np.ndarray) -> WindowScore:
    """WindowScore.fit as the job calls it, from all the training windows' errors."""
    return WindowScore.fit(
        kind, train.mean(axis=0), np.quantile(train, SCALE_QUANTILE, axis=0), val
    )


def test_channel_max_sees_a_fault_in_one_channel_of_many_that_mse_divides():
    """A fault that moves one quiet channel of 52 to ten times its normal error: the mean
    over channels barely notices it, the largest scaled error is ten times normal."""
    train, val = channel_noise(4000, 52), channel_noise(1000, 52, seed=1)
    fault = channel_noise(200, 52, seed=2)
    fault[:, 0] *= 10  # the quietest channel
    for kind, seen in ((ScoreKind.MSE, False), (ScoreKind.CHANNEL_MAX, True)):
        score = fit_score(kind, train, val)
        fit = threshold.fit(score.apply(np.vstack([train, val]))[1], 1, 1, 0.001)
        caught = (score.apply(fault)[1] > fit.threshold).mean()
        assert (caught > 0.9) == seen, (kind, caught)
        assert (score.apply(channel_noise(5000, 52, seed=3))[1] > fit.threshold).mean() < 0.01


def test_a_channel_drifting_in_the_newest_rows_is_measured_against_its_drift():
    """The validation windows (the newest rows) of channel 1 reconstruct three times worse
    than its training windows: its scale carries that growth, so the drift already under
    way does not alarm where an unscaled channel-max would."""
    train, val = channel_noise(4000, 4), channel_noise(1000, 4, seed=1)
    val[:, 1] *= 3
    score = fit_score(ScoreKind.CHANNEL_MAX, train, val)
    steady = np.maximum(np.quantile(val, 0.99, axis=0), np.quantile(train, 0.99, axis=0))
    assert score.channel_scale[1] == pytest.approx(steady[1] * 3, rel=0.1)
    assert score.channel_scale[[0, 2, 3]] == pytest.approx(steady[[0, 2, 3]], rel=1e-6)
    # a constant channel (no error at all) still gets a finite scale
    train[:, 2] = val[:, 2] = 0.0
    assert fit_score(ScoreKind.CHANNEL_MAX, train, val).channel_scale[2] == (
        pytest.approx(SCALE_FLOOR)
    )


def test_quiet_validation_windows_do_not_make_a_busier_hour_an_alarm():
    """The newest rows held out were a quiet spell (channel 0 reconstructs four times
    better there): its normal error is its training windows' quantile, not theirs."""
    train, val = channel_noise(4000, 3), channel_noise(1000, 3, seed=1)
    val[:, 0] /= 4
    score = fit_score(ScoreKind.CHANNEL_MAX, train, val)
    assert score.channel_scale[0] == pytest.approx(np.quantile(train[:, 0], 0.99), rel=1e-6)
    busy = channel_noise(5000, 3, seed=2)  # hours like the training ones
    assert (score.apply(busy)[0][:, 0] > 1).mean() < 0.02


def test_a_model_saved_before_channel_max_scores_as_it_did():
    """metadata.json of older versions says "mse" (or nothing): the mean, unscaled."""
    errors = channel_noise(100, 3)
    current = model_meta(b"", ("a", "b", "c"))
    del current["channel_scale"], current["alarm"]["sustained"]
    for older in ({**current, "score": "mse"}, {k: v for k, v in current.items() if k != "score"}):
        score = WindowScore.of(ModelMeta.parse(older))
        scaled, s = score.apply(errors)
        assert score.kind is ScoreKind.MSE and scaled is errors
        assert np.array_equal(s, errors.mean(axis=1))
    new = fit_score(ScoreKind.CHANNEL_MAX, errors, errors)
    again = WindowScore.of(ModelMeta.parse({**current, **new.to_meta()}))
    assert again.to_meta() == new.to_meta()
    assert np.array_equal(again.apply(errors)[1], (errors / again.channel_scale).max(axis=1))


def two_channel_model(directory: Path, output_bias: float = 0.0) -> Model:
    """A version as scoring.Model loads it, windows of 4 rows of channels a and b: zero
    weights, so it reconstructs every window as `output_bias` (0: the training mean) and
    a window's score is its largest channel's mean squared z-score."""
    n, hidden = 8, [4]
    weights = {k: np.zeros_like(v) for k, v in init_weights(n, hidden, 0).items()}
    weights["layer1.bias"] = np.full(n, output_bias, np.float32)
    onnx.save(build_model(n, hidden, weights), directory / "model.onnx")
    meta = model_meta(
        (directory / "model.onnx").read_bytes(),
        ("a", "b"),
        threshold=25.0,
        normalization={"kind": "zscore", "mean": [10.0, 0.0], "scale": [2.0, 1.0]},
    )
    meta["time"]["max_gap_s"] = None
    return Model.of(directory, ModelMeta.parse(meta))


@pytest.mark.parametrize("reading", [1e308, -1e308, 1e35, 2e9, -3e12])
def test_a_reading_beyond_what_the_model_can_take_is_an_alarm(tmp_path, reading):
    """1e308 would be inf once normalized, 2e9 a squared error of 1e18 per element: the
    windows holding either score BEYOND_SCORE, over the threshold, all of it channel b's."""
    model = two_channel_model(tmp_path)
    values = np.random.default_rng(0).normal(size=(30, 2)) * [2.0, 1.0] + [10.0, 0.0]
    values[12, 1] = reading
    scored = model.score(values, np.arange(30.0))
    holding_it = (scored.end >= 12) & (scored.end <= 15)
    assert scored.end.tolist() == list(range(3, 30))  # no window skipped
    assert (scored.score[holding_it] == BEYOND_SCORE).all() and scored.over[holding_it].all()
    assert not scored.over[~holding_it].any() and (scored.score[~holding_it] < 25).all()
    assert scored.alarm[holding_it][1:].all()  # 2 of 3: from its second window on
    np.testing.assert_allclose(shares(scored.errors[holding_it]), [[0.0, 1.0]] * 4, atol=1e-30)


def test_a_window_score_that_is_not_finite_is_an_alarm(tmp_path):
    """A network whose output is NaN (a model no check of smocsd would save): its windows
    are over the threshold, never "not anomalous", with a score that JSON can carry."""
    model = two_channel_model(tmp_path, output_bias=float("nan"))
    values = np.random.default_rng(0).normal(size=(10, 2)) * [2.0, 1.0] + [10.0, 0.0]
    scored = model.score(values, np.arange(10.0))
    assert len(scored.end) == 7 and scored.over.all() and scored.alarm[1:].all()
    assert (scored.score == BEYOND_SCORE).all() and np.isfinite(scored.errors).all()
    json.dumps(scored.score.tolist(), allow_nan=False)


def ruled_model(directory: Path, sustained: dict | None = None, level: dict | None = None) -> Model:
    """two_channel_model with a threshold of 25 and, if given, metadata's sustained rule
    and level rule."""
    model = two_channel_model(directory)
    meta = model_meta(
        (directory / "model.onnx").read_bytes(),
        ("a", "b"),
        threshold=25.0,
        normalization={"kind": "zscore", "mean": [10.0, 0.0], "scale": [2.0, 1.0]},
        alarm={
            "kind": "k-of-n",
            "above": 2,
            "of": 3,
            **({"sustained": sustained} if sustained else {}),
            **({"level": level} if level else {}),
        },
    )
    meta["time"]["max_gap_s"] = None
    assert model.window_size == 4
    return Model.of(directory, ModelMeta.parse(meta))


def shifted_readings(n: int = 120) -> np.ndarray:
    """Readings of channels a and b; from row 40 to 89, b sits 1.5 of its standard
    deviations high: each window's error in b about 2.25 times normal, far under 25."""
    values = np.random.default_rng(3).normal(size=(n, 2)) * [2.0, 0.2] + [10.0, 0.0]
    values[40:90, 1] += 1.5
    return values


def test_a_small_lasting_shift_is_an_alarm_by_the_sustained_rule_alone(tmp_path):
    """The shift never takes a window over the threshold; the sustained rule finds it, a
    model saved without the rule (before it) scores exactly as it did."""
    values, time = shifted_readings(), np.arange(120.0)
    rule = {"above": 8, "of": 10, "level": 1.5}
    with_rule = ruled_model(tmp_path, rule).score(values, time)
    before = ruled_model(tmp_path).score(values, time)
    assert not with_rule.over.any() and not before.alarm.any()
    alarm = with_rule.row_alarm(len(values))
    assert alarm[52:90].all() and not alarm[:40].any() and not alarm[100:].any()
    assert np.array_equal(with_rule.score, before.score)


LEVEL = {"gap": 10, "baseline": 10, "limit": [3.0, 1.0]}


def test_a_lasting_step_is_an_alarm_by_the_level_rule_and_its_end_is_not(tmp_path):
    """A step of 1.5 in b (7.5 of its standard deviations, an error far under the
    threshold) moves b's window mean from its baseline's: an alarm until the baseline
    holds the step too; b coming back to normal at row 90 is none. A model saved without
    the rule scores exactly as it did."""
    values, time = shifted_readings(), np.arange(120.0)
    with_rule = ruled_model(tmp_path, level=LEVEL).score(values, time)
    before = ruled_model(tmp_path).score(values, time)
    assert not with_rule.over.any() and not before.alarm.any() and not before.moved.any()
    # Moved from the window ending at row 42 (3 of its 4 rows in the step) until the
    # baseline holds enough of the step (rows 35-44 for the window ending at 58).
    assert with_rule.end[with_rule.moved].tolist() == list(range(42, 59))
    assert np.flatnonzero(with_rule.row_alarm(len(values))).tolist() == list(range(43, 60))
    assert np.array_equal(with_rule.score, before.score)
    # A row the rule reads missing (or a time gap in them): no decision by it there.
    holed = values.copy()
    holed[30] = np.nan
    scored = ruled_model(tmp_path, level=LEVEL).score(holed, time)
    assert scored.end[scored.moved].tolist() == list(range(54, 59))


def test_the_level_limit_is_fitted_on_the_training_rows_moves():
    """Each channel's limit is the factor times LEVEL_QUANTILE of its moves over the spans
    given; a constant channel gets LEVEL_FLOOR; no span, no rule."""
    z = np.zeros((500, 2), np.float32)
    z[:, 0] = np.random.default_rng(1).normal(size=500)
    spans = np.arange(0, 500 - 24 + 1)
    rule = LevelRule.fit(z, spans, 4, 10, 10, 2.0)
    now = np.array([z[s + 20 : s + 24].mean(axis=0) for s in spans], np.float64)
    before = np.array([z[s : s + 10].mean(axis=0) for s in spans], np.float64)
    expected = 2.0 * np.quantile(np.abs(now - before)[:, 0], LEVEL_QUANTILE)
    assert rule.limit[0] == pytest.approx(expected) and rule.limit[1] == LEVEL_FLOOR
    assert LevelMeta.parse(rule.to_meta(), "level") == LevelMeta(10, 10, rule.limit.tolist())
    assert LevelRule.fit(z, spans[:0], 4, 10, 10, 2.0) is None


@pytest.mark.parametrize(
    "rules", [{"sustained": {"above": 8, "of": 10, "level": 1.5}}, {"level": LEVEL}]
)
def test_decisions_made_piece_by_piece_carry_the_look_back(tmp_path, rules):
    """Live scoring decides a few rows at a time, carrying a LookBack; `smocsd score`
    decides a range with its context: both as Model.score decides the whole; an excluded
    period is never an alarm by either rule, nor is a level compared with one in it."""
    model = ruled_model(tmp_path, **rules)
    values, time, order = shifted_readings(), np.arange(120.0), np.arange(1, 121)
    whole = model.score(values, time)
    assert whole.alarm.any()
    recent, alarm, after = LookBack(), [], 0
    for last in [*range(5, 120, 7), 120]:  # each call: the new rows, the rows before them
        first = max(0, after - (model.span - 1))
        rows = slice(first, last)
        d = decide(model, values[rows], time[rows], order[rows], after, recent)
        recent, alarm, after = d.recent, alarm + d.alarm.tolist(), last
    assert alarm == whole.alarm.tolist()
    assert len(recent.high) == (9 if "sustained" in rules else 0) and len(recent.over) == 2
    context = model.span - 1 + model.look_back - 1
    ranged = decide(
        model, values[60 - context :], time[60 - context :], order[60 - context :], 60, None
    )
    assert ranged.alarm.tolist() == whole.alarm[whole.end >= 60].tolist()
    quiet = decide(model, values, time, order, None, LookBack(), excluded=[(30, 95)])
    assert not quiet.alarm.any()
    if "level" in rules:  # the windows after the step, their baselines in a recalibration
        recalibrated = decide(model, values, time, order, None, LookBack(), excluded=[(21, 39)])
        assert not recalibrated.alarm.any()
