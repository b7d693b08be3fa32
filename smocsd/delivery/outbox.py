"""The durable queue of results that no broker has acknowledged yet.

Every result is written here first and leaves only once a sink acknowledged it, so a
crash, a reboot or a week-long broker outage loses nothing. The queue is a SQLite file
in the state directory, shared by the daemon and `smocsd outbox flush`; `smocsd status`
and `smocsd outbox list` read it with `Outbox.open_readonly()`.

The file also records every (model, version) whose result was ever put, so that the
daemon can tell a saved version whose result never made it into the queue.

Rows are read back into checked records (OutboxMessage): the file outlives the code that
wrote it and can be edited by hand, and one row that cannot be sent would otherwise fail
every flush and hold back every message behind it. Such a row is moved to the quarantine
table, never lost and never delivered. smocsd stamps the file as its own (application_id)
and never writes to another program's database found at the path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar, Union
from urllib.parse import quote

from ..common.files import fsync_path, locked
from ..common.state import utcnow
from ..schemas import ALARM_SCHEMA, LABEL_SCHEMA, RESULT_SCHEMA

__all__ = [
    "APPLICATION_ID",
    "DROPPED_FIELD",
    "FLUSH_BATCH",
    "Outbox",
    "OutboxError",
    "OutboxMessage",
    "Quarantined",
    "json_safe",
]

log = logging.getLogger("smocsd.outbox")

DROPPED_FIELD = "outbox_dropped"
# Results handed to one deliver() call: big enough to batch Kafka produces, small
# enough that one bounded attempt does not grow with the backlog.
FLUSH_BATCH = 100

# smocsd's mark in the database header ("SMOC"), set in the transaction that creates its
# tables: SQLite's own way for a program to recognise its files.
APPLICATION_ID = 0x534D4F43
# The layout of the tables below, in the header's user_version.
FORMAT = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0)",
    # Outboxes from before this table start with it empty.
    "CREATE TABLE IF NOT EXISTS reported ("
    " model TEXT, version INTEGER, PRIMARY KEY (model, version))",
    # Rows that cannot be delivered, as they were in messages (seq is their id there, and
    # not a key here: a restored backup may reuse one), with why and when (UTC).
    "CREATE TABLE IF NOT EXISTS quarantine ("
    " seq INTEGER NOT NULL, message_id TEXT, body, reason TEXT NOT NULL, at TEXT NOT NULL)",
)
# The columns of the tables above: a file whose tables of these names differ is not ours.
_COLUMNS = {
    "messages": ["seq", "message_id", "body"],
    "counters": ["name", "value"],
    "reported": ["model", "version"],
    "quarantine": ["seq", "message_id", "body", "reason", "at"],
}

# A field's allowed JSON types, or the fields of the object it must be.
_Spec = dict[str, Union[tuple[type, ...], "_Spec"]]
# What every message must hold for delivery (topic, key) and for `outbox list`.
_FIELDS: _Spec = {
    "message_id": (str,),
    "schema": (str,),
    "device_id": (str,),
    "model": (str,),
    "timestamp": (str,),
}
# ... and what each kind of message smocsd queues must hold besides. The names come from
# smocsd.schemas, not from their senders (hooks.py: numpy; publish.py: the brokers'
# clients), so that the reading commands stay lean; tests/test_outbox.py checks them.
_SCHEMA_FIELDS: dict[str, _Spec] = {
    RESULT_SCHEMA: {"outcome": (str,), "version": (int, type(None))},
    ALARM_SCHEMA: {"state": (str,), "version": (int,)},
    LABEL_SCHEMA: {"action": (str,), "label": {"id": (int,), "kind": (str,)}},
}
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}

# The database and the journals SQLite keeps beside it, in WAL mode.
_FILES = ("", "-wal", "-shm")

_P = ParamSpec("_P")
_R = TypeVar("_R")


class OutboxError(Exception):
    """An outbox operation failed; the message starts with the outbox file's path."""


class _Undeliverable(ValueError):
    """A row that cannot be sent; the message says what is wrong with it."""


@dataclass(frozen=True)
class OutboxMessage:
    """A queued message as read back from the file, its fields checked: what the brokers'
    topics and keys, `outbox list` and the metrics read from it is there, of its type."""

    seq: int  # the row's id in the messages table
    body: dict[str, Any]  # the message as it is sent

    @classmethod
    def parse(cls, seq: int, body: object) -> OutboxMessage:
        """The message of row `seq`; raises _Undeliverable saying what is wrong. Strict
        JSON: put() never writes NaN, and a number beyond a double would read as inf,
        which no broker's consumer could parse back."""
        if not isinstance(body, str):
            what = "a BLOB" if isinstance(body, bytes) else _json_type(body)
            raise _Undeliverable(f"its body is {what}, not JSON text")
        try:
            message = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise _Undeliverable(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise _Undeliverable(f"not a JSON object but {_json_type(message)}")
        _check(message, _FIELDS)
        schema = message["schema"]
        if schema not in _SCHEMA_FIELDS:
            raise _Undeliverable(f"schema {schema[:60]!r} is none that smocsd sends")
        _check(message, _SCHEMA_FIELDS[schema])
        return cls(seq, message)


@dataclass(frozen=True)
class Quarantined:
    """A row moved to the quarantine table."""

    seq: int  # its id in the messages table
    message_id: str | None
    reason: str
    at: str  # when it was moved, UTC


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond the range of a double")
    return value


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check(obj: dict[str, Any], spec: _Spec, prefix: str = "") -> None:
    """Raises _Undeliverable naming the first field of `obj` that `spec` does not allow.
    A field that may be null may also be missing."""
    for name, allowed in spec.items():
        if name not in obj:
            if isinstance(allowed, tuple) and type(None) in allowed:
                continue
            raise _Undeliverable(f"no {prefix}{name}")
        value = obj[name]
        if isinstance(allowed, dict):
            if not isinstance(value, dict):
                raise _Undeliverable(f"{prefix}{name} is {_json_type(value)}, not an object")
            _check(value, allowed, f"{prefix}{name}.")
        elif type(value) not in allowed:  # type(): true is no integer here
            wanted = " or ".join(_JSON_TYPES[t] for t in allowed)
            raise _Undeliverable(f"{prefix}{name} is {_json_type(value)}, not {wanted}")


def _some(items: list[str]) -> str:
    """The first five of `items` and how many more, for one log line."""
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return ", ".join(items[:5]) + more


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


@dataclass(frozen=True)
class _Unusable:
    """Why the file at the outbox path cannot be used."""

    why: str
    foreign: bool  # another program's database, not a damaged outbox

    @property
    def suffix(self) -> str:
        """What the file is renamed with when moved aside."""
        return "foreign" if self.foreign else "corrupt"


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    """The columns of `table`; [] when there is no such table."""
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _foreign(db: sqlite3.Connection) -> str | None:
    """Why the database behind `db` is another program's, or None if it is smocsd's: one
    stamped with APPLICATION_ID, or an unstamped one holding nothing but smocsd's tables
    as smocsd makes them (a new, empty file, or an outbox from before the stamp)."""
    (application_id,) = db.execute("PRAGMA application_id").fetchone()
    if application_id == APPLICATION_ID:
        return None
    if application_id != 0:
        return f"not smocsd's outbox: its application_id is {application_id:#x}"
    names = [
        name
        for (name,) in db.execute("SELECT name FROM sqlite_master")
        if not name.startswith("sqlite_")  # SQLite's own: sequences, automatic indexes
    ]
    others = sorted(set(names) - _COLUMNS.keys())
    if others:
        return f"not smocsd's outbox: it holds {', '.join(others)}"
    for table in names:
        found = _columns(db, table)
        if found != _COLUMNS[table]:
            return f"not smocsd's outbox: its table {table} has columns {', '.join(found)}"
    return None


def _damage(db: sqlite3.Connection) -> _Unusable | None:
    """Why the file behind `db` is not a usable outbox, or None if it is. These are the
    first queries on every open, and write nothing."""
    try:
        foreign = _foreign(db)
        if foreign is not None:
            return _Unusable(foreign, foreign=True)
        for table, columns in _COLUMNS.items():
            found = _columns(db, table)
            if found and found != columns:  # [] when there is no such table yet
                why = f"not an outbox: its table {table} has columns {', '.join(found)}"
                return _Unusable(why, foreign=False)
        (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise
        return _Unusable(str(exc), foreign=False)
    return None if check == "ok" else _Unusable(check, foreign=False)


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `path`, None if there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Outbox:
    """A capped FIFO of result dicts in a SQLite file; `put()` is durable on return.

    A file found corrupt when opened or written to is moved aside to
    `outbox.db.corrupt-<UTC time>`, another program's database to
    `outbox.db.foreign-<UTC time>` (never written to), and a new one started. A file
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
        """Opens the path, creating the file; a damaged or foreign one is moved aside
        once, and found so again (a failing disk) raised."""
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
                    # Only when missing: the pragma writes the header even when unchanged.
                    if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                        db.execute(f"PRAGMA user_version = {FORMAT}")
        except BaseException:
            db.close()
            raise
        if damage is not None:
            db.close()
            if not move_aside:
                raise OutboxError(f"{self.path}: {damage.why}")
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
            raise OutboxError(f"{self.path}: {damage.why}")
        return db

    def _connect_uri(self, parameter: str) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path.absolute()))}?{parameter}"
        return sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)

    def _move_aside(self, identity: tuple[int, int] | None, damage: _Unusable) -> None:
        """Renames the unusable file (with its -wal and -shm) out of the way, unless
        another process already did while this one was looking at it. Renamed, not
        refused: smocsd goes on queueing in a new file, and the old one is kept whole."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{damage.suffix}-{stamp}")
        # The directory's lock serializes this between the daemon and the CLI: without
        # it, one could move aside the new file that the other just started.
        with locked(self.path.parent):
            if identity is None or _identity(self.path) != identity:
                return
            for suffix in _FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{self.path}{suffix}", f"{target}{suffix}")
        fsync_path(self.path.parent)
        if damage.foreign:
            log.error(
                "%s: %s: moved it aside, untouched, to %s and started a new outbox",
                self.path,
                damage.why,
                target,
            )
            return
        log.error(
            "%s is damaged (%s): moved it aside to %s and started a new outbox; results "
            "in it were not delivered",
            self.path,
            damage.why,
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
            self._move_aside(self._files[""], _Unusable(str(exc), foreign=False))
            self._attach()
            dropped = self._append(safe, body)
        if dropped:
            log.error(
                "outbox %s full (%d results): dropped the %d oldest undelivered "
                "result(s) %s; the count goes out with the next delivered result",
                self.path,
                self.max_messages,
                len(dropped),
                _some(dropped),
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
        `outbox_dropped`, and is cleared only once that result is acknowledged. Rows
        that cannot be delivered are moved to quarantine on the way (see _rows()).
        """
        self._check_writable()
        delivered = 0
        with self._flush_lock():
            while not should_stop() and (rows := self._rows(FLUSH_BATCH)):
                messages = [row.body for row in rows]
                carried = self._dropped()
                if carried:
                    messages[0] = {**messages[0], DROPPED_FIELD: carried}
                sinks = deliver(messages)
                acked = [row.seq for row, sink in zip(rows, sinks, strict=True) if sink]
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

    def _flush_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Serialize flushes across processes, so the daemon's tick and `outbox flush`
        do not send the same results twice. The lock is a file of its own: closing any
        other descriptor of the database file would drop SQLite's POSIX locks on it.
        Opened for reading: once the file exists, taking the lock never needs write access
        (a read-only directory); the flush's own writes go through the connection."""
        return locked(self.path.with_name(self.path.name + ".flush-lock"), read_only=True)

    # ------------------------------------------------------------------ reading

    def _rows(self, limit: int | None) -> list[OutboxMessage]:
        """Up to `limit` deliverable messages, oldest first. Rows that cannot be delivered
        are moved to quarantine (read-only: skipped, and named in a warning), so they
        neither fail every flush nor hold back the messages behind them."""
        db = self._connection()
        good: list[OutboxMessage] = []
        bad: list[tuple[int, str]] = []
        after = -(2**63)  # below every rowid
        while limit is None or len(good) < limit:
            rows = db.execute(
                "SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, -1 if limit is None else limit - len(good)),
            ).fetchall()
            if not rows:
                break
            for seq, body in rows:
                try:
                    good.append(OutboxMessage.parse(seq, body))
                except _Undeliverable as exc:
                    bad.append((seq, str(exc)))
            after = rows[-1][0]
        if bad:
            self._quarantine(bad)
        return good

    def _quarantine(self, bad: list[tuple[int, str]]) -> None:
        """Moves the rows `bad` (seq, reason) from messages to quarantine, in one
        transaction: never lost, never delivered. A reader only names them."""
        named = _some([f"row {seq}: {reason}" for seq, reason in bad])
        if self.readonly:
            log.warning(
                "%s: %d row(s) cannot be delivered and are not shown (the next flush moves "
                "them to its quarantine table): %s",
                self.path,
                len(bad),
                named,
            )
            return
        at = utcnow()
        with self._write() as db:
            for seq, reason in bad:
                db.execute(
                    "INSERT INTO quarantine (seq, message_id, body, reason, at)"
                    " SELECT seq, message_id, body, ?, ? FROM messages WHERE seq = ?",
                    (reason, at, seq),
                )
                db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
        log.error(
            "%s: %d row(s) cannot be delivered: moved to its quarantine table, where "
            "`smocsd outbox list` shows them: %s",
            self.path,
            len(bad),
            named,
        )

    @_naming_the_file
    def pending(self, limit: int | None = None) -> list[dict]:
        """Undelivered results, oldest first; never a row that cannot be delivered."""
        return [row.body for row in self._rows(limit)]

    @_naming_the_file
    def quarantined(self) -> list[Quarantined]:
        """The rows moved to quarantine, oldest first."""
        db = self._connection()
        if not _columns(db, "quarantine"):  # a read-only outbox may predate the table
            return []
        rows = db.execute("SELECT seq, message_id, reason, at FROM quarantine ORDER BY rowid")
        return [Quarantined(*row) for row in rows]

    def _dropped(self) -> int:
        """The count of dropped results to carry. One that is not a count (the file was
        edited) is said once and reset to 0: the true count is unknown, and carried it
        would fail the message's schema at every flush."""
        db = self._connection()
        row = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        value = None if row is None else row[0]
        if type(value) is int and value >= 0:
            return value
        log.error(
            "%s: counters 'dropped' is %s, not a count of results: reset to 0",
            self.path,
            "missing" if row is None else repr(value)[:40],
        )
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('dropped', 0)")
        return 0

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
