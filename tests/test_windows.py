"""Sliding windows: layout, bad rows, the split, normalization fitted on training only."""

from __future__ import annotations

import numpy as np
import pytest

from smocsd.data.windows import (
    MAX_Z,
    DataError,
    Normalization,
    check_time,
    readings_beyond,
    split,
    valid_starts,
)


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


def test_windows_never_span_a_time_gap_or_disorder():
    time = np.arange(40, dtype=float) * 10
    time[20:] += 600  # the gateway was off for ten minutes before row 20
    time[30] = time[29]  # a repeated timestamp
    breaks, check = check_time(time, None)
    assert check.interval == 10 and check.max_gap == 30
    assert (check.gaps, check.duplicates, check.backwards, check.no_time) == (1, 1, 0, 0)
    starts = valid_starts(np.zeros(40, bool), 5, 1, breaks)
    assert list(starts) == [*range(0, 16), *range(20, 26), *range(30, 36)]


def test_time_going_backwards_and_missing_times_break_windows():
    time = np.arange(30, dtype=float)
    time[10] = 3.0  # out of order
    time[20] = np.nan
    breaks, check = check_time(time, 5.0)
    assert (check.backwards, check.no_time, check.max_gap) == (1, 1, 5.0)
    for s in valid_starts(np.zeros(30, bool), 4, 1, breaks):
        assert 10 not in range(s + 1, s + 4) and 11 not in range(s + 1, s + 4)
        assert 20 not in range(s, s + 4)


def test_no_usable_time_windows_by_order_alone():
    breaks, check = check_time(np.full(10, np.nan), None)
    assert not breaks.any() and check.no_time == 10 and np.isnan(check.interval)
    assert check.to_meta()["max_gap_s"] is None


def test_a_batch_is_the_rows_of_its_windows_cut_from_one_matrix():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(500, 3))
    values[[40, 300]] = np.nan
    starts = valid_starts(~np.isfinite(values).all(axis=1), 7, 2)
    sp = split(values, starts, 7, 0.25)
    for windows in (sp.train, sp.val):
        # every window is a row of a strided view of the one float32 matrix: no copy
        assert np.shares_memory(windows.view, sp.train.z) and windows.z is sp.train.z
        idx = rng.permutation(len(windows))[:50]
        x = windows.batch(idx)
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (50, 21)
        expected = np.stack([windows.z[s : s + 7].ravel() for s in windows.starts[idx]])
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(
            np.concatenate(list(windows.batches(16))), windows.batch(np.arange(len(windows)))
        )


def test_valid_starts_are_those_of_the_definition():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n, size, stride = (
            int(rng.integers(1, 200)),
            int(rng.integers(2, 12)),
            int(rng.integers(1, 4)),
        )
        bad, breaks = rng.random(n) < 0.05, rng.random(n) < 0.05
        expected = [
            s
            for s in range(0, n - size + 1, stride)
            if not bad[s : s + size].any() and not breaks[s + 1 : s + size].any()
        ]
        assert list(valid_starts(bad, size, stride, breaks)) == expected


def test_normalization_a_block_at_a_time_is_that_of_all_rows_at_once(monkeypatch):
    rng = np.random.default_rng(2)
    values = rng.normal(size=(1000, 3)) * [0.1, 10, 1e4] + [20, -5, 3e5]
    values[[10, 500, 501]] = [np.nan, np.inf, 7.0]
    starts = valid_starts(~np.isfinite(values).all(axis=1), 10, 1)
    whole = split(values, starts, 10, 0.2)
    monkeypatch.setattr("smocsd.data.windows.BLOCK_ROWS", 37)
    blocks = split(values, starts, 10, 0.2)
    covered = np.zeros(1000, bool)
    for s in whole.train.starts:
        covered[s : s + 10] = True
    rows = values[covered]
    # Bit for bit numpy's statistics of the rows (so models do not change with the blocks)
    for sp in (whole, blocks):
        np.testing.assert_array_equal(sp.normalization.mean, rows.mean(axis=0))
        np.testing.assert_array_equal(sp.normalization.scale, rows.std(axis=0))
    np.testing.assert_array_equal(blocks.train.z, whole.train.z)
    finite = np.isfinite(values)
    expected = ((values - rows.mean(axis=0)) / rows.std(axis=0)).astype(np.float32)
    np.testing.assert_allclose(whole.train.z[finite], expected[finite], rtol=1e-5, atol=1e-6)
    assert (whole.train.z[~finite] == 0).all()  # missing values (in no window) are zeros


def test_a_reading_beyond_what_a_model_can_take_is_left_out_like_a_missing_value():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(400, 2)) * [1.0, 50.0] + [10.0, -300.0]
    values[100, 0] = 1e308  # a training row: beyond MAX_READING, it would overflow the fit
    values[200, 1] = -1e308
    values[390, 1] = 1e20  # a validation row: representable, but ~1e18 scales off the mean
    starts = valid_starts(np.zeros(400, bool), 10, 1)  # the caller knows of none of them
    with np.errstate(all="raise"):  # no overflow anywhere on the way
        sp = split(values, starts, 10, 0.2)
    assert (sp.beyond_rows, sp.beyond_channels) == (3, (0, 1))
    # The same split as if the three rows had been NULL, and the same normalization
    bad = np.zeros(400, bool)
    bad[[100, 200, 390]] = True
    nulls = split(values, valid_starts(bad, 10, 1), 10, 0.2)
    assert sp.windows == nulls.windows == 391 - 3 * 10
    np.testing.assert_array_equal(sp.train.starts, nulls.train.starts)
    np.testing.assert_array_equal(sp.val.starts, nulls.val.starts)
    np.testing.assert_array_equal(sp.normalization.mean, nulls.normalization.mean)
    np.testing.assert_array_equal(sp.normalization.scale, nulls.normalization.scale)
    assert nulls.beyond_rows == 0
    # What the trainers get: finite values, all well inside the range
    for windows in (sp.train, sp.val):
        x = windows.batch(np.arange(len(windows)))
        assert np.isfinite(x).all() and np.abs(x).max() < 10


def test_beyond_names_the_values_a_model_cannot_take():
    norm = Normalization(mean=np.array([0.0, 1e6]), scale=np.array([1e-3, 1.0]))
    values = np.array(
        [
            [MAX_Z * 1e-3 * 0.99, 1e6 + MAX_Z * 0.99],  # just inside
            [MAX_Z * 1e-3 * 1.01, 1e6 - MAX_Z * 1.01],  # too many scales off the mean
            [np.nan, np.inf],  # missing values, not this
            [-1e31, 1e6],  # beyond MAX_READING
        ]
    )
    assert norm.beyond(values).tolist() == [
        [False, False],
        [True, True],
        [False, False],
        [True, False],
    ]
    assert readings_beyond(values).tolist() == [[False, False]] * 3 + [[True, False]]
    z = norm.apply(values, missing=0.0)
    assert z.dtype == np.float32 and np.isfinite(z).all()
    assert (z[1:3] == 0).all() and z[3, 0] == 0 and abs(z[0, 1]) > 0.9 * MAX_Z
