"""The durable outbox: nothing is lost, nothing is silently dropped."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
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

from smocsd import outbox as outbox_module
from smocsd.outbox import DROPPED_FIELD, FLUSH_BATCH, Outbox, OutboxError, json_safe


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
    assert (reader.pending(), reader.dropped, reader.reported("autoencoder")) == ([old], 3, set())
    box = Outbox(path)
    box.put(result(4))
    assert box.reported("autoencoder") == {5}
    assert len(box) == 2


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


def foreign(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, sender TEXT, text TEXT)")
        db.execute("INSERT INTO messages (sender, text) VALUES ('ops', 'not a result')")
        db.commit()


@pytest.mark.parametrize("damage", [garbage, truncated, foreign])
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
    assert reader.dropped == 2
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
            "import os, sys; from pathlib import Path; from smocsd.outbox import Outbox\n"
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
    assert (len(reader), reader.dropped) == (3, 2 + (writer == "crashed"))
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
from smocsd import outbox
box = outbox.Outbox.open_readonly(Path(sys.argv[2]))
print(json.dumps([box.pending(), box.dropped, sorted(box.reported("autoencoder"))]))
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
            Path(outbox_module.__file__).parent,
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
        assert json.loads(child.stdout) == [waiting, 2, [1, 2, 3, 4, 5]]
        assert snapshot(state) == before
        box.close()
    finally:
        shutil.rmtree(state)
        shutil.rmtree(code)
