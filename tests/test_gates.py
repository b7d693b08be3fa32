"""The daemon's look at each model's gates before it starts a training process: a certain
"not yet" starts none, anything the process would decide otherwise starts one."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import write_config

from smocsd.app.gates import Gates
from smocsd.common import config
from smocsd.common.labels import By, Kind, Label
from smocsd.common.state import JobEntry, StateFile
from smocsd.data import demo

pytestmark = pytest.mark.fast


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    demo.write(tmp_path / "state" / "readings.db", 3000)
    path = write_config(tmp_path / "c.toml", tmp_path / "state")
    return config.load(path)


def state(last_order: int | None, trained_at: float | None = None, accept_tried: int = 0):
    entry = JobEntry(last_order=last_order, trained_at=trained_at, accept_tried=accept_tried)
    return StateFile(jobs={"autoencoder": entry})


def accept(label_id: int, model: str | None) -> Label:
    label = Label(label_id, Kind.ACCEPT, 1, 2, "", By.OPERATOR, "2026-12-01T00:00:00Z")
    return replace(label, model=model)


def test_a_first_training_waits_for_min_training_samples(cfg):
    gates = Gates(cfg)
    assert gates.waiting(cfg, StateFile(), []) is None  # 3000 rows of 2000
    more = replace(cfg, training=replace(cfg.training, min_training_samples=4000, max_rows=4000))
    reason = Gates(more).waiting(more, StateFile(), [])
    assert reason == "3000 rows of 4000 needed for the first training"


def test_a_retraining_waits_for_new_rows_and_the_interval(cfg):
    gates = Gates(cfg)
    assert gates.waiting(cfg, state(2800, 0.0), []) == "200 new rows of 500 needed"
    assert gates.waiting(cfg, state(2000, 0.0), []) is None
    slow = replace(cfg, training=replace(cfg.training, min_interval=3600.0))
    reason = Gates(slow).waiting(slow, state(2000, time.time() - 60), [])
    assert reason is not None and reason.endswith("min_interval is 3600s")


def test_what_the_training_process_would_decide_otherwise_starts_it(cfg):
    gates = Gates(cfg)
    assert gates.waiting(cfg, state(5000, 0.0), []) is None  # ids went backwards
    assert gates.waiting(cfg, state(2800, time.time() + 3600), []) is None  # clock set back
    # a new accept label for this model, or for every model, trains at once ...
    assert gates.waiting(cfg, state(2800, 0.0, accept_tried=1), [accept(2, None)]) is None
    assert gates.waiting(cfg, state(2800, 0.0), [accept(1, "autoencoder")]) is None
    # ... another model's does not, nor one it has trained for
    assert gates.waiting(cfg, state(2800, 0.0), [accept(1, "other")]) is not None
    assert gates.waiting(cfg, state(2800, 0.0, accept_tried=2), [accept(2, None)]) is not None
    user = replace(cfg, training=replace(cfg.training, job="userjob:CountingJob"))
    assert Gates(user).waiting(user, state(2800, 0.0), []) is None  # its gates are its own


def test_a_partition_counts_its_own_rows(tmp_path):
    import sqlite3

    db = tmp_path / "state" / "readings.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, ts, asset, a, b, c)")
        conn.executemany(
            "INSERT INTO readings (ts, asset, a, b, c) VALUES (?, ?, 1, 2, 3)",
            [(i, "P-1" if i % 4 else "P-2") for i in range(4000)],
        )
    conn.close()
    cfg = config.load(
        write_config(
            tmp_path / "c.toml",
            tmp_path / "state",
            source={"partition_column": "asset", "channels": ["a", "b", "c"]},
        )
    )
    gates = Gates(cfg)
    assert gates.waiting(cfg.for_partition("P-1"), StateFile(), []) is None  # 3000 rows
    reason = gates.waiting(cfg.for_partition("P-2"), StateFile(), [])
    assert reason == "1000 rows of 2000 needed for the first training"
    gates.close()


def test_a_check_holds_no_source_open_after_it(tmp_path):
    """One connection per model held between checks would pass a PostgreSQL server's
    max_connections at a hundred assets: the daemon closes them after each look."""
    from smocsd.app.daemon import Daemon

    demo.write(tmp_path / "state" / "readings.db", 1000)  # too few: every model waits
    path = write_config(tmp_path / "c.toml", tmp_path / "state")
    path.write_text(path.read_text() + "[models.a]\n[models.b]\n")
    daemon = Daemon(path, config.load(path))
    try:
        daemon._tick()
        assert daemon.last.startswith("2 models, 2 waiting for data")
        assert daemon.gates.sources == {}
    finally:
        daemon.parts.close()
