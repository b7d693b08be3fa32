"""The SQLite source: read-only, quoted identifiers, bound values, bad rows as NaN."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from smocsd.config import SourceConfig
from smocsd.sources import SourceError, SQLiteSource


def make_db(path, rows, table="readings", wal=True):
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f'CREATE TABLE "{table}" (id INTEGER PRIMARY KEY, ts REAL, a REAL, "b" REAL)')
    conn.executemany(f'INSERT INTO "{table}" (ts, a, b) VALUES (?, ?, ?)', rows)
    conn.commit()
    return conn


def source(path, **kw) -> SQLiteSource:
    return SQLiteSource(SourceConfig(path=path, channels=("a", "b"), **kw))


def test_reads_newest_rows_oldest_first(tmp_path):
    db = tmp_path / "r.db"
    make_db(db, [(i, i * 1.0, i * 2.0) for i in range(100)]).close()
    src = source(db)
    got = src.read_newest(10)
    assert list(got.order) == list(range(91, 101))  # rowid 1..100
    np.testing.assert_array_equal(got.values[:, 0], np.arange(90, 100))
    assert src.count_after(None) == 100
    assert src.count_after(95) == 5


def test_bad_values_become_nan_and_are_flagged(tmp_path):
    db = tmp_path / "r.db"
    rows = [
        (0, 1.0, 1.0),
        (1, None, 1.0),
        (2, "oops", 1.0),
        (3, float("inf"), 1.0),
        (4, 2.0, b"\x00"),
        (5, 3.0, 4),
    ]
    make_db(db, rows).close()
    got = source(db).read_newest(100)
    assert list(got.bad_rows) == [False, True, True, True, True, False]
    assert got.values[5].tolist() == [3.0, 4.0]


def test_source_is_read_only_and_reads_while_the_writer_writes(tmp_path):
    db = tmp_path / "r.db"
    writer = make_db(db, [(0, 1.0, 1.0)])
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO readings (ts, a, b) VALUES (1, 2, 3)")
    src = source(db, busy_timeout=1)
    assert src.count_after(None) == 1  # WAL: the reader sees the last commit, no waiting
    writer.commit()
    assert src.count_after(None) == 2
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        src._connect().execute("DELETE FROM readings")


def test_identifiers_are_quoted_and_values_bound(tmp_path):
    db = tmp_path / "r.db"
    make_db(db, [(i, i, i) for i in range(5)], table="select").close()
    src = source(db, table="select", order_column="id")
    assert src.count_after(2) == 3
    assert src.read_newest(2).order.tolist() == [4, 5]


def test_missing_database_and_table_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="no such database file"):
        source(tmp_path / "absent.db").count_after(None)
    make_db(tmp_path / "r.db", []).close()
    with pytest.raises(SourceError, match="no such table: nope"):
        source(tmp_path / "r.db", table="nope").count_after(None)


def test_empty_table(tmp_path):
    make_db(tmp_path / "r.db", []).close()
    got = source(tmp_path / "r.db").read_newest(10)
    assert got.values.shape == (0, 2) and got.order.shape == (0,)
