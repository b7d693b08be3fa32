"""Where readings come from: a SQLite file or a PostgreSQL table, read-only.

Column names are what the plant historian chose (spaces, mixed case, non-ASCII), so
every name is quoted and every value is a bound parameter. The configured columns are
checked against the table once per connection: a typo is one line naming its config
key instead of an SQL error, and a daemon tick does not pay for the check.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .config import SourceConfig, read_secret

log = logging.getLogger(__name__)

T = TypeVar("T")
_ROWID = ("rowid", "oid", "_rowid_")  # SQLite's names for the implicit rowid
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _ascii_lower(name: str) -> str:
    """Folds case as SQLite does for names: ASCII letters only."""
    return name.translate(_ASCII_LOWER)


class SourceError(Exception):
    """The database cannot be read this cycle (down, locked, missing table, bad password)."""


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
    time = data[:, 1]
    return Readings(
        order=data[:, 0].astype(np.int64),
        time=np.where(np.isfinite(time), time, np.nan),
        values=data[:, 2:],
    )


class Source(ABC):
    where: str  # the database, as errors name it

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        # config.py keeps table names to plain identifiers, so a '.' is the schema's.
        self.schema, _, self.name = cfg.table.rpartition(".")
        self.table = ".".join(map(quote, cfg.table.split(".")))
        self.order = quote(cfg.order_column or "rowid")
        # The time_column expression; None until this connection's columns are checked.
        self._time: str | None = None

    @abstractmethod
    def count_after(self, last_order: int | None) -> int:
        """Rows with order_column > last_order (all rows when None)."""

    @abstractmethod
    def read_newest(self, max_rows: int) -> Readings:
        """At most `max_rows` newest rows by order_column, oldest first."""

    def close(self) -> None:  # noqa: B027 - a source may hold nothing to release
        """Releases the connection; the next call reconnects."""

    def _count_sql(self, last_order: int | None, placeholder: str) -> tuple[str, tuple]:
        if last_order is None:
            return f"SELECT count(*) FROM {self.table}", ()
        sql = f"SELECT count(*) FROM {self.table} WHERE {self.order} > "
        if placeholder == "%s":  # psycopg: with parameters, a % in a name ("Load %") is %%
            sql = sql.replace("%", "%%")
        return sql + placeholder, (last_order,)

    def _wanted(self) -> list[tuple[str, str]]:
        """(config key, column) for every column the reads name; SQLite's rowid is implicit."""
        wanted = [("source.time_column", self.cfg.time_column)]
        if self.cfg.order_column is not None:
            wanted.append(("source.order_column", self.cfg.order_column))
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


class SQLiteSource(Source):
    """Opened read-only: the ingest software owns the file and may be writing in WAL mode."""

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self.path: Path = cfg.path  # type: ignore[assignment]
        self.where = str(self.path)
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.exists():
                raise SourceError(f"{self.path}: no such database file")
            try:
                self._conn = sqlite3.connect(
                    f"{self.path.absolute().as_uri()}?mode=ro",
                    uri=True,
                    timeout=self.cfg.busy_timeout,
                    check_same_thread=False,
                )
            except sqlite3.Error as exc:
                raise SourceError(f"{self.path}: cannot open: {exc}") from None
        return self._conn

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._connect()
            if self._time is None:
                self._time = self._check(conn)
            return work(conn)
        except sqlite3.Error as exc:
            self.close()
            raise SourceError(f"{self.path}: {exc}") from None

    def _check(self, conn: sqlite3.Connection) -> str:
        """Checks the configured columns; returns the time_column expression.

        Names match as SQLite resolves them, ignoring ASCII case only, so a config that
        SQLite would run is never refused.
        """
        columns = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM pragma_table_info(?, ?)", (self.name, self.schema or None)
            )
        ]
        if not columns:  # a SQLite table always has a column
            raise self._no_table()
        known = {_ascii_lower(c) for c in columns}
        for key, column in self._wanted():
            rowid = key == "source.order_column" and _ascii_lower(column) in _ROWID
            if _ascii_lower(column) not in known and not rowid:
                raise self._no_column(key, column, columns)
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

    def count_after(self, last_order: int | None) -> int:
        sql, params = self._count_sql(last_order, "?")
        return self._run(lambda conn: conn.execute(sql, params).fetchone()[0])

    def read_newest(self, max_rows: int) -> Readings:
        # typeof() turns text or blobs in a numeric column into NULL (-> NaN) so one bad
        # row is dropped instead of failing the cycle; SQLite itself cannot hold NaN.
        cols = ", ".join(
            f"CASE WHEN typeof({quote(c)}) IN ('integer', 'real') THEN {quote(c)} END"
            for c in self.cfg.channels
        )
        rows = self._run(
            lambda conn: conn.execute(  # after the check, which sets self._time
                f"SELECT * FROM (SELECT {self.order}, {self._time}, {cols} FROM {self.table} "
                f"ORDER BY {self.order} DESC LIMIT ?) ORDER BY 1",
                (max_rows,),
            ).fetchall()
        )
        return _readings(
            np.array(rows, dtype=np.float64).reshape(len(rows), len(self.cfg.channels) + 2)
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
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
                raise SourceError(f"postgres: cannot connect: {_first_line(exc)}") from None
        return self._conn

    def _run(self, work):
        import psycopg

        try:
            conn = self._connect()
            with conn.transaction(), conn.cursor() as cur:
                if self._time is None:
                    self._time = self._check(cur)
                return work(cur)
        except psycopg.Error as exc:
            self.close()  # the next cycle reconnects (the server may have restarted)
            raise SourceError(f"postgres: {_first_line(exc)}") from None

    def _check(self, cur) -> str:
        """Checks the configured columns; returns the time_column expression for its type.

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
        time = _pg_time(quote(self.cfg.time_column), types[self.cfg.time_column])
        if time is None:
            raise SourceError(
                f"postgres: column {quote(self.cfg.time_column)} in table {self.cfg.table} "
                f"is {types[self.cfg.time_column]}, not a timestamp, date, number or text "
                "(source.time_column)"
            )
        return time

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

    def count_after(self, last_order: int | None) -> int:
        sql, params = self._count_sql(last_order, "%s")
        return self._run(lambda cur: cur.execute(sql, params).fetchone()[0])

    def read_newest(self, max_rows: int) -> Readings:
        n = len(self.cfg.channels)
        # Non-finite floats come back as NaN/Infinity, NULL as 'nan'; both become non-finite.
        cols = ", ".join(f"{quote(c)}::float8" for c in self.cfg.channels)

        def copy(cur) -> bytes:
            inner = (  # after the check, which sets self._time
                f"SELECT {self.order}::int8, {self._time}, {cols} FROM {self.table} "
                f"ORDER BY {self.order} DESC LIMIT {int(max_rows)}"
            )
            buf = io.BytesIO()
            # No parameters: psycopg sends the text as is, % in names included.
            with cur.copy(f"COPY ({inner}) TO STDOUT WITH (FORMAT csv, NULL 'nan')") as cp:
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
