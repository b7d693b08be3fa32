"""The durable queue of results that no broker has acknowledged yet.

Every result is written here first and leaves only once a sink acknowledged it, so a
crash, a reboot or a week-long broker outage loses nothing. The queue is a SQLite file
in the state directory, shared by the daemon and `smocsd outbox flush`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("smocsd.outbox")

DROPPED_FIELD = "outbox_dropped"
# Results handed to one deliver() call: big enough to batch Kafka produces, small
# enough that one bounded attempt does not grow with the backlog.
FLUSH_BATCH = 100

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0)",
)


class Outbox:
    """A capped FIFO of result dicts in a SQLite file; `put()` is durable on return."""

    def __init__(self, path: Path, max_messages: int = 10000) -> None:
        if max_messages < 1:
            raise ValueError(f"outbox cap must be at least 1, not {max_messages}")
        self.path = path
        self.max_messages = max_messages
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        # Autocommit mode: every write below is one explicit BEGIN IMMEDIATE..COMMIT,
        # and the busy timeout lets the daemon and the CLI take turns on the file.
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
        with self._write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
        if created:  # SQLite syncs its journals' directory entries, not the database's own
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front so that a concurrent
        writer waits on the busy timeout instead of failing on lock upgrade."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def put(self, message: dict) -> None:
        """Append `message` durably; when that exceeds the cap, drop the oldest loudly."""
        body = json.dumps(message, separators=(",", ":"), allow_nan=False)
        with self._write() as db:
            db.execute(
                "INSERT INTO messages (message_id, body) VALUES (?, ?)",
                (str(message["message_id"]), body),
            )
            (count,) = db.execute("SELECT COUNT(*) FROM messages").fetchone()
            excess = count - self.max_messages
            if excess > 0:
                oldest = db.execute(
                    "SELECT seq, message_id FROM messages ORDER BY seq LIMIT ?", (excess,)
                ).fetchall()
                db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s, _ in oldest])
                dropped = [message_id for _, message_id in oldest]
                db.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (len(dropped),)
                )
        if excess > 0:
            named = ", ".join(dropped[:5]) + (
                f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
            )
            log.error(
                "outbox %s full (%d results): dropped the %d oldest undelivered "
                "result(s) %s; the count goes out with the next delivered result",
                self.path,
                self.max_messages,
                len(dropped),
                named,
            )

    def _rows(self, limit: int | None) -> list[tuple[int, dict]]:
        rows = self._db.execute(
            "SELECT seq, body FROM messages ORDER BY seq LIMIT ?", (-1 if limit is None else limit,)
        ).fetchall()
        return [(seq, json.loads(body)) for seq, body in rows]

    def pending(self, limit: int | None = None) -> list[dict]:
        """Undelivered results, oldest first."""
        return [message for _, message in self._rows(limit)]

    @property
    def dropped(self) -> int:
        """Results dropped by the cap whose count no delivered result has carried yet."""
        return self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def flush(self, deliver: Callable[[list[dict]], list[str | None]]) -> int:
        """Hand pending results to `deliver`, oldest first, in batches; remove those it
        acknowledged. Stops at the first batch with a failure (the sinks are down, and
        the next tick retries). Returns how many were delivered.

        The count of results dropped by the cap rides on the oldest result of a batch as
        `outbox_dropped`, and is cleared only once that result is acknowledged.
        """
        delivered = 0
        with self._flush_lock():
            while rows := self._rows(FLUSH_BATCH):
                messages = [message for _, message in rows]
                carried = self.dropped
                if carried:
                    messages[0] = {**messages[0], DROPPED_FIELD: carried}
                sinks = deliver(messages)
                acked = [seq for (seq, _), sink in zip(rows, sinks, strict=True) if sink]
                with self._write() as db:
                    db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in acked])
                    if carried and sinks[0]:
                        db.execute(
                            "UPDATE counters SET value = MAX(value - ?, 0) WHERE name = 'dropped'",
                            (carried,),
                        )
                delivered += len(acked)
                if len(acked) < len(rows):
                    break
        return delivered

    @contextlib.contextmanager
    def _flush_lock(self) -> Iterator[None]:
        """Serialize flushes across processes, so the daemon's tick and `outbox flush`
        do not send the same results twice. The lock is a file of its own: closing any
        other descriptor of the database file would drop SQLite's POSIX locks on it."""
        fd = os.open(
            self.path.with_name(self.path.name + ".flush-lock"), os.O_RDONLY | os.O_CREAT, 0o644
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        self._db.close()
