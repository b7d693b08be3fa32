"""The durable outbox: nothing is lost, nothing is silently dropped."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import smocsd, write_config

from smocsd.delivery import outbox as outbox_module
from smocsd.delivery.outbox import (
    APPLICATION_ID,
    DROPPED_FIELD,
    FLUSH_BATCH,
    Outbox,
    OutboxError,
    json_safe,
)


def result(n: int = 0) -> dict:
    return {
        "schema": "smocsd.training-result/1",
        "message_id": str(uuid.uuid4()),
        "device_id": "gw-test",
        "model": "autoencoder",
        "version": n + 1,
        "outcome": "promoted",
        "timestamp": "2026-11-26T05:00:00Z",
        "metrics": {"val_loss": 0.01 * n},
        "eval": {},
        "model_meta": {},
    }


class Recorder:
    """A deliver() stand-in: acknowledges according to `ack(message)`, remembers calls."""

    def __init__(self, ack=lambda _m: True) -> None:
        self.ack = ack
        self.calls: list[list[dict]] = []

    def __call__(self, messages: list[dict]) -> list[str | None]:
        self.calls.append([dict(m) for m in messages])
        return ["kafka" if self.ack(m) else None for m in messages]

    @property
    def sent(self) -> list[dict]:
        return [m for call in self.calls for m in call]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


def test_put_survives_reopen_in_order(path: Path) -> None:
    messages = [result(i) for i in range(5)]
    box = Outbox(path)
    for m in messages:
        box.put(m)
    box.close()
    box = Outbox(path)
    assert len(box) == 5
    assert box.pending() == messages
    assert box.pending(limit=2) == messages[:2]


def test_put_is_durable_when_it_returns(path: Path) -> None:
    """A process killed right after put() returned has still written the result."""
    message = result()
    code = (
        f"import sys; from pathlib import Path; from smocsd.delivery.outbox import Outbox\n"
        f"Outbox(Path({str(path)!r})).put({message!r}); print('put', flush=True)\n"
        f"import time; time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "put\n"
    finally:
        child.kill()
        child.wait()
    assert Outbox(path).pending() == [message]


def test_flush_removes_only_acknowledged_and_keeps_order(path: Path) -> None:
    box = Outbox(path)
    messages = [result(i) for i in range(6)]
    for m in messages:
        box.put(m)
    odd = {m["message_id"] for m in messages[1::2]}
    deliver = Recorder(lambda m: m["message_id"] in odd)
    assert box.flush(deliver) == 3
    assert deliver.calls == [messages]  # oldest first
    assert box.pending() == messages[0::2]


def test_message_id_and_body_unchanged_on_retry(path: Path) -> None:
    box = Outbox(path)
    messages = [result(i) for i in range(3)]
    for m in messages:
        box.put(m)
    failing = Recorder(lambda _m: False)
    assert box.flush(failing) == 0
    assert box.flush(failing) == 0
    working = Recorder()
    assert box.flush(working) == 3
    assert failing.calls == [messages, messages]
    assert working.sent == messages
    assert len(box) == 0


def test_flush_stops_at_first_failing_batch(path: Path) -> None:
    box = Outbox(path)
    for i in range(FLUSH_BATCH * 2 + 5):
        box.put(result(i))
    deliver = Recorder(lambda _m: False)
    assert box.flush(deliver) == 0
    assert len(deliver.calls) == 1  # a down broker costs one attempt, not one per batch
    everything = Recorder()
    assert box.flush(everything) == FLUSH_BATCH * 2 + 5
    assert [len(c) for c in everything.calls] == [FLUSH_BATCH, FLUSH_BATCH, 5]


def test_cap_drops_oldest_loudly_and_carries_the_count(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [result(i) for i in range(5)]
    box = Outbox(path, max_messages=3)
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        for m in messages:
            box.put(m)
    assert box.pending() == messages[2:]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert messages[0]["message_id"] in errors[0].getMessage()
    assert messages[1]["message_id"] in errors[1].getMessage()
    box.close()

    box = Outbox(path, max_messages=3)  # the count survives a restart
    failing = Recorder(lambda _m: False)
    box.flush(failing)
    box.flush(failing)
    assert [call[0][DROPPED_FIELD] for call in failing.calls] == [2, 2]  # not delivered
    assert box.pending() == messages[2:]  # the field is added on delivery, never stored

    # The carrier itself fails, a later one is delivered: the count waits for a carrier.
    first_fails = Recorder(lambda m: m["message_id"] != messages[2]["message_id"])
    assert box.flush(first_fails) == 2
    assert first_fails.sent[0] == {**messages[2], DROPPED_FIELD: 2}
    deliver = Recorder()
    assert box.flush(deliver) == 1
    assert deliver.sent == [{**messages[2], DROPPED_FIELD: 2}]

    box.put(messages[0])
    later = Recorder()
    box.flush(later)
    assert later.sent == [messages[0]]  # cleared once delivered


def test_lowered_cap_drops_the_excess_in_one_line(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    messages = [result(i) for i in range(20)]
    for m in messages:
        box.put(m)
    box.close()
    box = Outbox(path, max_messages=4)
    newest = result(20)
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        box.put(newest)
    assert box.pending() == [*messages[-3:], newest]
    [line] = caplog.records
    assert "dropped the 17 oldest" in line.getMessage()
    assert "and 12 more" in line.getMessage()
    deliver = Recorder()
    assert box.flush(deliver) == 4
    assert deliver.sent[0] == {**messages[-3], DROPPED_FIELD: 17}


def test_two_outboxes_on_one_file(path: Path) -> None:
    a, b = Outbox(path), Outbox(path)
    m1, m2 = result(1), result(2)
    a.put(m1)
    b.put(m2)
    assert a.pending() == b.pending() == [m1, m2]
    assert b.flush(Recorder()) == 2
    assert len(a) == 0
    assert a.flush(Recorder()) == 0


def test_concurrent_writers_in_two_processes(path: Path) -> None:
    Outbox(path).close()
    code = (
        f"import sys, uuid; from pathlib import Path; from smocsd.delivery.outbox import Outbox\n"
        f"box = Outbox(Path({str(path)!r}))\n"
        f"for i in range(150):\n"
        f"    box.put({{**{result()!r}, 'message_id': str(uuid.uuid4()),"
        f" 'writer': sys.argv[1], 'i': i}})\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, name]) for name in "ab"]
    box = Outbox(path)
    flushed = Recorder()
    while any(w.poll() is None for w in writers):
        box.flush(flushed)  # a third party flushing while both write
    assert [w.returncode for w in writers] == [0, 0]
    box.flush(flushed)
    assert len(box) == 0
    for name in "ab":
        assert [m["i"] for m in flushed.sent if m["writer"] == name] == list(range(150))


def test_flush_stops_before_the_next_batch_once_asked(path: Path) -> None:
    box = Outbox(path)
    for i in range(FLUSH_BATCH * 2 + 50):
        box.put(result(i))
    deliver = Recorder()
    assert box.flush(deliver, should_stop=lambda: len(deliver.calls) >= 1) == FLUSH_BATCH
    assert len(deliver.calls) == 1
    assert box.flush(deliver, should_stop=lambda: True) == 0
    assert len(deliver.calls) == 1
    assert len(box) == FLUSH_BATCH + 50


# ---------------------------------------------------------------- always valid JSON


def test_json_safe_replaces_non_finite_numbers_numpy_included() -> None:
    nan, inf = float("nan"), float("inf")
    obj = {
        "a": nan,
        "b": [1.5, inf, {"c": -inf}],
        "d": (np.float32("nan"), np.float64(2.5), np.int64(7), np.bool_(True)),
        "e": np.array([[1.0, np.nan], [np.inf, 0.0]]),
        "f": {"ok": 1, "s": "nan", "none": None, "yes": True},
    }
    safe = json_safe(obj)
    assert safe == {
        "a": None,
        "b": [1.5, None, {"c": None}],
        "d": [None, 2.5, 7, True],
        "e": [[1.0, None], [None, 0.0]],
        "f": {"ok": 1, "s": "nan", "none": None, "yes": True},
    }
    json.dumps(safe, allow_nan=False)
    assert math.isnan(obj["a"]) and obj["b"][1] == inf  # a copy: the input is untouched


def test_put_stores_non_finite_metrics_as_null_with_one_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    message = {**result(), "metrics": {"val_loss": float("nan"), "train_loss": 0.1}}
    message["eval"] = {"scores": [0.5, float("inf")], "p99": np.float32(0.25)}
    with caplog.at_level(logging.WARNING, logger="smocsd.outbox"):
        box.put(message)
    [line] = caplog.records
    assert line.levelno == logging.WARNING
    assert message["message_id"] in line.getMessage()
    assert "metrics.val_loss, eval.scores[1]" in line.getMessage()
    [stored] = box.pending()
    assert stored["metrics"] == {"val_loss": None, "train_loss": 0.1}
    assert stored["eval"] == {"scores": [0.5, None], "p99": 0.25}
    assert box.flush(Recorder()) == 1


# ---------------------------------------------------------------- rows that cannot be delivered


def alarm(n: int = 0) -> dict:
    return {
        "schema": "smocsd.alarm/1",
        "message_id": str(uuid.uuid4()),
        "event_id": str(uuid.uuid4()),
        "state": "open",
        "device_id": "gw-test",
        "model": "autoencoder",
        "version": 1,
        "start": {"order": 3000 + n, "time": None},
        "end": None,
        "peak_score": 4.5,
        "threshold": 0.5,
        "channels": [{"name": "vibration", "share": 0.9}],
        "timestamp": "2026-11-28T05:00:00Z",
    }


def label_message(n: int = 0) -> dict:
    return {
        "schema": "smocsd.label/1",
        "message_id": str(uuid.uuid4()),
        "device_id": "gw-test",
        "model": "autoencoder",
        "action": "added",
        "label": {
            "id": n + 1,
            "kind": "accept",
            "first": 1,
            "last": 2,
            "reason": "",
            "by": "operator",
            "created_at": "2026-11-28T05:00:00Z",
        },
        "timestamp": "2026-11-28T05:00:00Z",
    }


def insert_raw(path: Path, body: object) -> int:
    """A row written straight into the messages table, as a hand edit or another program
    might: its seq."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        cursor = db.execute("INSERT INTO messages (message_id, body) VALUES ('raw', ?)", (body,))
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def quarantine_table(path: Path) -> list[tuple[int, object]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT seq, body FROM quarantine ORDER BY rowid").fetchall()


def test_the_outbox_checks_every_schema_smocsd_sends() -> None:
    from smocsd import schemas

    sent = set(schemas.FILES) - {schemas.MODEL_FORMAT}  # every message; a model is a file
    assert set(outbox_module._SCHEMA_FIELDS) == sent


def test_a_row_that_is_not_json_is_quarantined_once_and_the_rest_delivered(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    first, last = result(0), alarm(1)
    box.put(first)
    seq = insert_raw(path, '{"schema": "smocsd.alarm/1", "message_id": ')
    box.put(last)
    with caplog.at_level(logging.WARNING, logger="smocsd.outbox"):
        reader = Outbox.open_readonly(path)
        assert reader.pending() == [first, last]  # a reader skips it, moves nothing
        reader.close()
        [warning] = caplog.records
        assert warning.levelno == logging.WARNING
        assert f"{path}: 1 row(s) cannot be delivered" in warning.getMessage()
        assert len(box) == 3
        caplog.clear()
        deliver = Recorder()
        assert box.flush(deliver) == 2
        assert deliver.sent == [first, last]
        reason = "not JSON: Expecting value: line 1 column 44 (char 43)"
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: 1 row(s) cannot be delivered: moved to its quarantine table, where "
            f"`smocsd outbox list` shows them: row {seq}: {reason}"
        ]
        box.put(result(2))
        assert box.flush(Recorder()) == 1
        assert len(caplog.records) == 1  # named once: it is out of the messages table
    [held] = box.quarantined()
    assert (held.seq, held.message_id, held.reason) == (seq, "raw", reason)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", held.at)
    assert quarantine_table(path) == [(seq, '{"schema": "smocsd.alarm/1", "message_id": ')]


# What the contract says every message holds, and each kind besides: what delivery (topic,
# key), `outbox list` and the metrics read. A field that may be null may be missing.
REQUIRED = ["message_id", "schema", "device_id", "model", "timestamp"]
REQUIRED_BY_SCHEMA = {
    "smocsd.training-result/1": ["outcome"],
    "smocsd.alarm/1": ["state", "version"],
    "smocsd.label/1": ["action", "label"],
}
NOT_A_STRING = [5, 1.5, True, None, [], {}, 10**400]


def undeliverable(rng: random.Random, message: dict) -> object:
    """A row body that no broker should be sent: what a damaged or hand-edited row holds."""
    text = json.dumps(message)
    fields = REQUIRED + REQUIRED_BY_SCHEMA[message["schema"]]
    broken = {**message}
    match rng.randrange(12):
        case 0:
            del broken[rng.choice(fields)]
        case 1:
            field = rng.choice(fields)
            if field == "version":
                broken[field] = rng.choice(["1", 1.5, True, None, [1]])
            elif field == "label":
                broken[field] = rng.choice(["#1", 1, [], None])
            else:
                broken[field] = rng.choice(NOT_A_STRING)
        case 2 if message["schema"] == "smocsd.label/1":
            broken["label"] = {**message["label"], "id": rng.choice(["1", 1.5, True, None])}
        case 2:
            broken["schema"] = rng.choice(["smocsd.alarm/2", "", "SMOCSD.ALARM/1"])
        case 3:
            return text[: rng.randrange(len(text))]  # torn: every prefix is invalid
        case 4:
            return text[:-1] + f', "x": {rng.choice(["NaN", "Infinity", "-Infinity"])}}}'
        case 5:
            return text[:-1] + f', "x": {rng.choice(["1e999", "-1e400", "2e308"])}}}'
        case 6:
            return text[:-1] + ', "x": ' + "9" * 5000 + "}"  # past Python's int parsing limit
        case 7:
            return rng.choice([json.dumps([message]), '"text"', "42", "null", "true"])
        case 8:
            return text.encode()  # a BLOB, not text
        case 9:
            return "[" * 100_000 + "]" * 100_000  # nested deeper than any parser recurses
        case 10:
            return rng.choice(["", " ", "\x00", "{'message_id': 'x'}", text + "}"])
        case _:
            return os.urandom(rng.randrange(1, 200)).decode("latin-1")
    return json.dumps(broken)


def deliverable(rng: random.Random, message: dict) -> dict:
    """A message with what delivery does not read changed: extra keys, huge numbers."""
    extra = [10**400, -(10**300), 1.7e308, 5e-324, "ü\u2028", None, [[[]]], {"a": {"b": 1}}]
    return {**message, f"extra_{rng.randrange(1000)}": rng.choice(extra)}


def test_fuzzed_rows_are_quarantined_and_delivery_goes_on(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows with wrong types, missing and extra keys, huge and non-finite numbers, bodies
    that are not JSON, a whole batch of them first: each is moved to quarantine kept as it
    was, and every other message is delivered, in order, as valid JSON."""
    rng = random.Random(18)
    box = Outbox(path)
    good, bad = [], []
    for i in range(400):
        message = rng.choice([result, alarm, label_message])(i)
        if i >= FLUSH_BATCH + 20 and rng.random() < 0.5:
            good.append(deliverable(rng, message))
            box.put(good[-1])
        else:
            body = undeliverable(rng, message)
            bad.append((insert_raw(path, body), body))
    deliver = Recorder()
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        assert box.flush(deliver) == len(good)
        assert box.flush(Recorder()) == 0
    assert deliver.sent == good
    for message in deliver.sent:
        json.dumps(message, allow_nan=False)  # what the sinks send
    assert len(box) == 0
    assert quarantine_table(path) == bad  # kept byte for byte
    assert [q.seq for q in box.quarantined()] == [seq for seq, _ in bad]
    named = re.findall(r"row (\d+): ", caplog.text)
    assert {int(seq) for seq in named} <= {seq for seq, _ in bad}
    assert int(named[0]) == bad[0][0]
    assert len(caplog.records) < len(bad) / 4  # one line per batch that met some


def test_a_dropped_count_that_is_not_a_count_is_reset_once(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE counters SET value = 'lots' WHERE name = 'dropped'")
    box.put(result())
    deliver = Recorder()
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        assert box.flush(deliver) == 1
        box.put(result(1))
        assert box.flush(deliver) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: counters 'dropped' is 'lots', not a count of results: reset to 0"
    ]
    assert all(DROPPED_FIELD not in m for m in deliver.sent)


def test_outbox_list_and_status_show_quarantined_rows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.toml", state)
    box = Outbox(state / "outbox.db")
    waiting = result()
    seq = insert_raw(state / "outbox.db", json.dumps({**alarm(), "version": "v1"}))
    box.put(waiting)
    assert box.flush(Recorder(lambda _m: False)) == 0  # a flush quarantines on the way
    box.close()
    listed = smocsd("outbox", "list", config=config, check=True).stdout.splitlines()
    assert listed[-3:] == [
        "1 message(s) waiting",
        f"{listed[-2][:20]}  row {seq}  QUARANTINED  raw  version is a string, not an integer",
        "1 row(s) in quarantine, never delivered",
    ]
    proc = smocsd("outbox", "list", "--json", config=config, check=True)
    assert json.loads(proc.stdout) == [waiting]
    assert proc.stderr == (
        f"smocsd: {state}/outbox.db: 1 row(s) in quarantine, never delivered: "
        f"row {seq}: version is a string, not an integer\n"
    )
    status = json.loads(smocsd("status", "--json", config=config, check=True).stdout)
    assert (status["outbox_depth"], status["outbox_quarantined"]) == (1, 1)
    text = smocsd("status", config=config, check=True).stdout
    assert "outbox:      1 result(s) waiting, 1 in quarantine (smocsd outbox list)" in text


# ---------------------------------------------------------------- every version recorded


def test_reported_keeps_every_version_put_delivered_or_not(path: Path) -> None:
    box = Outbox(path)
    for model, version in [("a", 1), ("a", 2), ("b", 1), ("a", 2)]:
        box.put({**result(), "model": model, "version": version})
    box.put({**result(), "model": "a", "version": None, "outcome": "failed"})
    box.put({k: v for k, v in result().items() if k != "version"})
    assert box.reported("a") == {1, 2}
    assert box.reported("b") == {1}
    assert box.reported("c") == set()
    assert box.flush(Recorder()) == 6
    box.close()
    assert Outbox(path).reported("a") == {1, 2}  # delivery and restarts keep them


def test_reported_row_and_message_are_one_transaction(path: Path) -> None:
    Outbox(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON reported BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        db.commit()
    box = Outbox(path)
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: no"):
        box.put(result())
    assert len(box) == 0  # the message went back with the row
    assert box.reported("autoencoder") == set()


def test_outbox_from_before_reported_gains_the_table(path: Path) -> None:
    path.parent.mkdir()
    old = result()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " message_id TEXT NOT NULL, body TEXT NOT NULL)"
        )
        db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("INSERT INTO counters VALUES ('dropped', 3)")
        db.execute(
            "INSERT INTO messages (message_id, body) VALUES (?, ?)",
            (old["message_id"], json.dumps(old)),
        )
        db.commit()
    reader = Outbox.open_readonly(path)
    assert (reader.pending(), reader.reported("autoencoder")) == ([old], set())
    box = Outbox(path)
    box.put(result(4))
    assert box.reported("autoencoder") == {5}
    assert len(box) == 2
    deliver = Recorder()
    assert box.flush(deliver) == 2
    assert deliver.sent[0] == {**old, DROPPED_FIELD: 3}
    box.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # now stamped as smocsd's own
        assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)


# ---------------------------------------------------------------- a corrupt outbox


def real_outbox(path: Path, n: int = 200) -> None:
    box = Outbox(path)
    for i in range(n):
        box.put({**result(i), "model_meta": {"padding": "x" * 400}})
    box.close()


def garbage(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(20000))


def truncated(path: Path) -> None:
    real_outbox(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [garbage, truncated])
def test_corrupt_outbox_is_moved_aside_and_a_new_one_started(
    path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    damage(path)
    original = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="smocsd.outbox"):
        box = Outbox(path)
    [aside] = path.parent.glob("outbox.db.corrupt-*")
    assert re.fullmatch(r"outbox\.db\.corrupt-\d{8}T\d{6}Z", aside.name)
    assert aside.read_bytes() == original  # kept as it was, for whoever investigates
    [line] = caplog.records
    assert line.levelno == logging.ERROR
    assert str(path) in line.getMessage() and str(aside) in line.getMessage()
    assert len(box) == 0
    message = result()
    box.put(message)
    box.close()
    assert Outbox(path).pending() == [message]
    assert list(path.parent.glob("outbox.db.corrupt-*")) == [aside]


def test_outbox_damaged_while_open_is_moved_aside_by_the_next_put(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    for i in range(50):
        box.put({**result(i), "model_meta": {"padding": "x" * 400}})
    with contextlib.closing(sqlite3.connect(path)) as db:  # everything into the main file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as f:  # a failing SD card: every page but the first is garbage
        f.seek(4096)
        f.write(os.urandom(path.stat().st_size - 4096))
    message = result(50)
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        box.put(message)
    [line] = caplog.records
    assert "moved it aside" in line.getMessage()
    assert len(list(path.parent.glob("outbox.db.corrupt-*"))) == 1
    assert Outbox.open_readonly(path).pending() == [message]


# ---------------------------------------------------------------- another program's database


def other_tables(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, ts REAL, vibration REAL)")
    db.execute("INSERT INTO readings (ts, vibration) VALUES (1.0, 0.5)")


def a_table_of_our_name(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, sender TEXT, text TEXT)")
    db.execute("INSERT INTO messages (sender, text) VALUES ('ops', 'not a result')")


def our_tables_another_programs_id(db: sqlite3.Connection) -> None:
    """smocsd's very tables, in a file another program stamped as its own."""
    for statement in outbox_module._SCHEMA:
        db.execute(statement)
    db.execute("PRAGMA application_id = 1179407173")  # "FLSE": another program's mark


def our_tables_and_one_more(db: sqlite3.Connection) -> None:
    our_tables_another_programs_id(db)
    db.execute("PRAGMA application_id = 0")
    db.execute("CREATE TABLE settings (key TEXT, value TEXT)")


@pytest.mark.parametrize(
    "make",
    [other_tables, a_table_of_our_name, our_tables_another_programs_id, our_tables_and_one_more],
)
def test_another_programs_database_is_moved_aside_untouched(
    path: Path, make: Callable[[sqlite3.Connection], None], caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        make(db)
    original = path.read_bytes()
    before = snapshot(path.parent)
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: not smocsd's outbox: "):
        Outbox.open_readonly(path)
    assert snapshot(path.parent) == before
    with caplog.at_level(logging.WARNING, logger="smocsd.outbox"):
        box = Outbox(path)
    [aside] = path.parent.glob("outbox.db.foreign-*")
    assert re.fullmatch(r"outbox\.db\.foreign-\d{8}T\d{6}Z", aside.name)
    assert aside.read_bytes() == original  # never written to: not even its journal mode
    assert not list(path.parent.glob("outbox.db.foreign-*-*"))  # no -wal or -shm made
    [line] = caplog.records
    assert line.levelno == logging.ERROR
    assert line.getMessage().startswith(f"{path}: not smocsd's outbox: ")
    assert f"moved it aside, untouched, to {aside} and started a new outbox" in line.getMessage()
    message = result()
    box.put(message)
    box.close()
    assert Outbox(path).pending() == [message]
    assert list(path.parent.glob("outbox.db.*-*")) == [aside]


def test_a_new_outbox_is_stamped_as_smocsds(path: Path) -> None:
    Outbox(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert db.execute("PRAGMA user_version").fetchone() == (outbox_module.FORMAT,)


# ---------------------------------------------------------------- deleted or replaced


@pytest.mark.parametrize("leftovers", ["db only", "with -wal and -shm"])
def test_outbox_deleted_under_a_running_daemon_is_recreated_by_the_next_put(
    path: Path, leftovers: str, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    box.put(result(0))
    for suffix in ("", "-wal", "-shm") if leftovers != "db only" else ("",):
        Path(f"{path}{suffix}").unlink()
    message = result(1)
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        box.put(message)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} was deleted or replaced while open; reopening it"
    ]
    assert Outbox.open_readonly(path).pending() == [message]  # in the file on disk
    box.put(result(2))
    assert len(caplog.records) == 1  # once per replacement
    assert len(Outbox.open_readonly(path)) == 2


def test_outbox_replaced_under_a_running_daemon_is_used_from_the_next_put(
    path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path)
    box.put(result(0))
    restored = Outbox(tmp_path / "backup.db")
    first = result(1)
    restored.put(first)
    restored.close()
    os.replace(tmp_path / "backup.db", path)
    second = result(2)
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        box.put(second)
    assert "deleted or replaced" in caplog.text
    assert Outbox.open_readonly(path).pending() == [first, second]
    deliver = Recorder()
    assert box.flush(deliver) == 2
    assert deliver.sent == [first, second]


def test_flush_notices_a_deleted_outbox(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(path)
    box.put(result())
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="smocsd.outbox"):
        assert box.flush(Recorder()) == 0
    assert "deleted or replaced" in caplog.text
    assert path.exists()


# ---------------------------------------------------------------- errors name the file


def test_sqlite_errors_name_the_file(path: Path) -> None:
    path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: unable to open"):
        Outbox(path)


def test_os_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file, not a directory")
    with pytest.raises(OSError) as raised:
        Outbox(tmp_path / "state" / "outbox.db")
    assert raised.value.filename == str(tmp_path / "state")


# ---------------------------------------------------------------- read-only


def snapshot(directory: Path) -> dict[str, tuple]:
    """Everything a reader could change in `directory`: names, modes, owners, times, bytes."""
    st = directory.stat()
    files: dict[str, tuple] = {".": (st.st_mode, st.st_mtime_ns)}
    for p in sorted(directory.iterdir()):
        st = p.stat()
        files[p.name] = (st.st_mode, st.st_uid, st.st_mtime_ns, p.read_bytes())
    return files


def filled(path: Path) -> tuple[Outbox, list[dict]]:
    box = Outbox(path, max_messages=3)
    messages = [result(i) for i in range(5)]
    for m in messages:
        box.put(m)
    return box, messages[2:]


def test_readonly_reads_without_creating_or_changing_anything(path: Path) -> None:
    box, waiting = filled(path)
    box.close()
    before = snapshot(path.parent)
    reader = Outbox.open_readonly(path)
    assert reader.pending() == waiting
    assert len(reader) == 3
    assert reader.reported("autoencoder") == {1, 2, 3, 4, 5}
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: opened read-only"):
        reader.put(result())
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: opened read-only"):
        reader.flush(Recorder())
    reader.close()
    assert snapshot(path.parent) == before


def test_readonly_sees_what_a_live_writer_has_not_checkpointed(path: Path) -> None:
    box, waiting = filled(path)
    newest = result(9)
    box.put(newest)
    before = snapshot(path.parent)
    reader = Outbox.open_readonly(path)
    assert reader.pending() == [*waiting[1:], newest]
    reader.close()
    after = snapshot(path.parent)
    # The -shm is SQLite's lock table, which readers use too when they may write it.
    assert {k: v for k, v in after.items() if not k.endswith("-shm")} == {
        k: v for k, v in before.items() if not k.endswith("-shm")
    }
    assert after.keys() == before.keys()


def test_readonly_of_a_missing_outbox_creates_nothing(path: Path) -> None:
    path.parent.mkdir()
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: no such file$"):
        Outbox.open_readonly(path)
    assert list(path.parent.iterdir()) == []


def test_readonly_reports_a_corrupt_outbox_and_leaves_it(path: Path) -> None:
    garbage(path)
    before = snapshot(path.parent)
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: file is not a database"):
        Outbox.open_readonly(path)
    assert snapshot(path.parent) == before


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A directory, tmp_path/"ro", writable until the returned function makes it
    read-only: as root a tmpfs remounted read-only (root writes through mode bits), as
    anyone else mode 0555."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        yield lambda: directory.chmod(0o555)
        directory.chmod(0o755)
        return
    mounted = _run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(directory))
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

    def make_readonly() -> None:
        remounted = _run("mount", "-o", "remount,ro", str(directory))
        assert remounted.returncode == 0, remounted.stderr

    try:
        yield make_readonly
    finally:
        _run("umount", "--lazy", str(directory))  # even with a reader left open by a failure


@pytest.mark.parametrize("writer", ["closed", "crashed"])
def test_readonly_in_a_readonly_directory(
    tmp_path: Path, readonly_dir: Callable[[], None], writer: str
) -> None:
    path = tmp_path / "ro" / "outbox.db"
    box, waiting = filled(path)
    box.close()
    if writer == "crashed":  # its -wal and -shm stay, with results not in outbox.db yet
        newest = result(9)
        code = (
            "import os, sys; from pathlib import Path; from smocsd.delivery.outbox import Outbox\n"
            # Kept in a name: on Python 3.10 a temporary outbox is freed (and closed, which
            # checkpoints the WAL away) before os._exit.
            f"box = Outbox(Path({str(path)!r}), 3); box.put({newest!r}); os._exit(0)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        waiting = [*waiting[1:], newest]
    readonly_dir()
    before = snapshot(path.parent)
    if writer == "crashed":
        assert {"outbox.db-wal", "outbox.db-shm"} <= before.keys()
    reader = Outbox.open_readonly(path)
    assert reader.pending() == waiting
    assert len(reader) == 3
    assert reader.reported("autoencoder") == {1, 2, 3, 4, 5} | (
        {10} if writer == "crashed" else set()
    )
    reader.close()
    with pytest.raises(OutboxError, match=f"^{re.escape(str(path))}: "):
        Outbox(path).put(result())
    assert snapshot(path.parent) == before


# outbox.py needs nothing but the standard library, so a system interpreter can load it
# as the other user, who cannot reach this one when it lives under /root.
OTHER_USER_CODE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from smocsd.delivery import outbox
box = outbox.Outbox.open_readonly(Path(sys.argv[2]))
print(json.dumps([box.pending(), sorted(box.reported("autoencoder"))]))
"""


@pytest.fixture
def other_user_python() -> str:
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the other user to run")
    return python


@pytest.mark.parametrize("writer", ["closed", "live"])
def test_readonly_by_another_user(other_user_python: str, writer: str) -> None:
    """`smocsd status` run by an operator: files owned by the daemon's user, mode 0644,
    in a directory the operator cannot write; the daemon running or not."""
    # Not under tmp_path, whose mode 0700 would keep the other user out.
    state, code = (Path(tempfile.mkdtemp(prefix="smocsd-outbox-")) for _ in range(2))
    try:
        for directory in (state, code):
            directory.chmod(0o755)
        # The package's sources (the outbox needs only its lean modules), where the other
        # user can read them: the dev venv lives under /root.
        module = shutil.copytree(
            Path(outbox_module.__file__).parents[1],
            code / "smocsd",
            ignore=shutil.ignore_patterns("__pycache__"),
        ).parent
        path = state / "outbox.db"
        box, waiting = filled(path)
        if writer == "closed":
            box.close()
        before = snapshot(state)
        child = subprocess.run(
            [other_user_python, "-c", OTHER_USER_CODE, str(module), str(path)],
            capture_output=True,
            text=True,
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
        )
        assert child.returncode == 0, child.stderr
        assert json.loads(child.stdout) == [waiting, [1, 2, 3, 4, 5]]
        assert snapshot(state) == before
        box.close()
    finally:
        shutil.rmtree(state)
        shutil.rmtree(code)
