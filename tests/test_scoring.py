"""The window score, the threshold fit, the alarm rule and channel shares: what every consumer
of a model applies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import model_meta

from smocsd.common.modelmeta import AlarmMeta, ModelMeta
from smocsd.scoring import (
    BEYOND_SCORE,
    SCALE_FLOOR,
    AlarmRule,
    Model,
    ScoreKind,
    WindowScore,
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


def test_channel_max_sees_a_fault_in_one_channel_of_many_that_mse_divides():
    """A fault that moves one quiet channel of 52 to ten times its normal error: the mean
    over channels barely notices it, the largest scaled error is ten times normal."""
    train, val = channel_noise(4000, 52), channel_noise(1000, 52, seed=1)
    fault = channel_noise(200, 52, seed=2)
    fault[:, 0] *= 10  # the quietest channel
    for kind, seen in ((ScoreKind.MSE, False), (ScoreKind.CHANNEL_MAX, True)):
        score = WindowScore.fit(kind, train.mean(axis=0), val)
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
    score = WindowScore.fit(ScoreKind.CHANNEL_MAX, train.mean(axis=0), val)
    steady = np.quantile(val, 0.99, axis=0)
    assert score.channel_scale[1] == pytest.approx(steady[1] * 3, rel=0.1)
    assert score.channel_scale[[0, 2, 3]] == pytest.approx(steady[[0, 2, 3]], rel=0.05)
    # a constant channel (no error at all) still gets a finite scale
    train[:, 2] = val[:, 2] = 0.0
    assert WindowScore.fit(ScoreKind.CHANNEL_MAX, train.mean(axis=0), val).channel_scale[2] == (
        pytest.approx(SCALE_FLOOR)
    )


def test_a_model_saved_before_channel_max_scores_as_it_did():
    """metadata.json of older versions says "mse" (or nothing): the mean, unscaled."""
    errors = channel_noise(100, 3)
    current = model_meta(b"", ("a", "b", "c"))
    del current["channel_scale"]
    for older in ({**current, "score": "mse"}, {k: v for k, v in current.items() if k != "score"}):
        score = WindowScore.of(ModelMeta.parse(older))
        scaled, s = score.apply(errors)
        assert score.kind is ScoreKind.MSE and scaled is errors
        assert np.array_equal(s, errors.mean(axis=1))
    new = WindowScore.fit(ScoreKind.CHANNEL_MAX, errors.mean(axis=0), errors)
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
