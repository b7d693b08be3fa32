"""The models a configuration stands for: the [models.<name>] tables, and a partitioned
one's model per value, found again at every check."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from helpers import write_config

from smocsd.app.modelset import ModelSet, NoSuchModel, find
from smocsd.common import config

pytestmark = pytest.mark.fast


def table(db: Path, values: list) -> None:
    db.parent.mkdir(exist_ok=True)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS readings (ts, asset, a, b, c)")
        conn.execute("CREATE INDEX IF NOT EXISTS readings_asset ON readings (asset)")
        conn.executemany("INSERT INTO readings VALUES (0, ?, 1, 2, 3)", [(v,) for v in values])


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    path = write_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        source={"partition_column": "asset", "channels": ["a", "b", "c"]},
    )
    return config.load(path)


def names(models: list[config.Config]) -> list[str]:
    return [m.model.name for m in models]


def test_one_model_per_value_integers_in_numeric_order(cfg):
    table(cfg.source.path, [10, 2, "P-1", 2, "pump.a_1"])
    models = ModelSet(cfg).resolve()
    assert names(models) == [
        "autoencoder@2",
        "autoencoder@10",
        "autoencoder@P-1",
        "autoencoder@pump.a_1",
    ]
    assert [m.source.partition for m in models] == ["2", "10", "P-1", "pump.a_1"]


def test_a_value_that_cannot_name_a_model_is_said_once_and_left_out(cfg, caplog):
    table(cfg.source.path, ["P-1", "P 2", "../x", 1.5, -3, None])
    found = ModelSet(cfg)
    with caplog.at_level(logging.WARNING):
        assert names(found.resolve()) == ["autoencoder@P-1"]
        assert names(found.resolve()) == ["autoencoder@P-1"]
    said = [r.getMessage() for r in caplog.records if "its rows are not modelled" in r.getMessage()]
    assert len(said) == 4, said  # once each: 'P 2', '../x', 1.5, -3 (NULL is no value)
    assert all("readings.asset" in line and "source.partition_column" in line for line in said)


def test_a_new_value_is_found_and_a_value_that_stops_keeps_its_model(cfg):
    table(cfg.source.path, ["P-1"])
    found = ModelSet(cfg)
    assert names(found.resolve()) == ["autoencoder@P-1"]
    table(cfg.source.path, ["P-2"])
    assert names(found.resolve()) == ["autoencoder@P-1", "autoencoder@P-2"]
    with closing(sqlite3.connect(cfg.source.path)) as conn, conn:
        conn.execute("DELETE FROM readings WHERE asset = 'P-1'")
    (cfg.state_dir / "models" / "autoencoder@P-1").mkdir(parents=True)
    assert names(found.resolve()) == ["autoencoder@P-1", "autoencoder@P-2"]


def test_an_unreadable_table_keeps_the_stored_models_and_is_said_once(cfg, caplog):
    (cfg.state_dir / "models" / "autoencoder@P-7").mkdir(parents=True)
    found = ModelSet(cfg)
    with caplog.at_level(logging.WARNING):
        assert names(found.resolve()) == ["autoencoder@P-7"]  # no database yet
        assert names(found.resolve()) == ["autoencoder@P-7"]
    assert sum("values not read" in r.getMessage() for r in caplog.records) == 1


def test_find_names_the_models_there_are(cfg):
    table(cfg.source.path, ["P-1", "P-2"])
    assert find(cfg, "autoencoder@P-2").source.partition == "P-2"
    with pytest.raises(NoSuchModel, match="autoencoder@P-1, autoencoder@P-2"):
        find(cfg, "autoencoder@P-3")
    with pytest.raises(NoSuchModel, match="several models: name one with --model"):
        find(cfg, None)
