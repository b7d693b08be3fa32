"""Live scoring: `smocsd score` agrees with it row for row, and an anomaly inserted into
the readings is one alarm event on Kafka, across a model swap and a daemon restart."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid

import pytest
from helpers import Running, insert, smocsd, write_config

from smocsd import config, demo
from smocsd.live import LiveScorer
from smocsd.outbox import Outbox


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
