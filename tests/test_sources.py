"""The SQLite source: read-only, any column name quoted, bound values, bad rows as NaN,
times as epoch seconds, configured columns checked once per connection, reads in chunks
that leave a rollback-journal writer room to commit."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from smocsd.common.config import SourceConfig
from smocsd.data.sources import NoDatabase, Readings, SourceError, SQLiteSource, quote

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
    for absent in (tmp_path / "absent.db", tmp_path / "no-dir" / "r.db"):
        with pytest.raises(NoDatabase) as missing:
            source(absent).count_after(None)
        assert str(missing.value) == (
            f"{absent}: no such database file (source.path); waiting for the ingest to create it"
        )
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


def checked_source(db: Path) -> SQLiteSource:
    """A one-row database's source, its connection open and its columns checked."""
    make_db(db, [(0, 1.0, 1.0)]).close()
    src = source(db)
    src.count_after(None)
    return src


def traced(src: SQLiteSource) -> list[str]:
    """The statements `src` runs on its connection from now on, as SQLite sees them."""
    statements: list[str] = []
    src._connect().set_trace_callback(statements.append)
    return statements


def test_columns_are_checked_once_per_connection(tmp_path):
    src = checked_source(tmp_path / "r.db")
    statements = traced(src)
    src.count_after(None)
    src.read_newest(10)
    assert len(statements) == 3  # count, max(order), one chunk
    assert not any("pragma" in s or "EXPLAIN" in s for s in statements)
    src.close()
    reconnected = traced(src)
    src.count_after(None)
    assert "pragma_table_info" in reconnected[0]


def test_max_order_is_the_newest_order_value(tmp_path):
    db = tmp_path / "r.db"
    conn = make_db(db, [])
    assert source(db).max_order() is None
    conn.executemany("INSERT INTO readings (ts, a, b) VALUES (?, ?, ?)", [(0, 1, 1)] * 3)
    conn.execute("DELETE FROM readings WHERE id = 3")
    conn.commit()
    conn.close()
    assert source(db).max_order() == 2
    assert source(db, order_column="id").max_order() == 2


def test_check_checks_the_table_and_columns_again(tmp_path):
    db = tmp_path / "r.db"
    src = checked_source(db)
    statements = traced(src)
    src.check()
    assert any("pragma_table_info" in s for s in statements)
    with pytest.raises(SourceError) as exc:
        source(db, channels=("a", "c")).check()
    assert str(exc.value) == f'{db}: no such column "c" in table readings (source.channels)'
    with pytest.raises(NoDatabase):
        source(tmp_path / "absent.db").check()


def child_error(src: SQLiteSource) -> str:
    """src.check()'s error in a child process that is not root (root may read anything)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = "no error"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)  # nogroup
                os.setuid(65534)  # nobody
            src.check()
        except Exception as exc:
            message = str(exc)
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as result:
        message = result.read()
    os.waitpid(pid, 0)
    return message


def test_unreadable_paths_are_errors_naming_the_file(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(SourceError) as exc:
        source(tmp_path / "dir.db").check()
    assert (
        str(exc.value)
        == f"{tmp_path / 'dir.db'}: is a directory, not a database file (source.path)"
    )
    shared = Path(tempfile.mkdtemp())  # not under tmp_path, which is root's alone
    try:
        shared.chmod(0o755)
        make_db(shared / "locked.db", [(0, 1.0, 1.0)]).close()
        (shared / "locked.db").chmod(0)
        (shared / "private").mkdir(mode=0o700)
        make_db(shared / "private" / "r.db", [(0, 1.0, 1.0)]).close()
        for path in (shared / "locked.db", shared / "private" / "r.db"):
            assert child_error(source(path)) == (
                f"{path}: unable to open database file: Permission denied"
            )
    finally:
        shutil.rmtree(shared)


def one_statement(src: SQLiteSource, max_rows: int) -> np.ndarray:
    """read_newest's rows as read before chunking, in one statement: order, time, channels."""
    src.check()  # sets the time expression
    cols = ", ".join(
        f"CASE WHEN typeof({quote(c)}) IN ('integer', 'real') THEN {quote(c)} END"
        for c in src.cfg.channels
    )
    rows = (
        src._connect()
        .execute(
            f"SELECT * FROM (SELECT {src.order}, {src._time}, {cols} FROM {src.table} "
            f"ORDER BY {src.order} DESC LIMIT ?) ORDER BY 1",
            (max_rows,),
        )
        .fetchall()
    )
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(src.cfg.channels) + 2)


def assert_same(got, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(got.order, expected[:, 0])
    time = expected[:, 1]
    np.testing.assert_array_equal(got.time, np.where(np.isfinite(time), time, np.nan))
    np.testing.assert_array_equal(got.values, expected[:, 2:])


def test_chunked_reads_equal_the_one_statement_read(tmp_path):
    """Any chunk size gives the rows one statement gave: newest, oldest first, NULLs and
    non-numbers as NaN in scattered channels, times converted, gaps in the order column."""
    db = tmp_path / "r.db"
    times = (T0, int(T0 * 1000), "2026-01-01 00:00:01", None, "now", float("inf"))
    values = (1.5, None, "oops", float("inf"), 7, b"\x00", -2.25)
    rows = [(times[i % 6], values[i % 7], values[(i * 3 + 1) % 7]) for i in range(25)]
    conn = make_db(db, rows, wal=False)
    conn.execute("DELETE FROM readings WHERE id IN (5, 6, 24)")
    conn.commit()
    conn.close()
    src = source(db)
    src.yield_ratio = 0.0
    for max_rows in (1, 4, 21, 22, 23, 30):
        expected = one_statement(src, max_rows)
        for chunk in (1, 2, 3, 5, 21, 22, 23, 1024):
            src.chunk_rows = chunk
            got = src.read_newest(max_rows)
            assert_same(got, expected)
    assert np.isnan(got.values).any(axis=1).sum() > 5 and not got.bad_rows.all()


def test_a_non_unique_order_column_reads_each_row_once(tmp_path):
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE readings (seq INTEGER, ts REAL, a REAL, b REAL)")
    conn.execute("CREATE INDEX by_seq ON readings (seq)")
    conn.executemany(
        "INSERT INTO readings VALUES (?, ?, ?, ?)", [(i // 4, T0, i, None) for i in range(30)]
    )
    conn.commit()
    conn.close()
    src = source(db, order_column="seq")
    src.yield_ratio = 0.0
    for chunk in (1, 2, 3, 5, 8, 1024):
        src.chunk_rows = chunk
        for max_rows in (4, 12, 14, 30, 40):
            got = src.read_newest(max_rows)
            assert len(got.order) == min(max_rows, 30)
            assert (np.diff(got.order) >= 0).all()
            assert len(set(got.values[:, 0])) == len(got.order)  # no row twice
            if max_rows % 4 == 0:  # no group of equal values cut: the rows are defined
                assert sorted(got.values[:, 0]) == list(range(30 - min(max_rows, 30), 30))


@pytest.mark.parametrize("indexed", [True, False])
def test_text_or_a_blob_in_the_order_column_is_left_out_with_one_warning(tmp_path, caplog, indexed):
    """SQLite sorts text and blobs above every number: such a row was the newest of every
    read, and every cycle and every scoring poll failed converting it to a number."""
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE readings (seq INTEGER, ts REAL, a REAL, b REAL, asset)")
    if indexed:
        conn.execute("CREATE INDEX by_seq ON readings (seq)")
    rows = [(i, T0 + i, float(i), 1.0) for i in range(1, 21)]
    rows += [("x", T0, 99.0, 1.0), (b"\x01", T0, 99.0, 1.0), (None, T0, 99.0, 1.0)]
    rows += [(1e300, T0, 99.0, 1.0)]  # beyond int64
    conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, 'pump')", rows)
    conn.commit()
    conn.close()
    src = source(db, order_column="seq", partition_column="asset")
    src.chunk_rows = 3
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        got = src.read_newest(100)
        assert got.order.tolist() == list(range(1, 21))
        assert 99.0 not in got.values[:, 0]
        assert src.read_newest(5, upto=10).order.tolist() == [6, 7, 8, 9, 10]
        assert (src.min_order(), src.max_order()) == (1, 20)
        assert src.count_after(None) == 20 and src.count_after(15) == 5
        newest, tags = src.read_tagged(18, 10)  # live scoring's read of every partition
        assert newest.order.tolist() == [19, 20] and tags == ["pump", "pump"]
    warnings = [r.getMessage() for r in caplog.records if "order value" in r.getMessage()]
    assert warnings == [  # once per connection, naming file, table and column
        f"{db}: 3 rows of table readings have no integer order value (text or a blob in "
        'column "seq") and are left out: source.order_column must be an integer column'
    ]


def test_without_an_index_on_the_order_column_the_read_is_one_statement(tmp_path, caplog):
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE readings (seq INTEGER, ts REAL, a REAL, b REAL)")
    conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", [(i, T0, i, i) for i in range(9)])
    conn.commit()
    conn.close()
    src = source(db, order_column="seq")
    src.chunk_rows = 2
    src.lock_free = False  # the statements as the locking reads run them, traced
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        src.check()
    assert 'no index on "seq" of table readings' in caplog.text
    statements = traced(src)
    assert src.read_newest(5).order.tolist() == [4, 5, 6, 7, 8]
    assert len(statements) == 2  # max(seq), then all five rows at once


# An ingest: one row per transaction and a millisecond's pause, in rollback-journal mode,
# waiting at most argv[2] seconds for its lock. On SIGTERM it prints its commits and its
# "database is locked" errors.
WRITER = """
import signal, sqlite3, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
conn = sqlite3.connect(sys.argv[1], timeout=float(sys.argv[2]), isolation_level=None)
conn.execute("PRAGMA journal_mode=DELETE")
conn.execute("INSERT INTO readings (ts, a, b) VALUES (0, 1, 2)")
print("ready", flush=True)
commits = locked = 0
while not stop:
    try:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO readings (ts, a, b) VALUES (0, 1, 2)")
        conn.execute("COMMIT")
        commits += 1
    except sqlite3.OperationalError as exc:
        if "database is locked" not in str(exc):
            raise
        locked += 1
        conn.execute("ROLLBACK")
    time.sleep(0.001)
print(commits, locked)
"""


def while_writing(db, timeout: float, read: Callable[[], Readings]) -> tuple[Readings, int, int]:
    """read() while WRITER writes: its result, the writer's commits and locked errors."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(timeout)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline() == "ready\n"
        got = read()
    finally:
        writer.terminate()
        out, _ = writer.communicate(timeout=60)
    commits, locked = map(int, out.split())
    return got, commits, locked


# Reads tried until the writer has overlapped them: a loaded machine may schedule it late.
ATTEMPTS = 20


def assert_newest_snapshot(got: Readings, n: int) -> None:
    """The newest `n` rows when the read began, each once; the file's rows with a hole are
    bad and the writer's rows (above 210 000, as many as its pace allowed) never are."""
    assert len(got.order) == n and (np.diff(got.order) == 1).all()
    assert got.order[0] > 10_000
    made = got.order <= 210_000
    holed = (got.order - 1) % 97 == 0
    assert (got.bad_rows == (made & holed)).all()
    assert (np.isnan(got.values[made, 1]) == holed[made]).all()


def test_a_writer_that_never_waits_is_never_locked_out(tmp_path):
    """A rollback-journal writer with busy timeout 0 fails whenever a reader holds SHARED
    at its commit: smocsd's reads take no lock, and are still consistent snapshots."""
    db = tmp_path / "r.db"
    rows = ((T0 + i, i, None if i % 97 == 0 else i) for i in range(210_000))
    make_db(db, rows, wal=False).close()
    src = source(db)
    src.check()
    overlapped = 0
    for _ in range(ATTEMPTS):  # reads the writer committed during: how many is its pace
        got, commits, locked = while_writing(db, 0, lambda: src.read_newest(200_000))
        assert locked == 0
        overlapped += commits > 0
        assert_newest_snapshot(got, 200_000)
        if overlapped == 3:
            break
    assert overlapped == 3
    assert src.count_after(None) >= 210_000 and src.max_order() >= 210_000
    src.close()
    locking = source(db)
    locking.lock_free = False  # as before: SHARED held while reading
    locking.chunk_rows = 200_000
    assert any(
        while_writing(db, 0, lambda: locking.read_newest(200_000))[2] > 0 for _ in range(ATTEMPTS)
    )


def test_a_chunked_read_never_keeps_a_rollback_journal_writer_waiting_long(tmp_path):
    """Where the lock must be taken (a writer that never pauses), a writer that waits
    50 ms for its lock never fails during a 200 000-row read, which as one statement
    holds SHARED for longer and makes the same writer fail."""
    db = tmp_path / "r.db"
    rows = ((T0 + i, i, None if i % 97 == 0 else i) for i in range(210_000))
    make_db(db, rows, wal=False).close()
    src = source(db)
    src.lock_free = False
    src.check()
    for _ in range(ATTEMPTS):
        got, commits, locked = while_writing(db, 0.05, lambda: src.read_newest(200_000))
        assert locked == 0
        assert_newest_snapshot(got, 200_000)
        if commits:
            break
    assert commits > 0
    src.chunk_rows = 200_000  # one statement, as before chunking
    assert any(
        while_writing(db, 0.05, lambda: src.read_newest(200_000))[2] > 0 for _ in range(ATTEMPTS)
    )


# One model per asset: source.partition_column.


def make_assets(path, declared: str, assets: tuple, index: bool = True) -> None:
    """Rows id 1..30 whose asset cycles through `assets`; a and b are the id and 2 * id."""
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE readings (id INTEGER PRIMARY KEY, asset {declared}, ts, a, b)")
    if index:
        conn.execute("CREATE INDEX by_asset ON readings (asset, id)")
    conn.executemany(
        "INSERT INTO readings VALUES (?, ?, ?, ?, ?)",
        [(i, assets[i % len(assets)], T0 + i, i, 2 * i) for i in range(1, 31)],
    )
    conn.commit()
    conn.close()


def asset_source(path, partition: str | None = None, **kw) -> SQLiteSource:
    return source(path, order_column="id", partition_column="asset", partition=partition, **kw)


# (declared type, values stored, (partition, its ids)): an INTEGER column's 7 is the model
# "7"; a column of no type holds 7 and "7" alike, and both are model "7".
ASSETS = {
    "integer": ("INTEGER", (7, 8, "9"), ("7", range(3, 31, 3))),
    "text": ("TEXT", ("pump-1", "pump-2", 7), ("7", range(2, 31, 3))),
    "untyped": ("", (7, "7", "x"), ("7", [i for i in range(1, 31) if i % 3 != 2])),
}


@pytest.mark.parametrize("kind", list(ASSETS))
def test_a_partition_reads_only_its_rows(tmp_path, kind, caplog):
    declared, assets, (value, ids) = ASSETS[kind]
    make_assets(tmp_path / "r.db", declared, assets)
    ids = list(ids)
    src = asset_source(tmp_path / "r.db", value)
    src.chunk_rows = 2  # several chunks, each of the partition's rows only
    src.yield_ratio = 0.0
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        assert src.count_after(None) == len(ids)
    # Indexed: not even a column of no type, whose two forms make the chunks sort the
    # partition's rows (so the read is one statement), is warned about.
    assert caplog.messages == []
    assert src.count_after(ids[-3]) == 2
    assert (src.min_order(), src.max_order()) == (ids[0], ids[-1])
    got = src.read_newest(5)
    assert got.order.tolist() == ids[-5:]
    assert got.values[:, 0].tolist() == ids[-5:]
    assert got.time.tolist() == [T0 + i for i in ids[-5:]]
    assert asset_source(tmp_path / "r.db", "nobody").max_order() is None
    assert asset_source(tmp_path / "r.db").count_after(None) == 30  # no partition: all rows


def test_read_newest_up_to_an_order_value(tmp_path):
    make_assets(tmp_path / "r.db", "INTEGER", (7, 8))
    src = asset_source(tmp_path / "r.db", "8")  # the odd ids
    src.chunk_rows = 2
    src.yield_ratio = 0.0
    assert src.read_newest(3, upto=21).order.tolist() == [17, 19, 21]
    assert src.read_newest(3, upto=20).order.tolist() == [15, 17, 19]
    assert src.read_newest(3, upto=0).order.tolist() == []
    assert source(tmp_path / "r.db").read_newest(2, upto=10).order.tolist() == [9, 10]


def plan(src: SQLiteSource, sql: str, params: tuple) -> str:
    rows = src._connect().execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    return "\n".join(row[3] for row in rows)


@pytest.mark.parametrize("kind", ["integer", "text"])
def test_a_declared_partition_column_is_read_through_its_index(tmp_path, kind):
    """A text value bound against an INTEGER column takes the column's affinity, so "7"
    finds 7 through the index, and the chunks need no sort."""
    declared, assets, (value, _) = ASSETS[kind]
    make_assets(tmp_path / "r.db", declared, assets)
    src = asset_source(tmp_path / "r.db", value)
    src.check()
    assert src._keyset
    select, params = src._select()
    chunk = plan(src, select, (*params, 30, 2, 0))
    assert "USING INDEX by_asset (asset=? AND id<?)" in chunk and "TEMP B-TREE" not in chunk
    count = plan(src, *src._bind(f"SELECT count(*) FROM readings{src._where()[0]}", params))
    assert "COVERING INDEX by_asset (asset=? AND id<?)" in count


def test_partitions_are_the_distinct_values_of_the_whole_table(tmp_path):
    make_assets(tmp_path / "r.db", "", (7, "7", "pump-1", None, 2.5))
    src = asset_source(tmp_path / "r.db", "pump-1")  # a model's source lists them all too
    got = src.partitions()
    assert sorted(got, key=repr) == sorted([7, "7", "pump-1", 2.5], key=repr)
    column = quote("asset")
    sql = f"SELECT DISTINCT {column} FROM readings WHERE {column} IS NOT NULL"
    assert "TEMP B-TREE" not in plan(src, sql, ())  # DISTINCT walks the index
    assert "COVERING INDEX by_asset" in plan(src, sql, ())
    with pytest.raises(NoDatabase):
        asset_source(tmp_path / "absent.db").partitions()


def test_read_tagged_reads_the_newest_rows_of_every_partition(tmp_path):
    db = tmp_path / "r.db"
    make_assets(db, "", (7, "pump-1", None))
    conn = sqlite3.connect(db)
    conn.execute("UPDATE readings SET a = 'oops', ts = NULL WHERE id = 29")
    conn.execute("UPDATE readings SET b = NULL WHERE id = 28")
    conn.commit()
    conn.close()
    src = asset_source(db, "7")  # a model's source reads all partitions' rows here
    got, tags = src.read_tagged(25, 100)
    assert got.order.tolist() == [26, 27, 28, 29, 30]
    assert tags == [None, 7, "pump-1", None, 7]
    assert got.values[0].tolist() == [26.0, 52.0]
    assert got.bad_rows.tolist() == [False, False, True, True, False]
    assert np.isnan(got.time[3]) and got.time[4] == T0 + 30
    newest, tags = src.read_tagged(None, 3)  # at most the newest max_rows, oldest first
    assert newest.order.tolist() == [28, 29, 30] and tags == ["pump-1", None, 7]
    empty, tags = src.read_tagged(30, 10)
    assert empty.values.shape == (0, 2) and tags == []


def test_a_partition_column_without_an_index_is_warned_once(tmp_path, caplog):
    db = tmp_path / "r.db"
    make_assets(db, "INTEGER", (7, 8), index=False)
    src = asset_source(db, "7")
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        src.count_after(None)
        src.close()
        src.check()  # a new connection checks the columns again, but does not warn again
        assert src.read_newest(2).order.tolist() == [28, 30]
    warnings = [r.getMessage() for r in caplog.records if "asset" in r.getMessage()]
    assert warnings == [
        f'{db}: no index on "asset" of table readings: each model\'s reads scan the whole '
        'table; CREATE INDEX "readings_asset" ON "readings" ("asset", "id")'
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        source(db, partition_column="asset").partitions()  # rowid order: it is implicit
    assert caplog.messages[-1].endswith('ON "readings" ("asset")')
    caplog.clear()
    make_assets(tmp_path / "i.db", "INTEGER", (7, 8))
    conn = sqlite3.connect(db)
    conn.execute("CREATE VIEW plant AS SELECT * FROM readings")  # its table's indexes count
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        asset_source(tmp_path / "i.db", "7").read_newest(5)
        asset_source(tmp_path / "i.db").partitions()
        assert asset_source(db, "7", table="plant").count_after(None) == 15
    assert caplog.messages == []


def test_a_missing_partition_column_names_the_key(tmp_path):
    db = tmp_path / "r.db"
    make_db(db, [(0, 1.0, 1.0)]).close()
    with pytest.raises(SourceError) as exc:
        source(db, partition_column="Asset ID").partitions()
    assert str(exc.value) == (
        f'{db}: no such column "Asset ID" in table readings (source.partition_column)'
    )


def test_importing_the_sources_does_not_import_numpy():
    """The daemon counts and lists partitions, and loads numpy only to score or train."""
    code = "import smocsd.data.sources, sys; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
