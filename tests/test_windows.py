"""Sliding windows: layout, bad rows, the split, normalization fitted on training only."""

from __future__ import annotations

import numpy as np
import pytest

from smocsd.windows import DataError, Normalization, split, valid_starts


def test_windows_flatten_time_major():
    values = np.arange(20, dtype=float).reshape(10, 2)  # row t = [2t, 2t+1]
    sp = split(values, valid_starts(np.zeros(10, bool), 3, 1), 3, 0.25)
    norm = sp.normalization
    raw = sp.train.batch(np.array([1])) * np.tile(norm.scale, 3) + np.tile(norm.mean, 3)
    # window starting at row 1: x[t1,c0], x[t1,c1], x[t2,c0], ...
    np.testing.assert_allclose(raw[0], [2, 3, 4, 5, 6, 7], rtol=1e-5)
    assert sp.train.n_features == 6


def test_windows_never_contain_a_bad_row():
    bad = np.zeros(30, bool)
    bad[[7, 20]] = True
    starts = valid_starts(bad, 5, 1)
    for s in starts:
        assert not bad[s : s + 5].any()
    # every other start is present: 0..2 (before row 7), 8..15, 21..25
    assert list(starts) == [0, 1, 2, *range(8, 16), *range(21, 26)]


def test_stride():
    assert list(valid_starts(np.zeros(12, bool), 4, 3)) == [0, 3, 6]


def test_validation_is_the_newest_windows_and_never_overlaps_training():
    values = np.random.default_rng(0).normal(size=(200, 3))
    starts = valid_starts(np.zeros(200, bool), 10, 1)
    sp = split(values, starts, 10, 0.2)
    assert len(sp.val) == round(len(starts) * 0.2)
    assert sp.val.starts.min() > sp.train.starts.max()
    assert sp.train.starts.max() + 10 <= sp.val.starts.min()  # no shared row


def test_normalization_is_fitted_on_training_rows_only():
    values = np.ones((100, 2))
    values[:, 0] = np.linspace(0, 1, 100)
    base = split(values, valid_starts(np.zeros(100, bool), 5, 1), 5, 0.3)
    changed = values.copy()
    changed[-20:] = 1e6  # validation-only rows
    other = split(changed, valid_starts(np.zeros(100, bool), 5, 1), 5, 0.3)
    np.testing.assert_array_equal(base.normalization.mean, other.normalization.mean)
    np.testing.assert_array_equal(base.normalization.scale, other.normalization.scale)


def test_a_constant_channel_does_not_divide_by_zero():
    norm = Normalization.fit(np.column_stack([np.full(50, 7.0), np.arange(50.0)]))
    assert norm.scale[0] == 1.0
    z = norm.apply(np.array([[7.0, 3.0]]))
    assert np.isfinite(z).all() and z[0, 0] == 0


def test_too_few_windows_is_a_data_error():
    with pytest.raises(DataError):
        split(np.zeros((6, 1)), valid_starts(np.zeros(6, bool), 5, 1), 5, 0.5)
