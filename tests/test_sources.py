"""The SQLite source: read-only, any column name quoted, bound values, bad rows as NaN,
times as epoch seconds, configured columns checked once per connection."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from smocsd.config import SourceConfig
from smocsd.sources import SourceError, SQLiteSource, quote

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_db(path, rows, table="readings", wal=True):
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f'CREATE TABLE "{table}" (id INTEGER PRIMARY KEY, ts, a REAL, "b" REAL)')
    conn.executemany(f'INSERT INTO "{table}" (ts, a, b) VALUES (?, ?, ?)', rows)
    conn.commit()
    return conn


def source(path, **kw) -> SQLiteSource:
    return SQLiteSource(SourceConfig(path=path, **{"channels": ("a", "b"), **kw}))


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
    with pytest.raises(SourceError) as exc:
        source(tmp_path / "r.db", table="nope").count_after(None)
    assert str(exc.value) == f"{tmp_path / 'r.db'}: no such table nope (source.table)"


def test_empty_table(tmp_path):
    make_db(tmp_path / "r.db", []).close()
    got = source(tmp_path / "r.db").read_newest(10)
    assert got.values.shape == (0, 2) and got.order.shape == (0,) and got.time.shape == (0,)


def test_quote_doubles_embedded_double_quotes():
    assert quote('say "hi"') == '"say ""hi"""'
    assert quote("Température °C") == '"Température °C"'


# Names as plant historians write them, plus the characters SQL and drivers care about.
ODD = ("Volume Flow RateRMS", "Température °C", "Pump-3 Current (A)", 'say "hi"', "Load % ?")


def test_any_column_name_is_read(tmp_path):
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    names = ("Row No", "Time Stamp", *ODD)
    conn.execute(f"CREATE TABLE readings ({', '.join(quote(n) for n in names)})")
    conn.executemany(
        f"INSERT INTO readings VALUES ({', '.join('?' * len(names))})",
        [(i, T0 + i, *(i * 10.0 + c for c in range(len(ODD)))) for i in range(1, 6)],
    )
    conn.commit()
    conn.close()
    src = SQLiteSource(
        SourceConfig(path=db, time_column="Time Stamp", order_column="Row No", channels=ODD)
    )
    assert src.count_after(3) == 2
    got = src.read_newest(3)
    assert got.order.tolist() == [3, 4, 5]
    assert got.time.tolist() == [T0 + 3, T0 + 4, T0 + 5]
    assert got.values[0].tolist() == [30.0, 31.0, 32.0, 33.0, 34.0]


def test_a_missing_column_is_one_line_naming_column_and_key(tmp_path):
    db = tmp_path / "r.db"
    make_db(db, [(0, 1.0, 1.0)]).close()
    cases = [
        ({"channels": ("a", "Pump-3 Current (A)")}, '"Pump-3 Current (A)"', "source.channels"),
        ({"time_column": "time"}, '"time"', "source.time_column"),
        ({"order_column": 'x"y'}, '"x""y"', "source.order_column"),
    ]
    for kw, shown, key in cases:
        src = source(db, **kw)
        with pytest.raises(SourceError) as exc:
            src.count_after(None)  # checked before the first count, not only before reads
        assert str(exc.value) == f"{db}: no such column {shown} in table readings ({key})"


def test_column_case_follows_sqlite(tmp_path):
    """SQLite matches names ignoring ASCII case only, so "A" reads column a, while a
    name differing in non-ASCII case is missing and the error names the near match."""
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    conn.execute('CREATE TABLE readings (ts REAL, "Température" REAL, b REAL)')
    conn.execute("INSERT INTO readings VALUES (1, 2, 3)")
    conn.commit()
    conn.close()
    got = source(db, time_column="TS", channels=("tEMPérature", "B")).read_newest(5)
    assert got.values.tolist() == [[2.0, 3.0]]
    with pytest.raises(SourceError) as exc:
        source(db, channels=("TEMPÉRATURE", "b")).read_newest(5)
    assert str(exc.value) == (
        f'{db}: no such column "TEMPÉRATURE" in table readings (source.channels); '
        'did you mean "Température"?'
    )


def test_rowid_may_be_named_explicitly(tmp_path):
    make_db(tmp_path / "r.db", [(0, 1.0, 1.0)]).close()
    assert source(tmp_path / "r.db", order_column="rowid").read_newest(5).order.tolist() == [1]


def test_times_become_epoch_seconds(tmp_path):
    db = tmp_path / "r.db"
    times = [
        (T0, T0),  # epoch seconds, real
        (int(T0), T0),  # ... integer
        (int(T0 * 1000) + 250, T0 + 0.25),  # epoch milliseconds
        ("2026-01-01 00:00:00", T0),  # naive text is UTC
        ("2026-01-01T00:00:01.5", T0 + 1.5),
        ("2026-01-01T02:00:00+02:00", T0),  # offsets as SQLite's julianday() reads them
        ("2026-01-01T00:00:00.123Z", T0 + 0.123),
        ("2026-01-01", T0),
        (None, None),
        ("yesterday", None),
        ("now", None),  # julianday() would take it as the current time
        ("2460000.5", None),  # ... and this as a Julian day number
        ("2026-13-01 00:00:00", None),
        (b"\x01", None),
        (float("inf"), None),
    ]
    make_db(db, [(ts, 1.0, 1.0) for ts, _ in times]).close()
    got = source(db).read_newest(100)
    expected = [np.nan if t is None else t for _, t in times]
    np.testing.assert_allclose(got.time, expected, rtol=0, atol=1e-6)
    assert not got.bad_rows.any()  # a missing time is not a bad value


def test_columns_are_checked_once_per_connection(tmp_path):
    db = tmp_path / "r.db"
    make_db(db, [(0, 1.0, 1.0)]).close()
    src = source(db)
    src.count_after(None)
    statements: list[str] = []
    src._connect().set_trace_callback(statements.append)
    src.count_after(None)
    src.read_newest(10)
    assert len(statements) == 2 and not any("pragma" in s for s in statements)
    src.close()
    src._connect().set_trace_callback(statements.append)
    src.count_after(None)
    assert "pragma_table_info" in statements[2]
