"""The PostgreSQL source against a real server: read end to end, restarts, a wrong password,
a database not created yet."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import smocsd, write_config
from test_daemon import running  # noqa: F401 - the fixture

from smocsd.common.config import SourceConfig
from smocsd.data import demo
from smocsd.data.sources import NoDatabase, PostgresSource, SourceError, quote

CHANNELS = ("temperature", "vibration", "current")


def load_rows(pg, start: int, rows: int, table: str = "readings") -> None:
    """Demo readings into `table` (id bigserial), inserted as the superuser."""
    data = demo.simulate(rows, start_index=start)
    columns = zip(*(data[c].tolist() for c in ("ts", *CHANNELS)), strict=True)
    values = ", ".join(  # a sensor dropout (NaN) is NULL, as the demo writes it to SQLite
        "(" + ", ".join("NULL" if x != x else repr(x) for x in row) + ")" for row in columns
    )
    pg.admin(
        f"CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, ts float8, "
        "temperature float8, vibration float8, current real)",
        f"GRANT SELECT ON {table} TO {pg.user}",
        f"INSERT INTO {table} (ts, temperature, vibration, current) VALUES {values}",
        dbname=pg.dbname,
    )


@pytest.fixture
def plant(postgres, tmp_path):
    """Table `readings` with 3000 rows and a config reading it, password from a 0600 file."""
    table = f"readings_{int(time.monotonic() * 1e6)}"
    load_rows(postgres, 0, 3000, table)
    secret = tmp_path / "pg.pass"
    secret.write_text(postgres.password + "\n")
    secret.chmod(0o600)
    source = {
        "kind": "postgres",
        "dsn": postgres.dsn,
        "password_file": str(secret),
        "table": table,
        "order_column": "id",
    }
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state", source=source)
    return table, cfg, source


def test_train_once_on_postgres_data(postgres, plant):
    table, cfg, _ = plant
    postgres.admin(
        f"UPDATE {table} SET temperature = NULL WHERE id = 100",
        f"UPDATE {table} SET vibration = 'NaN' WHERE id = 200",
        f"UPDATE {table} SET current = 'Infinity' WHERE id = 300",
        dbname=postgres.dbname,
    )
    result = json.loads(smocsd("train-once", config=cfg, check=True).stdout)
    assert result["outcome"] == "promoted"
    data = result["model_meta"]["data"]
    demo_rows = demo.simulate(3000)  # its sensor dropouts are NULL too
    bad = ~np.isfinite(np.column_stack([demo_rows[c] for c in CHANNELS])).all(axis=1)
    bad[[99, 199, 299]] = True
    dropped = int(bad.sum())
    assert data == {
        **data,
        "rows": 3000,
        "dropped_rows": dropped,
        "first_order": 1,
        "last_order": 3000,
    }


def test_reads_match_the_table_and_run_read_only(postgres, plant):
    table, _, source = plant
    src = PostgresSource(
        SourceConfig(
            channels=CHANNELS,
            **{**source, "password_file": Path(source["password_file"])},
        )
    )
    got = src.read_newest(500)
    assert got.order.tolist() == list(range(2501, 3001))
    expected = demo.simulate(3000)
    np.testing.assert_allclose(got.values[:, 0], expected["temperature"][2500:])
    np.testing.assert_allclose(got.values[:, 2], expected["current"][2500:], rtol=1e-6)
    assert src.count_after(2990) == 10
    with pytest.raises(SourceError, match="read-only transaction"):
        src._run(lambda cur: cur.execute(f"DELETE FROM {table}"))
    src.close()


def test_a_wrong_password_is_one_clear_line(postgres, plant, tmp_path):
    _, _, source = plant
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    bad = write_config(
        tmp_path / "bad.toml", tmp_path / "state", source={**source, "password_file": str(wrong)}
    )
    proc = smocsd("train-once", config=bad)
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error.startswith("SourceError: postgres: cannot connect:")
    assert "password authentication failed" in error
    assert "\n" not in error


def test_a_postgres_restart_between_ticks(postgres, plant, running, tmp_path):  # noqa: F811
    table, cfg, _ = plant
    fast = cfg.read_text().replace("[daemon]", '[daemon]\ncheck_interval = "0.3s"')
    cfg.write_text(fast)
    d = running(cfg, tmp_path / "log")
    d.wait_for("promoted v1")
    postgres.stop()
    d.wait_for("failed: SourceError: postgres", count=2)
    postgres.start()
    load_rows(postgres, 3000, 600, table)
    d.wait_for(" v2: ")  # reconnected: trained again on the new rows, promoted or rejected
    assert d.proc.poll() is None
    assert d.stop() == 0


T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ODD = ("Température °C", "Load %", 'say "hi"')
# time_column -> (SQL type, the three rows' values, the epoch seconds expected)
TIMES = {
    "Time Stamp": (
        "timestamptz",
        ["'2026-01-01 01:00:00+01'", "NULL", "'infinity'"],
        [T0, None, None],
    ),
    "naive": ("timestamp", ["'2026-01-01 00:00:01.5'", "NULL", "NULL"], [T0 + 1.5, None, None]),
    "day": ("date", ["'2026-01-01'", "'2026-01-02'", "NULL"], [T0, T0 + 86400, None]),
    "epoch s": ("numeric", [repr(T0), "'NaN'", "NULL"], [T0, None, None]),
    "epoch ms": (
        "bigint",
        [str(int(T0 * 1000) + 250), str(int(T0)), "NULL"],
        [T0 + 0.25, T0, None],
    ),
    "iso text": (
        "text",
        ["'2026-01-01T02:00:00+02:00'", "'2026-02-30 00:00:00'", "'now'"],
        [T0, None, None],  # an impossible day and words are no time, and fail no read
    ),
    "naive text": (
        "varchar(40)",
        ["'2026-01-01 00:00:00.25'", "'2026-01-01'", "'x'"],
        [T0 + 0.25, T0, None],
    ),
}


@pytest.fixture
def odd_table(postgres):
    """Table <schema>.readings whose names have spaces, case, non-ASCII, % and a double
    quote, with one time column of each kind; returns the table's name."""
    schema = f"plant_{int(time.monotonic() * 1e6)}"
    cols = ", ".join(f"{quote(name)} {sql_type}" for name, (sql_type, _, _) in TIMES.items())
    rows = [
        ", ".join([*(TIMES[name][1][i] for name in TIMES), str(i + 1.5), str(i * 2.0), "1"])
        for i in range(3)
    ]
    table = f"{schema}.readings"
    postgres.admin(
        f"CREATE SCHEMA {schema}",
        f'CREATE TABLE {table} ("Row % No" bigserial PRIMARY KEY, span interval, {cols}, '
        f"{quote(ODD[0])} float8, {quote(ODD[1])} real, {quote(ODD[2])} numeric)",
        f"INSERT INTO {table} ({', '.join(map(quote, [*TIMES, *ODD]))}) "
        f"VALUES {', '.join(f'({row})' for row in rows)}",
        f"GRANT USAGE ON SCHEMA {schema} TO {postgres.user}",
        f"GRANT SELECT ON {table} TO {postgres.user}",
        dbname=postgres.dbname,
    )
    return table


def pg_source(postgres, table: str, **kw) -> PostgresSource:
    settings = {"time_column": "Time Stamp", "order_column": "Row % No", "channels": ODD, **kw}
    return PostgresSource(
        SourceConfig(
            kind="postgres",
            dsn=f"{postgres.dsn}?password={postgres.password}",
            table=table,
            **settings,
        )
    )


def test_any_column_name_in_a_schema_qualified_table(postgres, odd_table):
    src = pg_source(postgres, odd_table)
    assert src.count_after(1) == 2  # with a bound value and a % in the order column
    assert src.max_order() == 3  # ... and with none
    got = src.read_newest(2)
    assert got.order.tolist() == [2, 3]
    assert got.values.tolist() == [[2.5, 2.0, 1.0], [3.5, 4.0, 1.0]]
    src.close()


@pytest.mark.parametrize("column", list(TIMES))
def test_times_become_epoch_seconds(postgres, odd_table, column):
    src = pg_source(postgres, odd_table, time_column=column)
    got = src.read_newest(10)
    expected = [np.nan if t is None else t for t in TIMES[column][2]]
    np.testing.assert_allclose(got.time, expected, rtol=0, atol=1e-6)
    assert not got.bad_rows.any()
    src.close()


def test_a_time_column_of_another_type_is_one_clear_line(postgres, odd_table):
    with pytest.raises(SourceError) as exc:
        pg_source(postgres, odd_table, time_column="span").count_after(None)
    assert str(exc.value) == (
        f'postgres: column "span" in table {odd_table} is interval, '
        "not a timestamp, date, number or text (source.time_column)"
    )


def test_missing_columns_and_tables_name_the_key_and_the_near_match(postgres, odd_table):
    upper = odd_table.replace("readings", "Readings")  # quoted, so not the same table
    cases = [
        (
            {"channels": ("température °C",)},
            'no such column "température °C" in table '
            f'{odd_table} (source.channels); did you mean "Température °C"?',
        ),
        ({"order_column": "id"}, f'no such column "id" in table {odd_table} (source.order_column)'),
        (
            {"table": upper},
            f"no such table {upper} (source.table); did you mean {odd_table}?",
        ),
        ({"table": "no_schema.readings"}, "no such table no_schema.readings (source.table)"),
    ]
    for kw, message in cases:
        src = pg_source(postgres, kw.pop("table", odd_table), **kw)
        with pytest.raises(SourceError) as exc:
            src.read_newest(10)
        assert str(exc.value) == f"postgres: {message}"
        src.close()


def test_an_unqualified_table_is_found_through_search_path(postgres):
    """The default search_path starts with "$user": a table in schema smocsd is found."""
    table = f"readings_{int(time.monotonic() * 1e6)}"
    postgres.admin(
        f"CREATE SCHEMA IF NOT EXISTS {postgres.user} AUTHORIZATION {postgres.user}",
        f"CREATE TABLE {postgres.user}.{table} (id int, ts float8, a float8)",
        f"INSERT INTO {postgres.user}.{table} VALUES (1, {T0}, 2.0)",
        f"GRANT SELECT ON {postgres.user}.{table} TO {postgres.user}",
        dbname=postgres.dbname,
    )
    src = pg_source(postgres, table, time_column="ts", order_column="id", channels=("a",))
    got = src.read_newest(10)
    assert (got.order.tolist(), got.time.tolist(), got.values.tolist()) == ([1], [T0], [[2.0]])
    src.close()


def test_columns_are_checked_once_per_connection(postgres, odd_table):
    src = pg_source(postgres, odd_table)
    calls = []
    check = src._check
    src._check = lambda cur: calls.append(cur) or check(cur)
    src.count_after(None)
    src.read_newest(5)
    src.count_after(1)
    assert len(calls) == 1
    src.close()  # as after a failed query: the next connection checks again
    src.count_after(None)
    assert len(calls) == 2
    src.close()


def test_a_missing_database_is_no_database(postgres):
    dsn = postgres.dsn.rpartition("/")[0] + "/not_yet"
    src = PostgresSource(
        SourceConfig(kind="postgres", dsn=f"{dsn}?password={postgres.password}", channels=("a",))
    )
    with pytest.raises(NoDatabase) as exc:
        src.check()
    assert str(exc.value) == (
        'postgres: no such database "not_yet" (source.dsn); waiting for the ingest to create it'
    )


def plain_table(postgres, *rows: str) -> str:
    """A new table (id int8, ts float8, a float8) of a name of its own, indexed on id,
    holding `rows` (SQL tuples), that smocsd's user may read."""
    table = f"readings_{int(time.monotonic() * 1e6)}"
    postgres.admin(
        f"CREATE TABLE {table} (id int8, ts float8, a float8)",
        f"CREATE INDEX ON {table} (id)",
        *([f"INSERT INTO {table} VALUES {', '.join(rows)}"] if rows else []),
        f"GRANT SELECT ON {table} TO {postgres.user}",
        dbname=postgres.dbname,
    )
    return table


def test_check_and_max_order(postgres):
    table = plain_table(postgres)
    src = pg_source(postgres, table, time_column="ts", order_column="id", channels=("a",))
    src.check()
    assert src.max_order() is None
    postgres.admin(f"INSERT INTO {table} VALUES (7, {T0}, 1), (3, {T0}, 2)", dbname=postgres.dbname)
    assert src.max_order() == 7
    with pytest.raises(SourceError) as exc:
        pg_source(postgres, table, time_column="ts", order_column="id", channels=("b",)).check()
    assert str(exc.value) == f'postgres: no such column "b" in table {table} (source.channels)'
    src.close()


def test_a_null_order_value_is_left_out_with_one_warning(postgres, caplog):
    """PostgreSQL sorts NULL first in ORDER BY ... DESC: a row of a nullable order column
    with no value was read as the newest each time, its order a NaN."""
    table = plain_table(postgres, f"(1, {T0}, 1)", f"(2, {T0 + 1}, 2)", f"(NULL, {T0 + 2}, 99)")
    src = pg_source(postgres, table, time_column="ts", order_column="id", channels=("a",))
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        got = src.read_newest(10)
        assert got.order.tolist() == [1, 2] and got.values[:, 0].tolist() == [1.0, 2.0]
        assert src.count_after(None) == 2 and (src.min_order(), src.max_order()) == (1, 2)
    assert [r.getMessage() for r in caplog.records] == [
        f'postgres: 1 rows of table {table} have no integer order value (NULL in column "id") '
        "and are left out: source.order_column must be an integer column"
    ]
    src.close()


# One model per asset: source.partition_column, here named with a % and a space.
ASSET = "Asset %"


def asset_table(postgres, sql_type: str, assets: tuple, index: bool = True) -> str:
    """Rows id 1..30 whose asset cycles through `assets`; a and b are the id and 2 * id."""
    table = f"assets_{int(time.monotonic() * 1e6)}"
    values = ", ".join(
        f"({i}, {assets[i % len(assets)]}, {T0 + i}, {i}, {2 * i})" for i in range(1, 31)
    )
    postgres.admin(
        f'CREATE TABLE {table} ("Row % No" int8 PRIMARY KEY, {quote(ASSET)} {sql_type}, '
        "ts float8, a float8, b real)",
        *([f'CREATE INDEX ON {table} ({quote(ASSET)}, "Row % No")'] if index else []),
        f"INSERT INTO {table} VALUES {values}",
        f"GRANT SELECT ON {table} TO {postgres.user}",
        dbname=postgres.dbname,
    )
    return table


def asset_source(postgres, table: str, partition: str | None = None) -> PostgresSource:
    return pg_source(
        postgres,
        table,
        time_column="ts",
        channels=("a", "b"),
        partition_column=ASSET,
        partition=partition,
    )


# SQL type, values stored, (partition, its ids), partitions(): an int column's 7 is "7".
PG_ASSETS = {
    "integer": ("int4", ("7", "8", "NULL"), ("7", range(3, 31, 3)), [7, 8]),
    "bigint": ("bigint", ("7", "8", "NULL"), ("8", range(1, 31, 3)), [7, 8]),
    "text": ("text", ("'pump-1'", "'7'", "NULL"), ("7", range(1, 31, 3)), ["7", "pump-1"]),
}


@pytest.mark.parametrize("kind", list(PG_ASSETS))
def test_a_partition_reads_only_its_rows(postgres, kind, caplog):
    sql_type, assets, (value, ids), values = PG_ASSETS[kind]
    ids = list(ids)
    table = asset_table(postgres, sql_type, assets)
    src = asset_source(postgres, table, value)
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        assert src.count_after(None) == len(ids)
    assert caplog.messages == []  # indexed
    assert src.count_after(ids[-3]) == 2
    assert (src.min_order(), src.max_order()) == (ids[0], ids[-1])
    got = src.read_newest(5)
    assert got.order.tolist() == ids[-5:]
    assert got.values.tolist() == [[i, 2 * i] for i in ids[-5:]]
    assert got.time.tolist() == [T0 + i for i in ids[-5:]]
    assert src.read_newest(2, upto=ids[-2] - 1).order.tolist() == ids[-4:-2]
    assert asset_source(postgres, table, "nobody").count_after(None) == 0
    whole = asset_source(postgres, table)
    assert whole.read_newest(2, upto=10).order.tolist() == [9, 10]
    assert sorted(whole.partitions()) == values
    # The value is bound as the column's type: the index serves the filter.
    where, params = src._where()
    sql, params = src._bind(f"SELECT count(*) FROM {src.table}{where}", params)

    def explain(cur) -> str:
        cur.execute("SET LOCAL enable_seqscan = off")
        return "\n".join(row[0] for row in cur.execute(f"EXPLAIN {sql}", params))

    assert 'Index Cond: (("Asset %" = ' in src._run(explain)  # and the order IS NOT NULL
    for s in (src, whole):
        s.close()


def test_read_tagged_reads_the_newest_rows_of_every_partition(postgres):
    table = asset_table(postgres, "text", ("'pump-1'", "'7'", "NULL"))
    postgres.admin(
        f"UPDATE {table} SET a = 'NaN', ts = NULL WHERE \"Row % No\" = 29",
        f'UPDATE {table} SET b = NULL WHERE "Row % No" = 28',
        f"UPDATE {table} SET b = 'Infinity' WHERE \"Row % No\" = 27",
        dbname=postgres.dbname,
    )
    src = asset_source(postgres, table, "7")  # a model's source reads all partitions' rows
    got, tags = src.read_tagged(25, 100)
    assert got.order.tolist() == [26, 27, 28, 29, 30]
    assert tags == [None, "pump-1", "7", None, "pump-1"]
    assert got.values[0].tolist() == [26.0, 52.0]
    assert got.bad_rows.tolist() == [False, True, True, True, False]
    assert np.isnan(got.time[3]) and got.time[4] == T0 + 30
    newest, tags = src.read_tagged(None, 3)
    assert newest.order.tolist() == [28, 29, 30] and tags == ["7", None, "pump-1"]
    empty, tags = src.read_tagged(30, 10)
    assert empty.values.shape == (0, 2) and tags == []
    src.close()


def test_a_partition_column_without_an_index_is_warned_once(postgres, caplog):
    table = asset_table(postgres, "int8", ("7", "8"), index=False)
    src = asset_source(postgres, table, "7")
    with caplog.at_level(logging.WARNING, logger="smocsd.data.sources"):
        src.count_after(None)
        src.close()
        assert src.read_newest(2).order.tolist() == [28, 30]  # checked again, not warned
    assert caplog.messages == [
        f'postgres: no index on "Asset %" of table {table}: each model\'s reads scan the '
        f'whole table; CREATE INDEX ON "{table}" ("Asset %", "Row % No")'
    ]
    src.close()


def test_a_missing_partition_column_names_the_key(postgres):
    table = asset_table(postgres, "int8", ("7",))
    src = pg_source(postgres, table, time_column="ts", channels=("a",), partition_column="asset")
    with pytest.raises(SourceError) as exc:
        src.partitions()
    assert str(exc.value) == (
        f'postgres: no such column "asset" in table {table} (source.partition_column)'
    )
