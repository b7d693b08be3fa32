"""Live scoring: `smocsd score` agrees with it row for row, and an anomaly inserted into
the readings is one alarm event on Kafka, across a model swap and a daemon restart."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from helpers import Running, insert, smocsd, write_config

from smocsd.app.live import LiveScorer, Position, ScoredRow
from smocsd.common import config
from smocsd.data import demo
from smocsd.delivery.outbox import Outbox


@pytest.fixture
def trained(tmp_path):
    """3000 demo rows, a model trained on them, scoring on: (state dir, config path)."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    path = write_config(tmp_path / "c.toml", state, scoring={"enabled": True})
    smocsd("train-once", config=path, check=True)
    return state, path


def test_smocsd_score_agrees_with_live_scoring_row_for_row(trained):
    state, path = trained
    cfg = config.load(path)
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(cfg)
    assert scorer.step(outbox) == ([], 0)  # scoring starts at the newest row
    live = []
    for rows, factor in ((40, 1.0), (25, 6.0), (3, 1.0), (60, 1.0)):
        insert(state / "readings.db", rows, factor)
        scored, _ = scorer.step(outbox)
        live += [row.to_json() for row in scored]
    scorer.close()
    outbox.close()
    assert len(live) == 128 and any(r["anomalous"] for r in live)
    out = smocsd("score", "--from", "3001", "--json", config=path, check=True).stdout
    assert [json.loads(line) for line in out.splitlines()] == live
    text = smocsd("score", "--from", "3001", "--to", "3040", config=path, check=True).stdout
    assert text.splitlines()[-1] == "40 windows, 0 anomalous"


def test_an_anomaly_is_one_alarm_event_across_a_swap_and_a_restart(tmp_path, kafka):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    topic = f"alarms-{uuid.uuid4().hex[:8]}"
    path = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "1h"},
        scoring={"enabled": True, "close_after": 5},
        model={"promote": "always"},
        publish={"order": ["kafka", "mqtt"]},
    )
    path.write_text(
        path.read_text()
        + f'\n[publish.kafka]\nbootstrap_servers = "{kafka.bootstrap}"\nalarm_topic = "{topic}"\n'
        + f'topic = "{topic}-results"\n'
    )
    smocsd("train-once", config=path, check=True)
    smocsd("train-once", "--force", config=path, check=True)
    smocsd("models", "rollback", "1", config=path, check=True)
    db = state / "readings.db"

    def events(until, timeout=30.0) -> list[dict]:
        return [r["value"] for r in kafka.messages(topic, until=until, timeout=timeout)]

    daemon = Running(path, tmp_path / "log")
    try:
        daemon.wait_for("skipped")  # the first tick is over: scoring polls
        insert(db, 30)
        insert(db, 8, vibration_factor=6.0)
        # Out while the anomaly lasts (bench/live.py measures how soon: the README's table).
        opened = events(lambda r: any(m["value"]["state"] == "open" for m in r))
        smocsd("models", "rollback", "2", config=path, check=True)  # current changes mid-event
        insert(db, 4, vibration_factor=6.0)
        daemon.wait_for("scoring with v2")
        assert daemon.stop() == 0
        daemon = Running(path, tmp_path / "log2")  # restarted with the event open
        insert(db, 4, vibration_factor=6.0)
        insert(db, 20)
        closed = events(lambda r: any(m["value"]["state"] == "closed" for m in r))
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert [m["state"] for m in opened] == ["open"]
    assert len({m["event_id"] for m in closed}) == 1, closed  # one event, however long
    assert [m["state"] for m in closed] == ["open", "closed"]
    event = closed[-1]
    assert event["schema"] == "smocsd.alarm/1" and event["channels"][0]["name"] == "vibration"
    assert event["start"]["order"] >= 3031 and event["end"]["order"] >= 3046
    assert event["peak_score"] > event["threshold"]
    results = [
        r["value"] for r in kafka.messages(f"{topic}-results", until=lambda r: False, timeout=2)
    ]
    assert all(m["schema"] == "smocsd.training-result/1" for m in results)


# `smocsd run` dying as abruptly as at a power cut right after an alarm message is durable
# in the outbox, before live scoring saves its position.
CRASH_AFTER_ALARM = """
import os, sys
from smocsd.delivery.outbox import Outbox
from smocsd.app.cli import main
put = Outbox.put
def put_then_die(self, message):
    put(self, message)
    if message.get("schema") == "smocsd.alarm/1":
        os._exit(137)
Outbox.put = put_then_die
sys.exit(main())
"""


def test_an_alarm_made_again_after_a_crash_keeps_its_message_id(trained, tmp_path):
    """The restarted daemon scores the same rows again and queues the same `open` once
    more: with the same message_id, so consumers drop the copy."""
    state, path = trained
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(config.load(path))
    scorer.step(outbox)  # scoring starts at row 3000
    scorer.close()
    outbox.close()
    with (tmp_path / "crashed.log").open("w") as log:
        crashing = subprocess.Popen(
            [sys.executable, "-c", CRASH_AFTER_ALARM, "run", "--config", str(path)],
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        )
    try:
        insert(state / "readings.db", 30, vibration_factor=8.0)
        assert crashing.wait(timeout=120) == 137, (tmp_path / "crashed.log").read_text()
    finally:
        if crashing.poll() is None:
            crashing.kill()
            crashing.wait()
    daemon = Running(path, tmp_path / "log")
    try:
        daemon.wait_for("alarm opened")
        insert(state / "readings.db", 40)
        daemon.wait_for("alarm closed")
        assert daemon.stop() == 0
    finally:
        daemon.close()
    waiting = json.loads(smocsd("outbox", "list", "--json", config=path, check=True).stdout)
    alarms = [m for m in waiting if m["schema"] == "smocsd.alarm/1"]
    assert [m["state"] for m in alarms] == ["open", "open", "closed"]  # the copy is queued
    assert len({m["event_id"] for m in alarms}) == 1
    ids = {(m["event_id"], m["state"]): set() for m in alarms}
    for m in alarms:
        ids[m["event_id"], m["state"]].add(m["message_id"])
    assert [len(i) for i in ids.values()] == [1, 1]  # one message_id per (event, state)
    assert ids[alarms[0]["event_id"], "open"] != ids[alarms[0]["event_id"], "closed"]


def test_a_current_model_that_fails_its_check_is_not_swapped_in(trained, caplog):
    state, path = trained
    cfg = config.load(path)
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(cfg)
    scorer.step(outbox)
    models = state / "models/autoencoder"
    shutil.copytree(models / "v000001", models / "v000002")
    (models / "v000002/model.onnx").write_bytes(b"damaged")
    os.symlink("v000002", models / ".tmp-current")
    os.replace(models / ".tmp-current", models / "current")  # as another process would
    insert(state / "readings.db", 20)
    rows, _ = scorer.step(outbox)
    assert len(rows) == 20 and scorer.version == 1
    assert "scoring: keeping v1: v000002/model.onnx" in caplog.text
    status = json.loads(smocsd("status", "--json", config=path, check=True).stdout)
    assert status["scoring"]["last_order"] == 3020 and status["scoring"]["lag_rows"] == 0
    scorer.close()
    outbox.close()


def test_an_emptied_table_is_said_once_not_at_every_poll(trained, caplog):
    state, path = trained
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(config.load(path))
    scorer.step(outbox)  # starts at row 3000
    with sqlite3.connect(state / "readings.db") as conn:
        conn.execute("DELETE FROM readings")  # the ingest starts over
    for _ in range(3):
        assert scorer.step(outbox) == ([], 0)
    assert caplog.text.count("order column went backwards") == 1
    demo.write(state / "readings.db", 30, dropouts=False, gaps=False)
    rows, _ = scorer.step(outbox)
    assert len(rows) == 21  # the first whole window ends at the tenth new row
    scorer.close()
    outbox.close()


def _ingest_anew(db: Path, new: Path, keep: int, renumber: bool) -> int:
    """Writes `new` as an ingest starting a new database file would: the newest `keep`
    rows of `db` (ids from 1 if `renumber`), then 10 anomalous and 10 normal rows; returns
    the first anomalous row's id."""
    with closing(sqlite3.connect(db)) as src, closing(sqlite3.connect(new)) as dst:
        src.backup(dst)
        (top,) = dst.execute("SELECT max(id) FROM readings").fetchone()
        dst.execute("DELETE FROM readings WHERE id <= ?", (top - keep,))
        if renumber:
            dst.execute("UPDATE readings SET id = id - ?", (top - keep,))
        dst.commit()
    anomaly = insert(new, 10, vibration_factor=6.0)
    insert(new, 10)
    return anomaly


def _wal_gone(db: Path) -> None:
    """Removes the old database's WAL and index with it: left at the path, SQLite would read
    the old database's pages from them into the next file there."""
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)


def _alarms(outbox: Outbox) -> list[dict]:
    return [m for m in outbox.pending() if m.get("schema") == "smocsd.alarm/1"]


def test_a_database_replaced_under_live_scoring_is_scored_from_its_first_row(trained, caplog):
    """A new file renamed over the database: the open connection would read the old,
    unlinked file for good, and its ids go on past the last one scored, so only the file's
    identity tells. It is said once; the new file is scored from its first row, so the
    anomaly already in it is an alarm, and `status` counts on the new file."""
    state, path = trained
    db = state / "readings.db"
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(config.load(path))
    scorer.step(outbox)  # starts at row 3000
    insert(db, 20)
    assert len(scorer.step(outbox)[0]) == 20
    anomaly = _ingest_anew(db, state / "new.db", keep=30, renumber=False)  # rows 2991..3040
    _wal_gone(db)
    os.replace(state / "new.db", db)
    rows, _ = scorer.step(outbox)
    assert [r.order for r in rows] == list(range(3000, 3041))  # its first whole window on
    (alarm,) = _alarms(outbox)
    assert alarm["state"] == "open" and anomaly <= alarm["start"]["order"] < anomaly + 10
    insert(db, 5)
    assert len(scorer.step(outbox)[0]) == 5
    for _ in range(3):
        assert scorer.step(outbox) == ([], 0)
    assert caplog.text.count("was replaced by another file") == 1, caplog.text
    status = json.loads(smocsd("status", "--json", config=path, check=True).stdout)
    assert status["scoring"]["last_order"] == 3045 and status["scoring"]["lag_rows"] == 0
    scorer.close()
    outbox.close()


def test_a_deleted_database_is_waited_for_and_the_new_one_scored(trained, caplog):
    """Deleted, it is said once and waited for, not a warning at every poll, and `status`
    cannot count the lag; created again (its ids restarting), it is scored from its first
    row, and `status` counts the lag on it before scoring has caught up."""
    caplog.set_level("INFO", logger="smocsd.app.live")
    state, path = trained
    db = state / "readings.db"
    anomaly = _ingest_anew(db, state / "spare.db", keep=30, renumber=True)  # rows 1..50
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(config.load(path))
    scorer.step(outbox)  # starts at row 3000
    db.unlink()
    _wal_gone(db)
    for _ in range(3):
        assert scorer.step(outbox) == ([], 0)
    assert caplog.text.count("was deleted") == 1, caplog.text
    assert "no such database file" not in caplog.text
    status = json.loads(smocsd("status", "--json", config=path, check=True).stdout)
    assert status["scoring"]["last_order"] == 3000 and status["scoring"]["lag_rows"] is None
    with closing(sqlite3.connect(state / "spare.db")) as src, closing(sqlite3.connect(db)) as dst:
        src.backup(dst)  # the ingest writes it again, in place
    status = json.loads(smocsd("status", "--json", config=path, check=True).stdout)
    assert status["scoring"]["lag_rows"] == 50  # every row: scoring starts again at the first
    rows, _ = scorer.step(outbox)
    assert [r.order for r in rows] == list(range(10, 51))
    (alarm,) = _alarms(outbox)
    assert alarm["state"] == "open" and anomaly <= alarm["start"]["order"] < anomaly + 10
    assert scorer.step(outbox) == ([], 0)
    assert caplog.text.count("is there again: scoring it from its first row") == 1
    assert "went backwards" not in caplog.text  # the restart is said once, as the deletion
    status = json.loads(smocsd("status", "--json", config=path, check=True).stdout)
    assert status["scoring"]["last_order"] == 50 and status["scoring"]["lag_rows"] == 0
    scorer.close()
    outbox.close()


def test_an_alarm_survives_a_failed_put_and_names_its_drivers(trained, monkeypatch):
    """A put that fails (a full disk) keeps scoring's position, so the retried step opens
    the same event again, with its first window's channels ranked; `outbox list` shows it."""
    state, path = trained
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(config.load(path))
    scorer.step(outbox)  # starts at row 3000
    insert(state / "readings.db", 30, vibration_factor=8.0)
    put = Outbox.put

    def full(self, message):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Outbox, "put", full)
    with pytest.raises(OSError):
        scorer.step(outbox)
    assert scorer.position.last_order == 3000 and scorer.position.event is None
    monkeypatch.setattr(Outbox, "put", put)
    rows, queued = scorer.step(outbox)
    assert queued == 1 and any(r.anomalous for r in rows)
    (message,) = [m for m in outbox.pending() if m.get("schema") == "smocsd.alarm/1"]
    assert message["state"] == "open"
    assert message["channels"][0]["name"] == "vibration", message["channels"]
    assert message["channels"][0]["share"] > 0.5, message["channels"]
    scorer.close()
    outbox.close()
    listed = smocsd("outbox", "list", config=path, check=True).stdout
    assert f"{message['message_id']}  autoencoder v1  alarm open" in listed, listed


def test_an_event_id_is_new_for_a_recreated_database_and_survives_a_model_with_other_channels(
    trained,
):
    """An event's id is where it started, in order and time: a crash re-opens it with the
    same id, a database recreated with its ids starting over opens a new one at a reused
    order. A model with other channels swapped in mid-event adds to it, never fails."""
    _, path = trained
    scorer = LiveScorer(config.load(path))
    model = scorer._current()
    n = len(model.channels)

    def opened(order: int, time: float) -> dict:
        row = ScoredRow(order, time, 9.0, True, True, dict.fromkeys(model.channels, 1 / n))
        (message,) = scorer._events(Position(), model, [row], np.ones((1, n), np.float32))
        return message

    first = opened(40, 1.7e9)
    assert opened(40, 1.7e9)["event_id"] == first["event_id"]  # made again after a crash
    assert opened(40, 1.7e9)["message_id"] == first["message_id"]
    assert opened(40, 1.8e9)["event_id"] != first["event_id"]  # the same order, anew
    pos = Position()
    row = ScoredRow(41, 1.7e9, 9.0, True, True, {})
    scorer._events(pos, model, [row], np.ones((1, n), np.float32))
    pos.event.errors = {"a channel of the model before": 1.0}
    scorer._events(pos, model, [row], np.ones((1, n), np.float32))
    assert set(pos.event.errors) == {"a channel of the model before", *model.channels}
    scorer.close()
