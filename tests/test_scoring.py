"""The threshold fit, the alarm rule and channel shares: what every consumer of a model applies."""

from __future__ import annotations

import numpy as np
import pytest

from smocsd import threshold
from smocsd.scoring import AlarmRule, shares


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
    assert AlarmRule.from_meta(AlarmRule(3, 5).to_meta()) == AlarmRule(3, 5)


def test_channel_shares_sum_to_one_and_name_the_culprit():
    errors = np.array([[0.1, 0.1, 0.8], [0.0, 0.0, 0.0]])
    s = shares(errors)
    np.testing.assert_allclose(s[0], [0.1, 0.1, 0.8])
    assert s[1].tolist() == [0, 0, 0]
