"""The durable outbox: nothing is lost, nothing is silently dropped."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from smocsd.outbox import DROPPED_FIELD, FLUSH_BATCH, Outbox


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
        f"import sys; from pathlib import Path; from smocsd.outbox import Outbox\n"
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
    assert box.dropped == 2
    failing = Recorder(lambda _m: False)
    box.flush(failing)
    assert failing.sent[0][DROPPED_FIELD] == 2
    assert box.dropped == 2  # not delivered, so not cleared
    assert box.pending() == messages[2:]  # the field is added on delivery, never stored

    # The carrier itself fails, a later one is delivered: the count waits for a carrier.
    first_fails = Recorder(lambda m: m["message_id"] != messages[2]["message_id"])
    assert box.flush(first_fails) == 2
    assert box.dropped == 2
    deliver = Recorder()
    assert box.flush(deliver) == 1
    assert deliver.sent == [{**messages[2], DROPPED_FIELD: 2}]
    assert box.dropped == 0

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
    assert box.dropped == 17
    [line] = caplog.records
    assert "dropped the 17 oldest" in line.getMessage()
    assert "and 12 more" in line.getMessage()


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
        f"import sys, uuid; from pathlib import Path; from smocsd.outbox import Outbox\n"
        f"box = Outbox(Path({str(path)!r}))\n"
        f"for i in range(150):\n"
        f"    box.put({{'message_id': str(uuid.uuid4()), 'writer': sys.argv[1], 'i': i}})\n"
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
