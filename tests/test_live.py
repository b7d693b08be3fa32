"""Live scoring: `smocsd score` agrees with it row for row, and an anomaly inserted into
the readings is one alarm event on Kafka, across a model swap and a daemon restart."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from helpers import PUMPS, Running, insert, pump_rows, smocsd, write_config

from smocsd.app import cycle
from smocsd.app.live import LiveScorer, Position, Scored, ScoredRow, Scoring, decide
from smocsd.app.modelset import ModelSet
from smocsd.common import config
from smocsd.data import demo, sources
from smocsd.data.sources import SourceError, open_source
from smocsd.delivery.outbox import Outbox
from smocsd.training.result import Outcome


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
        _scoring_started(state, "autoencoder")  # at row 3000: the rows below are new
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
        # Quiet rows: the windows that hold anomalous rows, the sustained rule's count
        # falling under 20 of 30, then close_after quiet windows.
        insert(db, 40)
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


def _scoring_started(state: Path, model: str, timeout: float = 60.0) -> int:
    """Waits for `model`'s scoring position in state.json (where it starts, at the newest
    row); returns its last_order."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = json.loads((state / "state.json").read_text())
            return data["models"][model]["scoring"]["last_order"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            assert time.monotonic() < deadline, f"no scoring position of {model}"
            time.sleep(0.05)


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


# --- many models: the partitions of one table, polled once for all of them

PUMP_MODELS = [f"autoencoder@{pump}" for pump in PUMPS]


def _pump_config(root: Path, state: Path) -> config.Config:
    path = write_config(
        root / "pumps.toml",
        state,
        source={"order_column": "id", "partition_column": "asset"},
        scoring={"enabled": True},
    )
    return config.load(path)


@pytest.fixture(scope="module")
def pump_models(tmp_path_factory) -> Path:
    """A state directory: 2500 rows of each of five pumps in one table, and a model of
    each pump trained on its rows."""
    root = tmp_path_factory.mktemp("pumps")
    state = root / "state"
    state.mkdir()
    pump_rows(state / "readings.db", 0, 2500, dropouts=True)
    cfg = _pump_config(root, state)
    outbox = Outbox(state / "outbox.db")
    try:
        for model in ModelSet(cfg).resolve():
            result, _ = cycle.run(model, outbox, force=True)
            assert result.outcome is Outcome.PROMOTED, result
    finally:
        outbox.close()
    (state / "outbox.db").unlink()
    return state


@pytest.fixture
def pumps(pump_models, tmp_path) -> tuple[Path, config.Config]:
    """A copy of pump_models' state directory: (its path, the config)."""
    state = tmp_path / "pumps"
    shutil.copytree(pump_models, state, symlinks=True)
    return state, _pump_config(tmp_path, state)


def _scoring(cfg: config.Config) -> Scoring:
    scoring = Scoring(cfg)
    scoring.set_models(ModelSet(cfg).resolve())
    return scoring


def _by_name(scored: list[Scored]) -> dict[str, Scored]:
    by_name = {s.name: s for s in scored}
    assert len(by_name) == len(scored)
    return by_name


def _newest_of(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT asset, max(id) FROM readings GROUP BY asset"))


def test_five_pumps_in_one_table_alarm_only_for_the_faulty_pumps_model(pumps):
    state, cfg = pumps
    db = state / "readings.db"
    outbox = Outbox(state / "outbox.db")
    scoring = _scoring(cfg)
    assert sorted(scoring.scorers) == PUMP_MODELS
    started = _by_name(scoring.step(outbox, force=True))  # each starts at the newest row
    assert sorted(started) == PUMP_MODELS and all(
        s.scoring and not s.rows for s in started.values()
    )
    newest = _newest_of(db)
    pump_rows(db, 2500, 60, faulty="P-3", fault=(20, 45))
    during = _by_name(scoring.step(outbox, force=True))
    pump_rows(db, 2560, 40)
    after = _by_name(scoring.step(outbox, force=True))
    scoring.close()
    for name in PUMP_MODELS:  # every new row of its own pump, none of the others'
        rows = during[name].rows + after[name].rows
        pump = name.split("@")[1]
        with closing(sqlite3.connect(db)) as conn:
            ids = [
                i
                for (i,) in conn.execute(
                    "SELECT id FROM readings WHERE asset = ? AND id > ? ORDER BY id",
                    (pump, newest[pump]),
                )
            ]
        assert [r.order for r in rows] == ids, name
        anomalous = any(r.anomalous for r in rows)
        assert anomalous == (name == "autoencoder@P-3"), name
    assert (during["autoencoder@P-3"].alarms, after["autoencoder@P-3"].alarms) == (1, 1)
    assert during["autoencoder@P-3"].is_open and not after["autoencoder@P-3"].is_open
    alarms = _alarms(outbox)
    outbox.close()
    assert [(m["model"], m["state"]) for m in alarms] == [
        ("autoencoder@P-3", "open"),
        ("autoencoder@P-3", "closed"),
    ]
    assert len({m["event_id"] for m in alarms}) == 1
    assert alarms[0]["channels"][0]["name"] == "vibration"
    with closing(sqlite3.connect(db)) as conn:
        faulty = [
            i
            for (i,) in conn.execute(
                "SELECT id FROM readings WHERE asset = 'P-3' AND id > ? ORDER BY id LIMIT 45",
                (newest["P-3"],),
            )
        ][20:]
    assert faulty[0] <= alarms[0]["start"]["order"] <= faulty[-1]
    # Each has scored every row of its own up to the table's newest; saved at the stop.
    saved = json.loads((state / "state.json").read_text())["models"]
    newest = max(_newest_of(db).values())
    assert [saved[name]["scoring"]["last_order"] for name in PUMP_MODELS] == [newest] * 5


@pytest.mark.parametrize("models", [1, 5])
def test_a_poll_is_one_max_query_and_one_read_however_many_partitions(pumps, monkeypatch, models):
    """Every statement the sources run, counted where they all go through: an idle poll
    is one max() of the whole table; a poll with new rows adds one read of them all."""
    state, cfg = pumps
    db = state / "readings.db"
    outbox = Outbox(state / "outbox.db")
    scoring = Scoring(cfg)
    scoring.set_models(ModelSet(cfg).resolve()[:models])
    scoring.step(outbox, force=True)  # each starts at the newest row
    pump_rows(db, 2500, 12)
    scoring.step(outbox, force=True)  # each partition's tail is read once after a start
    statements: list[str] = []
    execute = sources._PollingConnection.execute

    def counted(self, sql, parameters=(), /):
        statements.append(sql)
        return execute(self, sql, parameters)

    monkeypatch.setattr(sources._PollingConnection, "execute", counted)
    for _ in range(3):
        assert all(not s.rows for s in scoring.step(outbox, force=True))
        assert len(statements) == 1 and statements[0].startswith("SELECT max("), statements
        # the whole table's, not a partition's: only the bound that keeps text out
        assert statements.pop().endswith('FROM "readings" WHERE "id" <= 9223372036854775807')
    for start, rows in ((2512, 7), (2519, 1), (2520, 30)):
        pump_rows(db, start, rows)
        scored = scoring.step(outbox, force=True)
        assert len(scored) == models and all(len(s.rows) == rows for s in scored)
        assert len(statements) == 2 and statements[0].startswith("SELECT max("), statements
        assert " ORDER BY " in statements[1] and "LIMIT" in statements[1]
        statements.clear()
    scoring.close()
    outbox.close()


def test_a_single_models_state_of_the_previous_release_is_continued_exactly(trained):
    """state.json's top-level `scoring` (a release before [models] tables): the model
    named like the top-level model.name goes on from it, its open event and look-back
    too, and saves its position under models.<name>."""
    state, path = trained
    cfg = config.load(path)
    event_id = "0a5e1f4c-3a52-5d40-9c8e-7f1b2c3d4e5f"
    legacy = {
        "last_order": 2990,
        "version": 1,
        "recent": [False, False],
        "event": {
            "event_id": event_id,
            "version": 1,
            "start": {"order": 2985, "time": None},
            "last": {"order": 2988, "time": None},
            "peak_score": 9.0,
            "threshold": 1.0,
            "errors": {"temperature": 1.0, "vibration": 5.0, "current": 1.0},
            "quiet": 2,
        },
        "at": "2026-11-28T04:17:54Z",
    }
    state_json = state / "state.json"
    state_json.write_text(json.dumps({**json.loads(state_json.read_text()), "scoring": legacy}))
    outbox = Outbox(state / "outbox.db")
    scoring = _scoring(cfg)
    assert scoring.scorers["autoencoder"].position.event.event_id == event_id
    insert(state / "readings.db", 20)
    (scored,) = scoring.step(outbox, force=True)
    scoring.close()
    assert [r.order for r in scored.rows] == list(range(2991, 3021))  # from where it stood
    assert not any(r.anomalous for r in scored.rows)
    assert scored.was_open and not scored.is_open and scored.alarms == 1
    (closed,) = _alarms(outbox)
    outbox.close()
    assert (closed["event_id"], closed["state"], closed["start"]["order"]) == (
        event_id,
        "closed",
        2985,
    )
    assert closed["end"]["order"] == 2988  # its last alarm window: 8 quiet ones closed it
    saved = json.loads(state_json.read_text())
    assert saved["models"]["autoencoder"]["scoring"]["last_order"] == 3020
    assert saved["scoring"] == legacy  # left as it was: the model's own record wins now


def test_each_partitions_windows_go_on_across_a_restart(pumps, monkeypatch):
    """After a restart each partition's first windows start in the rows before its first
    new one, read once per partition; the decisions are those of one uninterrupted read."""
    state, cfg = pumps
    db = state / "readings.db"
    outbox = Outbox(state / "outbox.db")
    scoring = _scoring(cfg)
    scoring.step(outbox, force=True)
    pump_rows(db, 2500, 30)
    scoring.step(outbox, force=True)
    scoring.close()
    before = _newest_of(db)
    newest_reads: list[tuple[str | None, int, int | None]] = []
    read_newest = sources.SQLiteSource.read_newest

    def counted(self, max_rows, upto=None):
        newest_reads.append((self.cfg.partition, max_rows, upto))
        return read_newest(self, max_rows, upto)

    monkeypatch.setattr(sources.SQLiteSource, "read_newest", counted)
    scoring = _scoring(cfg)  # the daemon restarted
    pump_rows(db, 2530, 25)
    after = _by_name(scoring.step(outbox, force=True))
    # A window's rows before its last, and the level rule's before them.
    m = cfg.model
    read = cfg.training.window_size - 1 + m.level_baseline + m.level_gap
    assert sorted(newest_reads) == [(pump, read, max(before.values())) for pump in PUMPS]
    pump_rows(db, 2555, 10)
    assert all(len(s.rows) == 10 for s in scoring.step(outbox, force=True))
    assert len(newest_reads) == 5  # the tails are kept in memory from then on
    scoring.close()
    monkeypatch.undo()
    for name, scorer in zip(PUMP_MODELS, ModelSet(cfg).resolve(), strict=True):
        model = Scoring(cfg)
        model.set_models([scorer])
        live = model.scorers[name]
        source = open_source(scorer.source)
        whole = source.read_newest(read + 100)  # its rows before the restart and after
        source.close()
        expected, _, _ = decide(live._current(), whole, before[name.split("@")[1]], None)
        got = after[name].rows
        expected = [r for r in expected if r.order <= got[-1].order]
        assert len(got) == 25 and [r.order for r in got] == [r.order for r in expected]
        assert [(r.over, r.anomalous) for r in got] == [(r.over, r.anomalous) for r in expected]
        assert [r.score for r in got] == pytest.approx([r.score for r in expected], rel=1e-4)
        model.close()
    outbox.close()


def test_one_failing_model_or_table_stops_no_other_and_is_said_once(
    pumps, trained, monkeypatch, caplog
):
    """A model whose scoring fails keeps its position and is said once; the others score
    on, and it catches up with every row once it recovers. A table that cannot be read
    is said once too, and the model of another table scores on."""
    caplog.set_level("INFO", logger="smocsd.app.live")
    state, cfg = pumps
    db = state / "readings.db"
    single = config.load(trained[1])
    outbox = Outbox(state / "outbox.db")
    scoring = _scoring(cfg)
    scoring.set_models([*ModelSet(cfg).resolve(), single])
    scoring.step(outbox, force=True)
    score = LiveScorer.score

    def broken(self, *args, **kwargs):
        if self.name == "autoencoder@P-2":
            raise RuntimeError("model P-2 broke")
        return score(self, *args, **kwargs)

    monkeypatch.setattr(LiveScorer, "score", broken)
    for start in (2500, 2510):
        pump_rows(db, start, 10)
        insert(trained[0] / "readings.db", 10)
        scored = _by_name(scoring.step(outbox, force=True))
        assert "autoencoder@P-2" not in scored
        assert [len(scored[n].rows) for n in PUMP_MODELS if n != "autoencoder@P-2"] == [10] * 4
        assert len(scored["autoencoder"].rows) == 10
        assert scoring.lag_rows("autoencoder@P-2") == start - 2490
    assert caplog.text.count("model P-2 broke") == 1
    monkeypatch.setattr(LiveScorer, "score", score)
    scored = _by_name(scoring.step(outbox, force=True))
    assert len(scored["autoencoder@P-2"].rows) == 20  # every row it had not scored
    assert "scoring autoencoder@P-2: recovered from: RuntimeError: model P-2 broke" in caplog.text
    assert scoring.lag_rows("autoencoder@P-2") == 0

    def unreadable(self, after, max_rows):
        raise SourceError(f"{self.where}: database disk image is malformed")

    monkeypatch.setattr(sources.SQLiteSource, "read_tagged", unreadable)
    for start in (2520, 2530):
        pump_rows(db, start, 10)
        insert(trained[0] / "readings.db", 10)
        scored = _by_name(scoring.step(outbox, force=True))
        assert list(scored) == ["autoencoder"] and len(scored["autoencoder"].rows) == 10
    assert caplog.text.count("disk image is malformed") == 1
    assert "scoring autoencoder@*: SourceError: " in caplog.text
    monkeypatch.undo()
    scored = _by_name(scoring.step(outbox, force=True))
    assert [len(scored[n].rows) for n in PUMP_MODELS] == [20] * 5
    assert "scoring autoencoder@*: recovered from" in caplog.text
    scoring.close()
    outbox.close()
