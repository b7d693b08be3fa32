"""The demo generator: a deterministic, labelled, realistic timeline that appends."""

from __future__ import annotations

import itertools
import sqlite3
import time

import numpy as np
import pytest

from smocsd.data import demo

COLUMNS = ("ts", *demo.CHANNELS, "label")


def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[c], b[c], equal_nan=c != "label") for c in COLUMNS)


@pytest.fixture(scope="module")
def long():
    """Five days of seed 7's timeline."""
    return demo.simulate(45000, seed=7)


def test_same_seed_same_data_however_split(long):
    assert same(demo.simulate(45000, seed=7), long)
    cuts = [0, 1, 10, 509, 3000, 7999, 8000, 8001, 16060, 30000, 45000]
    parts = [demo.simulate(b - a, start_index=a, seed=7) for a, b in itertools.pairwise(cuts)]
    assert same({c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}, long)
    assert same(
        demo.simulate(1000, start_index=20000, seed=7), {c: long[c][20000:21000] for c in COLUMNS}
    )
    assert not np.array_equal(demo.simulate(3000, seed=8)["current"], long["current"][:3000])


def test_columns_and_types(long):
    assert list(long) == list(COLUMNS)
    assert all(long[c].dtype == np.float64 for c in COLUMNS[:-1])
    assert long["label"].dtype == np.int64 and set(np.unique(long["label"])) == {0, 1}
    empty = demo.simulate(0, start_index=5)
    assert list(empty) == list(COLUMNS) and all(len(v) == 0 for v in empty.values())


def test_time_gaps_and_sampling(long):
    step = np.diff(long["ts"])
    assert (step >= demo.SAMPLE_S).all()
    assert long["ts"][0] == demo.T0
    gaps = step[step > demo.SAMPLE_S] - demo.SAMPLE_S
    assert 1 <= len(gaps) <= 15
    assert (gaps >= 5 * 60).all() and (gaps <= 60 * 60).all()
    assert np.mean(step == demo.SAMPLE_S) > 0.999
    no_gaps = demo.simulate(45000, seed=7, gaps=False)["ts"]
    np.testing.assert_array_equal(np.diff(no_gaps), demo.SAMPLE_S)


def test_labels_cover_the_injected_anomalies_only(long):
    assert 0.001 < long["label"].mean() < 0.02
    edges = np.diff(np.concatenate([[0], long["label"], [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    assert 2 <= len(starts) <= 12  # about one per 8000 rows
    assert ((ends - starts >= 18) & (ends - starts <= 90)).all()  # 3-15 minutes
    clean = demo.simulate(45000, seed=7, anomalies=False)
    assert not clean["label"].any()
    changed = np.zeros(45000, bool)
    for c in demo.CHANNELS:
        changed |= ~np.isclose(long[c], clean[c], equal_nan=True)
    np.testing.assert_array_equal(changed, long["label"] == 1)  # exactly the labelled rows
    # no dropout or gap within an anomaly
    assert np.isfinite(np.column_stack([long[c] for c in demo.CHANNELS])[long["label"] == 1]).all()
    assert (np.diff(long["ts"])[(long["label"][1:] == 1) & (long["label"][:-1] == 1)] == 10).all()


def test_anomalies_vary_from_subtle_to_clear():
    data = demo.simulate(400_000, seed=1)
    clean = demo.simulate(400_000, seed=1, anomalies=False)
    edges = np.diff(np.concatenate([[0], data["label"], [0]]))
    sizes = []
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        diff = [
            np.abs(data[c][a:b] - clean[c][a:b]).mean() / s
            for c, s in zip(demo.CHANNELS, demo.NOISE, strict=True)
        ]
        sizes.append(max(diff))
    sizes = np.array(sizes)
    assert 30 <= len(sizes) <= 70
    assert (sizes < 3).mean() > 0.15 and (sizes > 10).mean() > 0.3, np.sort(sizes)


def test_dropouts_are_nan_spans_of_one_channel(long):
    missing = np.column_stack([np.isnan(long[c]) for c in demo.CHANNELS])
    assert (missing.sum(axis=1) <= 1).all()
    assert 0.0005 < missing.any(axis=1).mean() < 0.01
    for channel in range(3):
        edges = np.diff(np.concatenate([[0], missing[:, channel].astype(int), [0]]))
        lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        assert (lengths <= 30).all()
    assert (long["label"][missing.any(axis=1)] == 0).all()
    assert not np.isnan(demo.simulate(45000, seed=7, dropouts=False)["temperature"]).any()


def test_start_up_drift_settles_within_two_hours():
    warm = demo.simulate(2000, seed=3, dropouts=False)
    flat = demo.simulate(2000, seed=3, dropouts=False, startup=False)
    ramp = warm["current"] - flat["current"]
    assert ramp[0] < -3 and abs(ramp[240]) < 0.01  # the load ramps up from zero in minutes
    # less the load's share, temperature and vibration settle slower
    diff = warm["temperature"] - flat["temperature"] - 12 / 14 * ramp
    assert -8.5 < diff[0] < -6  # cold at the first start
    assert -1 < diff[360] < -0.1 and abs(diff[720]) < 0.05  # after 1 h and 2 h
    assert np.all(np.diff(diff[:720]) > 0)  # an exponential approach
    vib = warm["vibration"] - flat["vibration"] - 1.2 / 14 * ramp
    assert 0.05 < vib[0] < 0.2 and abs(vib[720]) < 0.01


def test_restart_after_a_stopping_gap_drifts_again():
    data = demo.simulate(400_000, seed=2)
    flat = demo.simulate(400_000, seed=2, startup=False)
    diff = data["temperature"] - flat["temperature"]
    after_gap = np.flatnonzero(np.diff(data["ts"]) > demo.SAMPLE_S) + 1
    cold = diff[after_gap] < -1
    assert 0 < cold.sum() < len(after_gap)  # some gaps were stops, some gateway outages only
    settled = after_gap[cold][np.diff(np.append(after_gap, 10**9))[cold] > 720] + 720
    assert len(settled) and (np.abs(diff[settled]) < 0.05).all()  # unless another gap came


def test_regimes_day_night_and_recipes():
    data = demo.simulate(8640 * 6, seed=4, anomalies=False)
    hour = (data["ts"] % 86400) / 3600
    night = (hour >= 22) | (hour < 6)
    load = (data["current"] - 8) / 14
    assert np.nanmean(load[night]) < np.nanmean(load[~night]) - 0.1
    plain = demo.simulate(8640 * 6, seed=4, anomalies=False, realism=False)
    offset = data["temperature"] - plain["temperature"]
    assert np.isnan(plain["temperature"]).sum() == 0
    # setpoint shifts of a few degrees, hours long, seen on several days
    assert np.nanmax(offset[2000:]) > 1 and np.nanmin(offset[2000:]) < -1


def test_normal_rows_after_warm_up_stay_plausible():
    data = demo.simulate(200_000, seed=5)
    normal = (data["label"] == 0) & (np.arange(200_000) >= 720)
    bounds = {"temperature": (28, 68), "vibration": (0.1, 2.2), "current": (6, 24)}
    for c, (lo, hi) in bounds.items():
        x = data[c][normal]
        x = x[~np.isnan(x)]
        assert lo < x.min() and x.max() < hi, (c, x.min(), x.max())


def test_a_million_rows_in_a_few_seconds():
    start = time.monotonic()
    data = demo.simulate(1_000_000, start_index=123_456, seed=11)
    assert time.monotonic() - start < 5
    assert len(data["ts"]) == 1_000_000 and np.all(np.diff(data["ts"]) > 0)


def test_write_appends_the_same_timeline_with_nulls(tmp_path):
    db = tmp_path / "readings.db"
    assert demo.write(db, 3000, seed=6) == 3000
    assert demo.write(db, 5500, seed=6) == 8500
    assert demo.write(db, 1, seed=6) == 8501
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute(
            "SELECT id, ts, temperature, vibration, current, label FROM readings ORDER BY id"
        ).fetchall()
        nulls = conn.execute(
            "SELECT count(*) FROM readings WHERE temperature IS NULL OR vibration IS NULL "
            "OR current IS NULL"
        ).fetchone()[0]
        types = conn.execute("SELECT DISTINCT typeof(label) FROM readings").fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == list(range(1, 8502))
    ts = np.array([r[1] for r in rows])
    assert np.all(np.diff(ts) > 0)
    expected = demo.simulate(8501, seed=6)
    got = {
        c: np.array([np.nan if r[i] is None else r[i] for r in rows], float)
        for i, c in enumerate(COLUMNS[:-1], start=1)
    }
    got["label"] = np.array([r[5] for r in rows], np.int64)
    assert same(got, expected)
    assert (
        nulls
        == np.isnan(np.column_stack([expected[c] for c in demo.CHANNELS])).any(axis=1).sum()
        > 0
    )
    assert types == [("integer",)]


def test_write_passes_the_switches(tmp_path):
    db = tmp_path / "clean.db"
    demo.write(db, 9000, seed=6, dropouts=False)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute(
            "SELECT count(*) FROM readings WHERE temperature IS NULL"
        ).fetchone() == (0,)
    finally:
        conn.close()
