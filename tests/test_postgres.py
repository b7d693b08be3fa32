"""The PostgreSQL source against a real server: read end to end, restarts, a wrong password."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import smocsd, write_config
from test_daemon import running  # noqa: F401 - the fixture

from smocsd import demo
from smocsd.config import SourceConfig
from smocsd.sources import PostgresSource, SourceError

CHANNELS = ("temperature", "vibration", "current")


def load_rows(pg, start: int, rows: int, table: str = "readings") -> None:
    """Demo readings into `table` (id bigserial), inserted as the superuser."""
    data = demo.simulate(rows, start_index=start)
    columns = zip(*(data[c].tolist() for c in ("ts", *CHANNELS)), strict=True)
    values = ", ".join(f"({ts!r}, {t!r}, {v!r}, {c!r})" for ts, t, v, c in columns)
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
    assert data == {**data, "rows": 3000, "dropped_rows": 3, "first_order": 1, "last_order": 3000}


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
