"""How much smocsd's SQLite read gets in the way of an ingest writer in rollback-journal mode.

    .venv/bin/python bench/sqlite_lock.py [--rows 200000] [--repeat 3] [--interval 0]
                                          [--writer-timeout 0] [--chunks 8192 2048 512]

A writer process inserts one row per transaction in a loop, pausing --interval seconds
after each, in journal_mode=DELETE with busy timeout --writer-timeout: committing needs an
EXCLUSIVE lock, which it cannot get while a read statement holds SHARED, so with timeout
0 each such attempt fails at once with "database is locked" (the writer then rolls back
and goes on with the next row). Meanwhile smocsd reads the newest --rows rows, as one
statement (the read before chunking) and in chunks of several sizes, each holding SQLite's
lock, and as smocsd does by default: without the lock (sources._LockFree).

Prints one table, per read: rows read, read time (median), the writer's commits and
"database is locked" errors during the reads (summed over --repeat), and the writer's
longest stall: the longest time without a commit, i.e. the busy timeout a writer would
need so that it never fails.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import sqlite3
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

from smocsd.common.config import SourceConfig
from smocsd.data.sources import SourceError, SQLiteSource

CHANNELS = ("temperature", "vibration", "current")


def make_db(path: Path, rows: int) -> None:
    """`rows` readings in journal_mode=DELETE, with a NULL here and there."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(rows, len(CHANNELS)))
    values[rng.random(values.shape) < 0.001] = np.nan
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute(
        "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts REAL, "
        + ", ".join(f"{c} REAL" for c in CHANNELS)
        + ")"
    )
    conn.executemany(
        "INSERT INTO readings (ts, temperature, vibration, current) VALUES (?, ?, ?, ?)",
        (
            (1.7e9 + i, *(None if x != x else x for x in row))
            for i, row in enumerate(values.tolist())
        ),
    )
    conn.commit()
    conn.close()


def writer(path: str, timeout: float, interval: float, stop: Event, report: Connection) -> None:
    """Inserts one row per transaction until `stop`; sends the monotonic times of its
    commits and of its "database is locked" errors."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    commits: list[float] = []
    locked: list[float] = []
    while not stop.is_set():
        try:
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO readings (ts, temperature, vibration, current) "
                "VALUES (?, 1.0, 2.0, 3.0)",
                (time.time(),),
            )
            conn.execute("COMMIT")
            commits.append(time.monotonic())
        except sqlite3.OperationalError as exc:
            if "database is locked" not in str(exc):
                raise
            locked.append(time.monotonic())
            conn.execute("ROLLBACK")
        if interval:
            time.sleep(interval)
    report.send((commits, locked))


def stall(commits: list[float], start: float, end: float) -> float:
    """The longest time without a commit that overlaps [start, end]; `commits` sorted."""
    before = [t for t in commits if t <= start][-1:] or [start]
    inside = [t for t in commits if start < t < end]
    after = [t for t in commits if t >= end][:1] or [end]
    return max(b - a for a, b in itertools.pairwise(before + inside + after))


def measure(path: Path, rows: int, chunk: int, lock_free: bool, args: argparse.Namespace) -> dict:
    """Reads `rows` newest rows `args.repeat` times in chunks of `chunk` while the writer
    writes, without SQLite's lock where it can (`lock_free`) or always with it."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=writer, args=(str(path), args.writer_timeout, args.interval, stop, send)
    )
    proc.start()
    src = SQLiteSource(SourceConfig(path=path, time_column="ts", channels=CHANNELS))
    src.chunk_rows = chunk
    src.lock_free = lock_free
    src.check()  # connecting and checking the columns are not the read
    time.sleep(1.0)  # the writer is up and committing
    windows, read_rows, failed = [], 0, 0
    for _ in range(args.repeat):
        start = time.monotonic()
        try:
            read_rows = len(src.read_newest(rows).order)
        except SourceError:  # "database is locked": the read waited busy_timeout for SHARED
            failed += 1
        windows.append((start, time.monotonic()))
        time.sleep(0.2)
    src.close()
    stop.set()
    commits, locked = receive.recv()
    proc.join()
    return {
        "rows": read_rows,
        "failed": failed,
        "time": statistics.median(end - start for start, end in windows),
        "commits": sum(start < t < end for t in commits for start, end in windows),
        "locked": sum(start < t < end for t in locked for start, end in windows),
        "stall": max(stall(commits, start, end) for start, end in windows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per read")
    parser.add_argument("--repeat", type=int, default=3, help="reads per configuration")
    parser.add_argument(
        "--interval", type=float, default=0.0, help="writer's pause after each attempt (s)"
    )
    parser.add_argument(
        "--writer-timeout", type=float, default=0.0, help="writer's busy timeout (s)"
    )
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[8192, 2048, 512], help="chunk sizes"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readings.db"
        make_db(path, args.rows + 100_000)
        reads = [
            ("locking, one statement", args.rows, False),
            *((f"locking, chunks of {n}", n, False) for n in args.chunks),
            ("lock-free (default)", SQLiteSource.chunk_rows, True),
        ]
        print(
            f"SQLite {sqlite3.sqlite_version}, writer: one row per transaction, "
            f"journal_mode=DELETE, busy timeout {args.writer_timeout * 1e3:g} ms, "
            f"pause {args.interval * 1e3:g} ms; "
            f"yield_ratio {SQLiteSource.yield_ratio}; {args.repeat} reads each"
        )
        print(
            f"{'read':<26}{'rows read':>10}{'read time':>11}{'reads failed':>14}"
            f"{'writer commits':>16}{'locked errors':>15}{'longest stall':>15}"
        )
        for name, chunk, lock_free in reads:
            r = measure(path, args.rows, chunk, lock_free, args)
            print(
                f"{name:<26}{r['rows']:>10}{r['time'] * 1e3:>9.0f}ms{r['failed']:>14}"
                f"{r['commits']:>16}{r['locked']:>15}{r['stall'] * 1e3:>13.1f}ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
