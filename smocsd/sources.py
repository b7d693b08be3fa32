"""Where readings come from: a SQLite file or a PostgreSQL table, read-only.

Table and column names come from the config: they are validated as identifiers
there and quoted here; values are always bound parameters.
"""

from __future__ import annotations

import io
import logging
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import SourceConfig, read_secret

log = logging.getLogger(__name__)


class SourceError(Exception):
    """The database cannot be read this cycle (down, locked, missing table, bad password)."""


@dataclass(frozen=True)
class Readings:
    """The newest rows, oldest first; a NULL, NaN, inf or non-numeric value is NaN in `values`."""

    order: np.ndarray  # int64 (n,), the order_column values
    values: np.ndarray  # float64 (n, channels)

    @property
    def bad_rows(self) -> np.ndarray:
        """Mask of rows that must never reach training."""
        return ~np.isfinite(self.values).all(axis=1)


def quote(identifier: str) -> str:
    """Quotes a validated identifier (optionally schema-qualified) for SQL."""
    return ".".join(f'"{part}"' for part in identifier.split("."))


class Source(ABC):
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.order = quote(cfg.order_column or "rowid")
        self.table = quote(cfg.table)

    @abstractmethod
    def count_after(self, last_order: int | None) -> int:
        """Rows with order_column > last_order (all rows when None)."""

    @abstractmethod
    def read_newest(self, max_rows: int) -> Readings:
        """At most `max_rows` newest rows by order_column, oldest first."""

    def close(self) -> None:  # noqa: B027 - a source may hold nothing to release
        """Releases the connection; the next call reconnects."""

    def _count_sql(self, last_order: int | None, placeholder: str) -> tuple[str, tuple]:
        sql = f"SELECT count(*) FROM {self.table}"
        if last_order is None:
            return sql, ()
        return f"{sql} WHERE {self.order} > {placeholder}", (last_order,)


class SQLiteSource(Source):
    """Opened read-only: the ingest software owns the file and may be writing in WAL mode."""

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self.path: Path = cfg.path  # type: ignore[assignment]
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

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._connect().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self.close()
            raise SourceError(f"{self.path}: {exc}") from None

    def count_after(self, last_order: int | None) -> int:
        return self._query(*self._count_sql(last_order, "?"))[0][0]

    def read_newest(self, max_rows: int) -> Readings:
        # typeof() turns text or blobs in a numeric column into NULL (-> NaN) so one bad
        # row is dropped instead of failing the cycle; SQLite itself cannot hold NaN.
        cols = ", ".join(
            f"CASE WHEN typeof({quote(c)}) IN ('integer', 'real') THEN {quote(c)} END"
            for c in self.cfg.channels
        )
        rows = self._query(
            f"SELECT * FROM (SELECT {self.order}, {cols} FROM {self.table} "
            f"ORDER BY {self.order} DESC LIMIT ?) ORDER BY 1",
            (max_rows,),
        )
        data = np.array(rows, dtype=np.float64).reshape(len(rows), len(self.cfg.channels) + 1)
        return Readings(order=data[:, 0].astype(np.int64), values=data[:, 1:])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresSource(Source):
    """psycopg 3, in read-only transactions with a statement timeout.

    Rows come back through COPY as CSV and are parsed by numpy in C, so no
    per-row Python objects are built for a 200 000-row read.
    """

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self._conn = None

    def _connect(self):
        import psycopg  # imported here: SQLite-only gateways need no libpq

        if self._conn is None or self._conn.closed:
            settings = {
                "statement_timeout": int(self.cfg.statement_timeout * 1000),
                "default_transaction_read_only": "on",
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
                return work(cur)
        except psycopg.Error as exc:
            self.close()  # the next cycle reconnects (the server may have restarted)
            raise SourceError(f"postgres: {_first_line(exc)}") from None

    def count_after(self, last_order: int | None) -> int:
        sql, params = self._count_sql(last_order, "%s")
        return self._run(lambda cur: cur.execute(sql, params).fetchone()[0])

    def read_newest(self, max_rows: int) -> Readings:
        n = len(self.cfg.channels)
        # Non-finite floats come back as NaN/Infinity, NULL as 'nan'; both become non-finite.
        cols = ", ".join(f"{quote(c)}::float8" for c in self.cfg.channels)
        inner = (
            f"SELECT {self.order}::int8, {cols} FROM {self.table} "
            f"ORDER BY {self.order} DESC LIMIT {int(max_rows)}"
        )

        def copy(cur) -> bytes:
            buf = io.BytesIO()
            with cur.copy(f"COPY ({inner}) TO STDOUT WITH (FORMAT csv, NULL 'nan')") as cp:
                for chunk in cp:
                    buf.write(chunk)
            return buf.getvalue()

        text = self._run(copy)
        if not text:
            return Readings(np.empty(0, np.int64), np.empty((0, n)))
        data = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64, ndmin=2)
        data = data[np.argsort(data[:, 0], kind="stable")]
        return Readings(order=data[:, 0].astype(np.int64), values=data[:, 1:])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_source(cfg: SourceConfig) -> Source:
    return PostgresSource(cfg) if cfg.kind == "postgres" else SQLiteSource(cfg)
