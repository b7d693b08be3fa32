"""The durable queue of results that no broker has acknowledged yet.

Every result is written here first and leaves only once a sink acknowledged it, so a
crash, a reboot or a week-long broker outage loses nothing. The queue is a SQLite file
in the state directory, shared by the daemon and `smocsd outbox flush`; `smocsd status`
and `smocsd outbox list` read it with `Outbox.open_readonly()`.

The file also records every (model, version) whose result was ever put, so that the
daemon can tell a saved version whose result never made it into the queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

from .store import fsync_path

__all__ = ["DROPPED_FIELD", "FLUSH_BATCH", "Outbox", "OutboxError", "json_safe"]

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
    # Outboxes from before this table start with it empty.
    "CREATE TABLE IF NOT EXISTS reported ("
    " model TEXT, version INTEGER, PRIMARY KEY (model, version))",
)
# The columns of the tables above: a file whose tables of these names differ is not ours.
_COLUMNS = {
    "messages": ["seq", "message_id", "body"],
    "counters": ["name", "value"],
    "reported": ["model", "version"],
}

# The database and the journals SQLite keeps beside it, in WAL mode.
_FILES = ("", "-wal", "-shm")

_P = ParamSpec("_P")
_R = TypeVar("_R")


class OutboxError(Exception):
    """An outbox operation failed; the message starts with the outbox file's path."""


def json_safe(obj: Any) -> Any:
    """A copy of `obj` that JSON can encode: non-finite floats (NaN, ±inf) become None,
    numpy scalars and arrays plain numbers and lists."""
    return _json_safe(obj, "", [])


def _json_safe(obj: Any, where: str, replaced: list[str]) -> Any:
    """json_safe(), appending the dotted path of every replaced number to `replaced`."""
    if isinstance(obj, dict):
        return {
            k: _json_safe(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    if isinstance(obj, float):  # numpy.float64 too, a subclass
        if math.isfinite(obj):
            return float(obj)
        replaced.append(where)
        return None
    if not isinstance(obj, (str, int)) and hasattr(obj, "tolist"):
        # numpy's other scalars and its arrays, recognized without importing numpy
        return _json_safe(obj.tolist(), where, replaced)
    return obj


def _naming_the_file(
    method: Callable[Concatenate[Outbox, _P], _R],
) -> Callable[Concatenate[Outbox, _P], _R]:
    """Turns the SQLite errors `method` raises into OutboxError naming the file: SQLite's
    own messages ("unable to open database file") do not say which file."""

    @functools.wraps(method)
    def wrapper(self: Outbox, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: {exc}") from exc

    return wrapper


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether `exc` says the file is corrupt or not a database. Python raises exactly
    DatabaseError for SQLITE_CORRUPT and SQLITE_NOTADB, and its subclasses for what a
    healthy file can meet too (busy, I/O, permissions, a full disk)."""
    return type(exc) is sqlite3.DatabaseError


def _damage(db: sqlite3.Connection) -> str | None:
    """Why the file behind `db` is not a usable outbox, or None if it is. These are the
    first queries on every open."""
    try:
        for table, columns in _COLUMNS.items():
            found = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            if found and found != columns:  # [] when there is no such table yet
                return f"not an outbox: its table {table} has columns {', '.join(found)}"
        (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise
        return str(exc)
    return None if check == "ok" else check


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `path`, None if there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Outbox:
    """A capped FIFO of result dicts in a SQLite file; `put()` is durable on return.

    A file found corrupt (or holding another program's tables) when opened or written
    to is moved aside to `outbox.db.corrupt-<UTC time>` and a new one started. A file
    deleted or replaced while open is noticed by the next operation, which reopens the
    path. SQLite errors are raised as OutboxError naming the file.
    """

    def __init__(self, path: Path, max_messages: int = 10000, *, readonly: bool = False) -> None:
        """Opens `path` for reading and writing, creating it; `readonly`: see
        open_readonly()."""
        if max_messages < 1:
            raise ValueError(f"outbox cap must be at least 1, not {max_messages}")
        self.path = path
        self.max_messages = max_messages
        self.readonly = readonly
        self._attach()

    @classmethod
    def open_readonly(cls, path: Path) -> Outbox:
        """The outbox at `path` for reading only: creates, writes and chmods nothing, so
        it works in a read-only state directory and on another user's readable files.
        The one exception is SQLite's shared-memory index (-shm) of a live writer, which
        readers take their locks in when they may. put() and flush() raise OutboxError."""
        return cls(path, readonly=True)

    # ------------------------------------------------------------------ opening

    @_naming_the_file
    def _attach(self) -> None:
        """Opens the path and remembers which files its database and journals are."""
        self._db = self._open_readonly() if self.readonly else self._open_readwrite()
        self._files = {suffix: _identity(f"{self.path}{suffix}") for suffix in _FILES}

    def _open_readwrite(self, move_aside: bool = True) -> sqlite3.Connection:
        """Opens the path, creating the file; a damaged one is moved aside once, and
        found damaged again (a failing disk) raised."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        # Autocommit mode: every write below is one explicit BEGIN IMMEDIATE..COMMIT,
        # and the busy timeout lets the daemon and the CLI take turns on the file.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        identity = _identity(self.path)
        try:
            damage = _damage(db)
            if damage is None:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
                with self._transaction(db):
                    for statement in _SCHEMA:
                        db.execute(statement)
        except BaseException:
            db.close()
            raise
        if damage is not None:
            db.close()
            if not move_aside:
                raise OutboxError(f"{self.path}: {damage}")
            self._move_aside(identity, damage)
            return self._open_readwrite(move_aside=False)
        if created:  # SQLite syncs its journals' directory entries, not the database's own
            fsync_path(self.path.parent)
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise OutboxError(f"{self.path}: no such file")
        db = None
        # Without a -wal every result is in the main file, and immutable=1 reads it with
        # no locks and no -wal or -shm, which mode=ro would create in a writable directory.
        if Path(f"{self.path}-wal").exists():
            db = self._connect_uri("mode=ro")
            try:
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as exc:  # e.g. no -shm, and none can be created
                db.close()
                db = None
                log.warning(
                    "%s: cannot read its write-ahead log (%s); reading the database file "
                    "alone, results not yet copied into it are not shown",
                    self.path,
                    exc,
                )
        if db is None:
            db = self._connect_uri("immutable=1")
        damage = _damage(db)
        if damage is not None:
            db.close()
            raise OutboxError(f"{self.path}: {damage}")
        return db

    def _connect_uri(self, parameter: str) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path.absolute()))}?{parameter}"
        return sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)

    def _move_aside(self, identity: tuple[int, int] | None, damage: str) -> None:
        """Renames the damaged file (with its -wal and -shm) out of the way, unless
        another process already did while this one was looking at it."""
        target = self.path.with_name(
            f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        )
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # The directory's lock serializes this between the daemon and the CLI: without
            # it, one could move aside the new file that the other just started.
            fcntl.flock(directory, fcntl.LOCK_EX)
            if identity is None or _identity(self.path) != identity:
                return
            for suffix in _FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{self.path}{suffix}", f"{target}{suffix}")
        finally:
            os.close(directory)
        fsync_path(self.path.parent)
        log.error(
            "%s is damaged (%s): moved it aside to %s and started a new outbox; results "
            "in it were not delivered",
            self.path,
            damage,
            target,
        )

    def _connection(self) -> sqlite3.Connection:
        """The open connection, after reopening the path if the file was deleted or
        replaced under it: writes to an unlinked file would be lost at close."""
        if _identity(self.path) != self._files[""]:
            log.error("%s was deleted or replaced while open; reopening it", self.path)
            self._db.close()
            # SQLite leaves the journals of a database that moved while open where they
            # are, and would apply that -wal to the new file at the path, corrupting it.
            for suffix in _FILES[1:] if not self.readonly else ():
                stale = f"{self.path}{suffix}"
                if self._files[suffix] is not None and _identity(stale) == self._files[suffix]:
                    os.unlink(stale)
            self._attach()
        return self._db

    # ------------------------------------------------------------------ writing

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front so that a concurrent
        writer waits on the busy timeout instead of failing on lock upgrade."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction(self._connection())

    def _check_writable(self) -> None:
        if self.readonly:
            raise OutboxError(f"{self.path}: opened read-only")

    @_naming_the_file
    def put(self, message: dict) -> None:
        """Append `message` durably and record its (model, version) as reported; when
        that exceeds the cap, drop the oldest loudly. Non-finite numbers are stored as
        null, with a warning, so that the result stays deliverable."""
        self._check_writable()
        replaced: list[str] = []
        safe = _json_safe(message, "", replaced)
        if replaced:
            log.warning(
                "result %s: non-finite number(s) in %s stored as null",
                message.get("message_id"),
                ", ".join(replaced),
            )
        body = json.dumps(safe, separators=(",", ":"), allow_nan=False)
        try:
            dropped = self._append(safe, body)
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            # Damaged since it was opened (a failing SD card): this result goes to a new file.
            self._db.close()
            self._move_aside(self._files[""], str(exc))
            self._attach()
            dropped = self._append(safe, body)
        if dropped:
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

    def _append(self, message: dict, body: str) -> list[str]:
        """put()'s transaction; returns the message_ids the cap dropped."""
        with self._write() as db:
            db.execute(
                "INSERT INTO messages (message_id, body) VALUES (?, ?)",
                (str(message["message_id"]), body),
            )
            # A training result (it has an outcome) of a saved version; an alarm event
            # names a version too, but says nothing about whether its result went out.
            if message.get("version") is not None and "outcome" in message:
                db.execute(
                    "INSERT OR IGNORE INTO reported (model, version) VALUES (?, ?)",
                    (message["model"], message["version"]),
                )
            (count,) = db.execute("SELECT COUNT(*) FROM messages").fetchone()
            excess = count - self.max_messages
            if excess <= 0:
                return []
            oldest = db.execute(
                "SELECT seq, message_id FROM messages ORDER BY seq LIMIT ?", (excess,)
            ).fetchall()
            db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s, _ in oldest])
            db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (len(oldest),)
            )
        return [message_id for _, message_id in oldest]

    @_naming_the_file
    def flush(
        self,
        deliver: Callable[[list[dict]], list[str | None]],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Hand pending results to `deliver`, oldest first, in batches; remove those it
        acknowledged. Stops at the first batch with a failure (the sinks are down, and
        the next tick retries), or before a batch once `should_stop()` is true. Returns
        how many were delivered.

        The count of results dropped by the cap rides on the oldest result of a batch as
        `outbox_dropped`, and is cleared only once that result is acknowledged.
        """
        self._check_writable()
        delivered = 0
        with self._flush_lock():
            while not should_stop() and (rows := self._rows(FLUSH_BATCH)):
                messages = [message for _, message in rows]
                carried = self._dropped()
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

    # ------------------------------------------------------------------ reading

    def _rows(self, limit: int | None) -> list[tuple[int, dict]]:
        rows = (
            self._connection()
            .execute(
                "SELECT seq, body FROM messages ORDER BY seq LIMIT ?",
                (-1 if limit is None else limit,),
            )
            .fetchall()
        )
        return [(seq, json.loads(body)) for seq, body in rows]

    @_naming_the_file
    def pending(self, limit: int | None = None) -> list[dict]:
        """Undelivered results, oldest first."""
        return [message for _, message in self._rows(limit)]

    def _dropped(self) -> int:
        db = self._connection()
        return db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0]

    @property
    @_naming_the_file
    def dropped(self) -> int:
        """Results dropped by the cap whose count no delivered result has carried yet."""
        return self._dropped()

    @_naming_the_file
    def reported(self, model: str) -> set[int]:
        """The versions of `model` whose result was ever put, delivered or not."""
        db = self._connection()
        # A read-only outbox may predate the table.
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'reported'").fetchone():
            return set()
        rows = db.execute("SELECT version FROM reported WHERE model = ?", (model,))
        return {version for (version,) in rows}

    @_naming_the_file
    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def close(self) -> None:
        self._db.close()
