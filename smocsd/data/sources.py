"""Where readings come from: a SQLite file or a PostgreSQL table, read-only.

Column names are what the plant historian chose (spaces, mixed case, non-ASCII), so
every name is quoted and every value is a bound parameter. The configured columns are
checked against the table once per connection: a typo is one line naming its config
key instead of an SQL error, and a daemon tick does not pay for the check.

A database that does not exist yet is NoDatabase, not a failure: on a fresh install the
daemon waits for the ingest software to create it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sqlite3
import stat
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..common.config import SourceConfig, read_secret

if TYPE_CHECKING:  # numpy is imported where rows are read: the daemon only counts them
    import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")
_ROWID = ("rowid", "oid", "_rowid_")  # SQLite's names for the implicit rowid
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# A bound value's place in SQL built here, made "?" or "%s" by _bind(): config.py
# refuses NUL in names, and no SQL of ours holds one.
_P = "\0"


def _ascii_lower(name: str) -> str:
    """Folds case as SQLite does for names: ASCII letters only."""
    return name.translate(_ASCII_LOWER)


class SourceError(Exception):
    """The database cannot be read this cycle (down, locked, missing table, bad password)."""


class NoDatabase(SourceError):
    """The database does not exist yet; the cycle skips instead of failing."""


class Moved(Enum):
    """What became of the database file a source has open, as seen at its path."""

    REPLACED = "replaced by another file"
    DELETED = "deleted"


@dataclass(frozen=True)
class Readings:
    """The newest rows, oldest first; a NULL, NaN, inf or non-numeric value is NaN in `values`.

    A NULL or unparseable time is NaN in `time` but does not make a row bad: what a
    missing time means is for windowing to decide.
    """

    order: np.ndarray  # int64 (n,), the order_column values
    time: np.ndarray  # float64 (n,), time_column in seconds since the Unix epoch
    values: np.ndarray  # float64 (n, channels)

    @property
    def bad_rows(self) -> np.ndarray:
        """Mask of rows that must never reach training."""
        import numpy as np

        return ~np.isfinite(self.values).all(axis=1)


def quote(name: str) -> str:
    """One name as an SQL identifier, the same for SQLite and PostgreSQL: double-quoted,
    embedded double quotes doubled; config.py has refused NUL and control characters."""
    return '"' + name.replace('"', '""') + '"'


def _epoch_number(x: str) -> str:
    """SQL for a number as epoch seconds. Above 1e11 it is taken as milliseconds: 1e11 s
    is the year 5138, 1e11 ms March 1973, so real times in either unit never collide."""
    return f"CASE WHEN abs({x}) > 1e11 THEN {x} / 1000.0 ELSE {x} END"


def _readings(data: np.ndarray) -> Readings:
    """Columns order, time, channels... -> Readings; an infinite time is no time."""
    import numpy as np

    time = data[:, 1]
    return Readings(
        order=data[:, 0].astype(np.int64),
        time=np.where(np.isfinite(time), time, np.nan),
        values=data[:, 2:],
    )


def _tagged(rows: list[tuple], channels: int) -> tuple[Readings, list[Any]]:
    """Rows of order, time, channels..., partition value -> (Readings, the values)."""
    import numpy as np

    # None (NULL) becomes NaN in a float64 array.
    data = np.array([row[:-1] for row in rows], dtype=np.float64).reshape(len(rows), channels + 2)
    return _readings(data), [row[-1] for row in rows]


def _sqlite_partition(column: str, declared: str, value: str) -> tuple[str, tuple]:
    """The condition selecting partition `value` of `column` (quoted), declared `declared`.

    A value bound as text compares as the column's affinity makes it: "7" equals 7 in an
    INTEGER, REAL or NUMERIC column, and a TEXT column holds 7 as "7". A column of no type
    (BLOB affinity) stores what was given, so a canonical integer is matched in both forms.
    """
    kind = declared.upper()
    blob = not any(t in kind for t in ("INT", "CHAR", "CLOB", "TEXT")) and (
        kind == "" or "BLOB" in kind
    )
    if blob and re.fullmatch(r"0|[1-9][0-9]{0,17}", value):  # within int64
        return f"{column} IN ({_P}, {_P})", (value, int(value))
    return f"{column} = {_P}", (value,)


class Source(ABC):
    where: str  # the database, as errors name it
    # The condition every read keeps rows by: an integer order value ({order}); and the
    # rows it leaves out, with the words the warning names them by.
    _numbered: ClassVar[str]
    _unnumbered: ClassVar[tuple[str, str]]

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        # config.py keeps table names to plain identifiers, so a '.' is the schema's.
        self.schema, _, self.name = cfg.table.rpartition(".")
        self.table = ".".join(map(quote, cfg.table.split(".")))
        self.order = quote(cfg.order_column or "rowid")
        # The time_column expression; None until this connection's columns are checked.
        self._time: str | None = None
        # cfg.partition's condition (SQL with _P) and values, as the column's type needs
        # them; set with _time.
        self._part: tuple[str, tuple] | None = None
        self._index_checked = False  # the partition column's index: warned once per object

    @abstractmethod
    def _run(self, work: Callable[[Any], T]) -> T:
        """`work(cursor)` on a connection whose columns are checked; errors -> SourceError."""

    @abstractmethod
    def _bind(self, sql: str, params: tuple) -> tuple[str, Any]:
        """`sql` with its _P as the driver's placeholders, and the parameters to pass."""

    @abstractmethod
    def read_newest(self, max_rows: int, upto: int | None = None) -> Readings:
        """At most `max_rows` newest rows by order_column (of those <= `upto` if given),
        oldest first."""

    @abstractmethod
    def _columns(self) -> str:
        """The select list of order, time and channels, as every read converts them."""

    def read_tagged(self, after: int | None, max_rows: int) -> tuple[Readings, list[Any]]:
        """The newest `max_rows` rows of all partitions with order > `after` (all when None),
        oldest first, and each row's raw partition_column value: live scoring reads every
        partition's new rows in one query, a plain fetch of the few since its last poll."""

        def read(db: Any) -> list[tuple]:
            newer = () if after is None else ((f"{self.order} > {_P}", (after,)),)
            where, params = self._where(*newer, partition=False)
            sql = (
                f"SELECT {self._columns()}, {self._partition_column()} "
                f"FROM {self.table}{where} ORDER BY {self.order} DESC LIMIT {_P}"
            )
            return db.execute(*self._bind(sql, (*params, max_rows))).fetchall()

        return _tagged(self._run(read)[::-1], len(self.cfg.channels))

    def _where(
        self, *more: tuple[str, tuple], partition: bool = True, numbered: bool = True
    ) -> tuple[str, tuple]:
        """The WHERE clause and its values: this model's partition (unless `partition` is
        false), each (condition, values) of `more`, and (unless `numbered` is false) only
        rows with an integer order value. After the check, which sets _part."""
        conds = [self._part] if partition and self._part is not None else []
        conds += more
        if numbered:
            conds.append((self._numbered.format(order=self.order), ()))
        if not conds:
            return "", ()
        values = tuple(v for _, vs in conds for v in vs)
        return " WHERE " + " AND ".join(c for c, _ in conds), values

    def _warn_unnumbered(self, db: Any) -> None:
        """One warning naming the database, table and column when rows have no integer
        order value: every read leaves them out. Its index serves the count, as it serves
        the reads' condition."""
        unnumbered, what = self._unnumbered
        where, params = self._where((unnumbered.format(order=self.order), ()), numbered=False)
        sql = f"SELECT count(*) FROM {self.table}{where}"
        count = db.execute(*self._bind(sql, params)).fetchall()[0][0]
        if count:
            log.warning(
                "%s: %d rows of table %s have no integer order value (%s in column %s) and "
                "are left out: source.order_column must be an integer column",
                self.where,
                count,
                self.cfg.table,
                what,
                self.order,
            )

    def count_after(self, last_order: int | None) -> int:
        """Rows with order_column > last_order (all rows when None)."""

        def count(db: Any) -> int:
            after = () if last_order is None else ((f"{self.order} > {_P}", (last_order,)),)
            where, params = self._where(*after)
            sql = f"SELECT count(*) FROM {self.table}{where}"
            # fetchall() runs a SQLite statement to its end, which releases SHARED at once.
            return db.execute(*self._bind(sql, params)).fetchall()[0][0]

        return self._run(count)

    def _extreme(self, function: str) -> int | None:
        def read(db: Any) -> Any:
            where, params = self._where()
            sql = f"SELECT {function}({self.order}) FROM {self.table}{where}"
            return db.execute(*self._bind(sql, params)).fetchall()[0][0]

        value = self._run(read)
        return None if value is None else int(value)

    def max_order(self) -> int | None:
        """The largest order_column value; None when the table is empty."""
        return self._extreme("max")

    def min_order(self) -> int | None:
        """The smallest order_column value; None when the table is empty."""
        return self._extreme("min")

    def _partition_column(self) -> str:
        if self.cfg.partition_column is None:
            raise ValueError("source.partition_column is not set")
        return quote(self.cfg.partition_column)

    def partitions(self) -> list[Any]:
        """The distinct non-NULL partition_column values of the whole table, as stored."""
        column = self._partition_column()
        sql = f"SELECT DISTINCT {column} FROM {self.table} WHERE {column} IS NOT NULL"
        return self._run(lambda db: [row[0] for row in db.execute(*self._bind(sql, ())).fetchall()])

    def moved(self) -> Moved | None:
        """Whether the database this source has open is no longer the one its config names.
        None here: a PostgreSQL database dropped or failed over ends the connection, and the
        next read reconnects to whatever the DSN names now."""
        return None

    def check(self) -> None:
        """Connects and checks the configured table and columns, even if this connection
        was checked before; SourceError (NoDatabase) says what is wrong in one line."""
        self._time = None
        self._run(lambda db: None)

    def close(self) -> None:  # noqa: B027 - a source may hold nothing to release
        """Releases the connection; the next call reconnects."""

    def _wanted(self) -> list[tuple[str, str]]:
        """(config key, column) for every column the reads name; SQLite's rowid is implicit."""
        wanted = [("source.time_column", self.cfg.time_column)]
        if self.cfg.order_column is not None:
            wanted.append(("source.order_column", self.cfg.order_column))
        if self.cfg.partition_column is not None:
            wanted.append(("source.partition_column", self.cfg.partition_column))
        return wanted + [("source.channels", c) for c in self.cfg.channels]

    def _no_column(self, key: str, column: str, columns: Collection[str]) -> SourceError:
        near = [c for c in columns if c.casefold() == column.casefold()]
        hint = f"; did you mean {quote(near[0])}?" if near else ""
        return SourceError(
            f"{self.where}: no such column {quote(column)} in table {self.cfg.table} ({key}){hint}"
        )

    def _no_table(self, near: str | None = None) -> SourceError:
        hint = f"; did you mean {near}?" if near else ""
        return SourceError(f"{self.where}: no such table {self.cfg.table} (source.table){hint}")

    def _warn_unindexed(self, create: str, columns: list[str]) -> None:
        """Each partition's model filters on the partition column: without an index whose
        first column it is, every model's every read scans the whole table."""
        log.warning(
            "%s: no index on %s of table %s: each model's reads scan the whole table; "
            "CREATE INDEX %s (%s)",
            self.where,
            quote(self.cfg.partition_column or ""),
            self.cfg.table,
            create,
            ", ".join(map(quote, columns)),
        )


# The file change counter (fileformat2: "incremented whenever the database file is
# unlocked after having been modified") and the magic that opens a rollback journal.
_COUNTER_AT = 24
_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


class _LockFree:
    """Runs a statement on a rollback-journal database without taking SQLite's lock.

    A writer commits only when no reader holds SHARED, and one with busy timeout 0 fails
    at once if one does, however short the read: no locking reader can spare it. So the
    statement runs on a fresh connection that takes no lock (immutable=1, no page cache
    from before) and counts only if the file cannot have changed meanwhile. SQLite
    writes the database file only while the transaction's journal is live (it starts
    with the magic; DELETE, TRUNCATE and PERSIST all remove that at commit), and every
    commit increments the change counter. No live journal before and after, and the
    same counter: the rows are a consistent snapshot. Otherwise it tries again.
    """

    pause = 0.0002  # between tries: a writer between commits leaves only moments free

    def __init__(self, path: Path, fd: int, patience: float):
        self.journal = path.with_name(path.name + "-journal")
        self.uri = f"{path.absolute().as_uri()}?mode=ro&immutable=1"
        self.fd = fd  # open for the source's life: closing one would drop our POSIX locks
        self.patience = patience

    @staticmethod
    def applies(fd: int) -> bool:
        """Rollback-journal mode (header bytes 18-19 = 1); WAL readers never block a writer."""
        return os.pread(fd, 2, 18) == b"\x01\x01"

    def _journal_live(self) -> bool:
        try:
            with open(self.journal, "rb") as journal:
                return journal.read(8) == _JOURNAL_MAGIC
        except FileNotFoundError:
            return False

    def rows(self, sql: str, parameters: Any) -> list[tuple] | None:
        """The statement's rows; None if the writer never paused for `patience` seconds."""
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            if not self._journal_live():
                before = os.pread(self.fd, 4, _COUNTER_AT)
                try:
                    conn = sqlite3.connect(self.uri, uri=True)
                    try:
                        rows = conn.execute(sql, parameters).fetchall()
                    finally:
                        conn.close()
                except sqlite3.DatabaseError:  # a page read halfway through a commit
                    rows = None
                if (
                    rows is not None
                    and not self._journal_live()
                    and os.pread(self.fd, 4, _COUNTER_AT) == before
                ):
                    return rows
            time.sleep(self.pause)
        return None


class _Descriptors:
    """One read-only descriptor per database file for the whole process, closed with the
    last source that has it.

    Closing any descriptor of a file drops every POSIX lock the process holds on it,
    SQLite's included (fcntl(2)). A WAL-mode reader holds a shared lock on the database
    file while it is open; once it is gone, the writer's last connection to close deletes
    the -wal and -shm, and the connections still open here read the unlinked ones and
    never see a new row again. With many models, sources of one file come and go (a
    partition's first rows read, a source reopened after an error) while others stay.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [fd, users]
        self._stray: list[int] = []

    def take(self, path: Path) -> int:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) in self._files:
            entry = self._files[st.st_dev, st.st_ino]
            entry[1] += 1
            return entry[0]
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        entry = self._files.get((st.st_dev, st.st_ino))
        if entry is not None:  # the path changed to a file we have open between the two
            entry[1] += 1
            self._stray.append(fd)  # never closed: that would drop the locks (rare, bounded)
            return entry[0]
        self._files[st.st_dev, st.st_ino] = [fd, 1]
        return fd

    def give_back(self, fd: int) -> None:
        for key, entry in list(self._files.items()):
            if entry[0] == fd:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._files[key]
                    os.close(fd)
                return


_descriptors = _Descriptors()


class _Fetched(list):
    """Rows already read, standing in for the cursor that execute() returns."""

    def fetchall(self) -> list[tuple]:
        return list(self)


class _PollingConnection(sqlite3.Connection):
    """Waits for a lock by trying again every `poll` seconds, for up to `patience`.

    SQLite's own busy handler backs off to one try per 100 ms, while a writer committing
    back to back in rollback-journal mode leaves the lock free only for moments between
    its transactions: trying that seldom, a chunked read, which needs the lock once per
    chunk, failed after busy_timeout in bench/sqlite_lock.py.
    """

    poll = 0.0005  # little CPU; at 2 ms such a read took 7 times as long as at 0.5 ms
    patience = 0.0
    lock_free: _LockFree | None = None  # tried first, where the journal mode allows

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        if self.lock_free is not None:
            rows = self.lock_free.rows(sql, parameters)
            if rows is not None:
                return _Fetched(rows)
        deadline = time.monotonic() + self.patience
        while True:
            try:  # a statement takes its lock in its first step, which execute() runs
                return super().execute(sql, parameters)
            except sqlite3.OperationalError as exc:
                if str(exc) != "database is locked" or time.monotonic() >= deadline:
                    raise
            time.sleep(self.poll)


class SQLiteSource(Source):
    """Opened read-only: the ingest software owns the file and may be writing in WAL mode.

    In rollback-journal mode a writer needs an EXCLUSIVE lock to commit, and cannot get
    it while any statement of ours runs and holds SHARED. So every statement first runs
    without any lock (_LockFree), which even a writer with busy timeout 0 never notices.
    Only if the writer never pauses for busy_timeout does it take the lock, in chunks of
    at most `chunk_rows` rows (a few milliseconds), each one statement read to its end,
    which releases SHARED, with a pause of `yield_ratio` times the chunk's read time
    between them: a writer that waits a few milliseconds for its lock then never fails.
    See bench/sqlite_lock.py.
    """

    chunk_rows = 2048
    yield_ratio = 1.0
    # SQLite types each value, not the column: text and blobs sort above every number, so
    # such a row was the newest of every read and failed each one. NULL compares as
    # nothing, and was always left out. One bound: a two-sided range made SQLite's walk
    # down the rowid 4 times slower (2048-row chunks of 210,000 rows).
    _numbered = "{order} <= 9223372036854775807"
    _unnumbered = ("{order} > 9223372036854775807", "text or a blob")

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self.path: Path = cfg.path  # type: ignore[assignment]
        self.where = str(self.path)
        self._conn: sqlite3.Connection | None = None
        self._fd: int | None = None
        self._keyset = True  # whether an index serves read_newest's chunks
        self.lock_free = True  # on rollback-journal databases; off only to compare

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                mode = os.stat(self.path).st_mode
            except FileNotFoundError:
                raise NoDatabase(
                    f"{self.path}: no such database file (source.path); "
                    "waiting for the ingest to create it"
                ) from None
            except OSError as exc:  # e.g. a directory on the way that we may not search
                raise SourceError(
                    f"{self.path}: unable to open database file: {exc.strerror}"
                ) from None
            if stat.S_ISDIR(mode):  # SQLite would say "disk I/O error"
                raise SourceError(f"{self.path}: is a directory, not a database file (source.path)")
            # The file descriptor before the connection: a file replaced between the two
            # leaves the connection on the newer one, which moved() then sees; the other
            # way round, moved() would compare the path with the newer file for good.
            try:
                self._fd = _descriptors.take(self.path)
            except OSError as exc:
                raise SourceError(
                    f"{self.path}: unable to open database file: {exc.strerror}"
                ) from None
            conn = sqlite3.connect(  # an error here is _run's, which closes the fd
                f"{self.path.absolute().as_uri()}?mode=ro",
                uri=True,
                timeout=0,
                factory=_PollingConnection,
                check_same_thread=False,
            )
            conn.patience = self.cfg.busy_timeout
            if self.lock_free and _LockFree.applies(self._fd):
                conn.lock_free = _LockFree(self.path, self._fd, self.cfg.busy_timeout)
            self._conn = conn
        return self._conn

    def moved(self) -> Moved | None:
        """Whether the file at `source.path` is still the one open: an open file that was
        deleted or renamed over reads on, unlinked, and would never show a new row."""
        if self._fd is None:
            return None
        opened = os.fstat(self._fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return Moved.DELETED
        except OSError:  # e.g. a directory on the way we may no longer search: no telling,
            return None  # and the file open is still the likeliest database
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            return Moved.REPLACED
        return None

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._connect()
            if self._time is None:
                self._time = self._check(conn)
                self._keyset = self._indexed(conn)
                self._warn_unnumbered(conn)
                if self.cfg.partition_column is not None and not self._index_checked:
                    self._check_partition_index(conn)
                    self._index_checked = True
            return work(conn)
        except sqlite3.Error as exc:
            self.close()
            raise self._error(exc) from None

    def _bind(self, sql: str, params: tuple) -> tuple[str, Any]:
        return sql.replace(_P, "?"), params

    def _error(self, exc: sqlite3.Error) -> SourceError:
        """`exc` naming the file; SQLite's "unable to open" gets the system's reason."""
        message = str(exc)
        if message == "unable to open database file":
            try:
                self.path.open("rb").close()
            except OSError as why:
                message += f": {why.strerror}"
        return SourceError(f"{self.path}: {message}")

    def _check(self, conn: sqlite3.Connection) -> str:
        """Checks the configured columns and sets the partition condition; returns the
        time_column expression.

        Names match as SQLite resolves them, ignoring ASCII case only, so a config that
        SQLite would run is never refused.
        """
        types = conn.execute(
            "SELECT name, type FROM pragma_table_info(?, ?)", (self.name, self.schema or None)
        ).fetchall()
        if not types:  # a SQLite table always has a column
            raise self._no_table()
        columns = [name for name, _ in types]
        declared = {_ascii_lower(name): type_name for name, type_name in types}
        for key, column in self._wanted():
            rowid = key == "source.order_column" and _ascii_lower(column) in _ROWID
            if _ascii_lower(column) not in declared and not rowid:
                raise self._no_column(key, column, columns)
        self._part = None
        column = self.cfg.partition_column
        if column is not None and self.cfg.partition is not None:
            declared_type = declared[_ascii_lower(column)]
            self._part = _sqlite_partition(quote(column), declared_type, self.cfg.partition)
        # SQLite types each value, not the column. Numbers are epoch seconds (or ms);
        # text shaped like a date is ISO 8601 / 'YYYY-MM-DD HH:MM:SS[.fff]' read by
        # julianday(), which honours a Z or +HH:MM offset and takes naive text as UTC,
        # rounded to its millisecond resolution. The GLOB keeps 'now' and Julian day
        # numbers, which julianday() also accepts, out. Anything else is NULL -> NaN.
        t = quote(self.cfg.time_column)
        return (
            f"CASE typeof({t}) WHEN 'integer' THEN {_epoch_number(t)} "
            f"WHEN 'real' THEN {_epoch_number(t)} "
            f"WHEN 'text' THEN CASE WHEN {t} GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' "
            f"THEN round((julianday({t}) - 2440587.5) * 86400.0, 3) END END"
        )

    def _check_partition_index(self, conn: sqlite3.Connection) -> None:
        """Warns if no index starts with the partition column (a view's are its tables')."""
        schema = f"{quote(self.schema)}." if self.schema else ""
        kind = conn.execute(
            f"SELECT type FROM {schema}sqlite_master WHERE name = ? COLLATE NOCASE",
            (self.name,),
        ).fetchall()
        if kind and kind[0][0] == "view":
            return
        firsts = conn.execute(
            "SELECT i.name FROM pragma_index_list(?, ?) AS l, pragma_index_info(l.name, ?) AS i"
            " WHERE i.seqno = 0",
            (self.name, self.schema or None, self.schema or None),
        ).fetchall()
        column = self.cfg.partition_column or ""
        if any(_ascii_lower(name or "") == _ascii_lower(column) for (name,) in firsts):
            return  # an index on an expression has no name at seqno 0
        columns = [column]
        if self.cfg.order_column is not None and _ascii_lower(self.cfg.order_column) not in _ROWID:
            columns.append(self.cfg.order_column)  # an index holds the rowid anyway
        index = f"{schema}{quote(f'{self.name}_{column}')}"
        self._warn_unindexed(f"{index} ON {quote(self.name)}", columns)

    def _columns(self) -> str:
        # typeof() turns text or blobs in a numeric column into NULL (-> NaN) so one bad
        # row is dropped instead of failing the cycle; SQLite itself cannot hold NaN.
        cols = ", ".join(
            f"CASE WHEN typeof({quote(c)}) IN ('integer', 'real') THEN {quote(c)} END"
            for c in self.cfg.channels
        )
        return f"{self.order}, {self._time}, {cols}"

    def _select(self) -> tuple[str, tuple]:
        """One chunk of read_newest: rows up to an order value, newest first; its SQL and
        the partition's values, to which the chunk's top, limit and offset are added."""
        # The chunk's top is bound after the partition's values, so its ? is written here.
        where, params = self._where((f"{self.order} <= ?", ()))
        sql = (
            f"SELECT {self._columns()} FROM {self.table}{where} "
            f"ORDER BY {self.order} DESC LIMIT ? OFFSET ?"
        )
        return sql.replace(_P, "?"), params

    def _indexed(self, conn: sqlite3.Connection) -> bool:
        """Whether an index serves the chunks. Without one every chunk would scan and sort
        the whole table, so the read is one statement, and a warning says so."""
        select, params = self._select()
        plan = conn.execute(f"EXPLAIN QUERY PLAN {select}", (*params, 0, 1, 0)).fetchall()
        if any("TEMP B-TREE" in row[3] for row in plan):
            # A column of no type matched in both its integer and text form: two ranges of
            # one index, merged by a sort of the partition's rows, not the table's.
            if self._part is None or len(self._part[1]) == 1:
                log.warning(
                    "%s: no index on %s of table %s: each read holds the database's read "
                    "lock for a whole table scan, and a writer in rollback-journal mode "
                    "cannot commit meanwhile; index it (source.order_column)",
                    self.path,
                    self.order,
                    self.cfg.table,
                )
            return False
        return True

    def read_newest(self, max_rows: int, upto: int | None = None) -> Readings:
        import numpy as np

        width = len(self.cfg.channels) + 2

        def read(conn: sqlite3.Connection) -> list[np.ndarray]:
            select, part = self._select()  # after the check, which sets self._time
            chunk = self.chunk_rows if self._keyset else max_rows
            # Keyset pagination down from the newest row as it is now: rows committed
            # meanwhile are above `top` and stay out, as they would of one statement.
            below = () if upto is None else ((f"{self.order} <= {_P}", (upto,)),)
            where, params = self._where(*below)
            top_sql = f"SELECT max({self.order}) FROM {self.table}{where}"
            top = conn.execute(*self._bind(top_sql, params)).fetchall()[0][0]
            skip = 0  # rows already read whose order equals `top` (a non-unique column)
            parts: list[np.ndarray] = []
            left = max_rows
            while top is not None and left > 0:
                want = min(chunk, left)
                started = time.monotonic()
                rows = conn.execute(select, (*part, top, want, skip)).fetchall()
                took = time.monotonic() - started
                parts.append(np.array(rows, dtype=np.float64).reshape(len(rows), width))
                left -= len(rows)
                if len(rows) < want or left == 0:
                    break
                last = rows[-1][0]
                ties = len(rows) - next(i for i, row in enumerate(rows) if row[0] == last)
                skip = skip + ties if last == top else ties
                top = last
                time.sleep(took * self.yield_ratio)
            return parts

        parts = self._run(read)
        if not parts:
            return _readings(np.empty((0, width)))
        return _readings(np.concatenate([part[::-1] for part in reversed(parts)]))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._fd is not None:
            _descriptors.give_back(self._fd)
            self._fd = None
        self._time = None


# PostgreSQL time_column types (base types, so domains over them count too) and how
# each becomes epoch seconds; a naive timestamp is taken as UTC, as SQLite does.
_PG_TIMESTAMPS = ("timestamp with time zone", "timestamp without time zone", "date")
_PG_NUMBERS = ("smallint", "integer", "bigint", "real", "double precision", "numeric")
_PG_TEXTS = ("text", "character varying", "character")
# A failing cast would abort the whole read, and pg_input_is_valid() needs PostgreSQL 16,
# so text is cast only where the cast cannot fail: ISO 8601 as PostgreSQL parses it
# (year >= 1000, offsets within its +-15:59), and then, in a nested CASE because AND
# does not fix the evaluation order, only if the day exists in that month.
_PG_ISO = (
    r"^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"([ T]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?(Z|[+-](0\d|1[0-5])(:?[0-5]\d)?)?)?$"
)


def _pg_time(column: str, type_name: str) -> str | None:
    """SQL giving `column` (quoted) of `type_name` as float8 epoch seconds, or None."""
    if type_name in _PG_TIMESTAMPS:
        return f"extract(epoch FROM {column})::float8"
    if type_name in _PG_NUMBERS:
        return _epoch_number(f"{column}::float8")
    if type_name in _PG_TEXTS:
        last_day = (
            f"date_part('day', make_date(substr({column}, 1, 4)::int, "
            f"substr({column}, 6, 2)::int, 1) + interval '1 month - 1 day')"
        )
        return (
            f"CASE WHEN {column} ~ '{_PG_ISO}' THEN "
            f"CASE WHEN substr({column}, 9, 2)::int <= {last_day} "
            f"THEN extract(epoch FROM {column}::timestamptz)::float8 END END"
        )
    return None


class PostgresSource(Source):
    """psycopg 3, in read-only transactions with a statement timeout.

    Rows come back through COPY as CSV and are parsed by numpy in C, so no
    per-row Python objects are built for a 200 000-row read.
    """

    where = "postgres"
    # A nullable order column's NULL sorts first in ORDER BY ... DESC: such a row was read
    # as the newest each time, its order a NaN.
    _numbered = "{order} IS NOT NULL"
    _unnumbered = ("{order} IS NULL", "NULL")

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self._conn = None

    def _connect(self):
        import psycopg  # imported here: SQLite-only gateways need no libpq

        if self._conn is None or self._conn.closed:
            self._time = None  # a new connection checks the columns again
            settings = {
                "statement_timeout": int(self.cfg.statement_timeout * 1000),
                "default_transaction_read_only": "on",
                "timezone": "UTC",  # naive text times are UTC, as in SQLite
            }
            try:
                self._conn = psycopg.connect(
                    self.cfg.dsn or "",
                    password=read_secret(self.cfg.password_file, "pg-password"),
                    connect_timeout=max(1, round(self.cfg.connect_timeout)),
                    options=" ".join(f"-c {k}={v}" for k, v in settings.items()),
                    application_name="smocsd",
                    autocommit=True,
                )
            except psycopg.Error as exc:
                # libpq keeps no SQLSTATE (3D000) for an error at connect, only the
                # server's message, which is English unless its lc_messages says otherwise.
                missing = re.search(r'database "(.*)" does not exist', str(exc))
                if missing:
                    raise NoDatabase(
                        f'postgres: no such database "{missing[1]}" (source.dsn); '
                        "waiting for the ingest to create it"
                    ) from None
                raise SourceError(f"postgres: cannot connect: {_first_line(exc)}") from None
        return self._conn

    def _run(self, work):
        import psycopg

        try:
            conn = self._connect()
            with conn.transaction(), conn.cursor() as cur:
                if self._time is None:
                    self._time = self._check(cur)
                    self._warn_unnumbered(cur)
                return work(cur)
        except psycopg.Error as exc:
            self.close()  # the next cycle reconnects (the server may have restarted)
            raise SourceError(f"postgres: {_first_line(exc)}") from None

    def _bind(self, sql: str, params: tuple) -> tuple[str, Any]:
        # psycopg parses placeholders only when given parameters, and then a % in a name
        # ("Load %") must be %%; COPY does not even take an empty tuple as parameters.
        if not params:
            return sql, None
        return sql.replace("%", "%%").replace(_P, "%s"), params

    def _check(self, cur) -> str:
        """Checks the configured columns and sets the partition condition; returns the
        time_column expression for its type.

        The table is resolved as the reads resolve it: quoted, through search_path when
        unqualified. Names are compared exactly, since quoted names are case-sensitive.
        """
        oid = cur.execute("SELECT to_regclass(%s)::oid", (self.table,)).fetchone()[0]
        if oid is None:
            raise self._no_table(self._near_table(cur))
        types = dict(
            cur.execute(
                "SELECT a.attname, coalesce(nullif(t.typbasetype, 0), t.oid)::regtype::text"
                " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                " WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped",
                (oid,),
            ).fetchall()
        )
        for key, column in self._wanted():
            if column not in types:
                raise self._no_column(key, column, types)
        column = self.cfg.partition_column
        self._part = None
        if column is not None and self.cfg.partition is not None:
            # Bound as the column's type, so its index serves: an integer column gets an int
            # (or NULL, equal to nothing: text not an integer would fail the read), other
            # columns untyped text, which the server reads as the column's type.
            value: Any = self.cfg.partition
            if types[column] in ("smallint", "integer", "bigint"):
                value = int(value) if re.fullmatch(r"[0-9]{1,18}", value) else None
            self._part = (f"{quote(column)} = {_P}", (value,))
        if column is not None and not self._index_checked:
            self._check_partition_index(cur, oid, column)
            self._index_checked = True
        time = _pg_time(quote(self.cfg.time_column), types[self.cfg.time_column])
        if time is None:
            raise SourceError(
                f"postgres: column {quote(self.cfg.time_column)} in table {self.cfg.table} "
                f"is {types[self.cfg.time_column]}, not a timestamp, date, number or text "
                "(source.time_column)"
            )
        return time

    def _check_partition_index(self, cur, oid: int, column: str) -> None:
        """Warns if no valid index starts with the partition column. A view or a foreign
        table has none of its own, and is left alone."""
        kind, indexed = cur.execute(
            "SELECT c.relkind::text, EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid"
            " AND i.indisvalid AND i.indkey[0] = a.attnum)"
            " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s"
            " WHERE c.oid = %s::oid",
            (column, oid),
        ).fetchone()
        if not indexed and kind not in ("v", "f"):
            self._warn_unindexed(f"ON {self.table}", [column, self.cfg.order_column or "rowid"])

    def _near_table(self, cur) -> str | None:
        """A table whose name differs only in case, for the error's hint."""
        where, params = "pg_table_is_visible(c.oid)", (self.name,)
        if self.schema:
            where, params = "lower(n.nspname) = lower(%s)", (self.name, self.schema)
        row = cur.execute(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND lower(c.relname) = lower(%s)"
            f" AND {where} ORDER BY 1, 2 LIMIT 1",
            params,
        ).fetchone()
        if row is None:
            return None
        return f"{row[0]}.{row[1]}" if self.schema else row[1]

    def _columns(self) -> str:
        # Non-finite floats come back as NaN/Infinity; NULL as None or COPY's 'nan'.
        cols = ", ".join(f"{quote(c)}::float8" for c in self.cfg.channels)
        return f"{self.order}::int8, {self._time}, {cols}"  # after the check: _time is set

    def read_newest(self, max_rows: int, upto: int | None = None) -> Readings:
        import numpy as np

        n = len(self.cfg.channels)

        def copy(cur) -> bytes:
            below = () if upto is None else ((f"{self.order} <= {_P}", (int(upto),)),)
            where, params = self._where(*below)
            inner = (
                f"SELECT {self._columns()} FROM {self.table}{where} "
                f"ORDER BY {self.order} DESC LIMIT {int(max_rows)}"
            )
            buf = io.BytesIO()
            # COPY takes no bound parameters: psycopg merges them into the text client-side.
            sql = f"COPY ({inner}) TO STDOUT WITH (FORMAT csv, NULL 'nan')"
            with cur.copy(*self._bind(sql, params)) as cp:
                for chunk in cp:
                    buf.write(chunk)
            return buf.getvalue()

        text = self._run(copy)
        if not text:
            return _readings(np.empty((0, n + 2)))
        data = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64, ndmin=2)
        return _readings(data[np.argsort(data[:, 0], kind="stable")])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._time = None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_source(cfg: SourceConfig) -> Source:
    return PostgresSource(cfg) if cfg.kind == "postgres" else SQLiteSource(cfg)
