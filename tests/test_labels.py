"""The operator's labels: `smocsd accept`, `smocsd exclude`, `smocsd labels`, the file
they keep (state_dir/labels.json) and the smocsd.label/1 messages they queue.

A label write is killed at every step and leaves the old list or the new one; a damaged
file is one line naming it, wherever it is read; a message that cannot be queued keeps
the label. The accept defaults come from what the screening recorded and from live
scoring's open alarm, both made for real here, not written by hand.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import faults
import pytest
from helpers import run_forked, smocsd, write_config
from schemacheck import validate

from smocsd.app.live import LiveScorer
from smocsd.common import config
from smocsd.common.labels import FILE, By, Kind, Label, Labels, for_model
from smocsd.common.labels import message as label_message
from smocsd.data import demo
from smocsd.delivery.outbox import Outbox

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --- helpers


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def messages(state: Path) -> list[dict]:
    """What waits in the outbox, each message checked against its schema."""
    outbox = Outbox.open_readonly(state / "outbox.db")
    try:
        found = outbox.pending()
    finally:
        outbox.close()
    for message in found:
        validate(message)
    return found


def messages_unchecked(state: Path) -> list[dict]:
    """What waits in the outbox, as stored (a label's `model` is not in label-1's schema
    yet)."""
    outbox = Outbox.open_readonly(state / "outbox.db")
    try:
        return outbox.pending()
    finally:
        outbox.close()


def label_messages(state: Path) -> list[tuple[str, int, str]]:
    """(action, label id, kind) of every label message in the outbox, oldest first."""
    return [
        (m["action"], m["label"]["id"], m["label"]["kind"])
        for m in messages(state)
        if m["schema"] == "smocsd.label/1"
    ]


def add_fault(db: Path, first: int, last: int) -> None:
    """Rows first..last of a demo database turned into a vibration fault (x8)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE readings SET vibration = vibration * 8, label = 1 WHERE rowid BETWEEN ? AND ?",
            (first, last),
        )
    conn.close()


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory whose screening recorded an alarm: v1 trained on 3000 demo rows,
    then 600 rows with a fault at 3301..3400, which the next cycle (v2) left out."""
    root = tmp_path_factory.mktemp("screened")
    state = root / "state"
    path = write_config(root / "c.toml", state, scoring={"enabled": True})
    demo.write(state / "readings.db", 3000)
    smocsd("train-once", config=path, check=True)
    demo.write(state / "readings.db", 600)
    add_fault(state / "readings.db", 3301, 3400)
    result = json.loads(smocsd("train-once", config=path, check=True).stdout)
    assert result["model_meta"]["data"]["left_out"]["rows"] > 0, result
    return state


def copy_of(state: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a fixture's state directory and a config for it: (state, config)."""
    copy = tmp_path / "state"
    shutil.copytree(state, copy, symlinks=True)
    return copy, write_config(tmp_path / "c.toml", copy, scoring={"enabled": True})


def screened_alarms(state: Path) -> list[tuple[int, int]]:
    """The alarm spans the screening recorded in state.json."""
    job = json.loads((state / "state.json").read_text())["jobs"]["autoencoder"]
    return [(first, last) for first, last, why, *_ in job["screened"]["spans"] if why == "alarm"]


# --- a kill at any instant of the write


# The calls of an `smocsd exclude`, in order: the lock (flock), the temp file's write
# and fsync, the rename over labels.json, the directory's fsync, then the outbox's
# writes and syncs (pwrite64, fdatasync) and the "added" line (write). Nothing before
# the lock writes (no bytecode is written: PYTHONDONTWRITEBYTECODE).
KILLED_AT = ("flock", "write", "fsync", "rename", "pwrite64", "fdatasync")


def temp_files(state: Path) -> set[Path]:
    return set(state.glob(f".tmp-{FILE}.*"))


def test_labels_survive_a_kill_at_any_instant_of_their_write(plant):
    state, cfg = plant
    labels = Labels(state)
    smocsd("exclude", "--from", "1", "--to", "9", config=cfg, check=True)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    highest = 1  # ids only grow: every label that lands has a higher one
    steps = set()  # what the kills left on disk
    for syscall in KILLED_AT:
        for when in itertools.count(1):
            before, temps = labels.read(), temp_files(state)
            first = 100 * (highest + len(steps) + when)
            cmd = [sys.executable, "-m", "smocsd", "exclude", "--from", str(first)]
            cmd += ["--to", str(first + 9), "--config", str(cfg)]
            kill = faults.strace_inject(cmd, syscall, "KILL", when)
            proc = subprocess.run(kill, capture_output=True, text=True, env=env)
            # Never torn: the file reads, and holds the old list or the old one plus one.
            after = labels.read()
            assert after[: len(before)] == before, (syscall, when)
            new = after[len(before) :]
            assert len(new) <= 1, (syscall, when, new)
            for label in new:
                assert (label.kind, label.first, label.last) == (Kind.EXCLUDE, first, first + 9)
                assert label.id > highest, (syscall, when, label)
                highest = label.id
            # A message only ever names a label that landed, once per add.
            queued = label_messages(state)
            assert len(set(queued)) == len(queued), queued
            assert {i for _, i, _ in queued} <= {x.id for x in after}, (queued, after)
            assert not list(state.glob("outbox.db.corrupt-*"))
            if proc.returncode == 0:  # past the last such call: the add went through
                assert new and ("added", new[0].id, "exclude") in queued, proc.stderr
                break
            assert proc.returncode in (-9, 137), (syscall, when, proc.returncode, proc.stderr)
            left = temp_files(state) - temps
            if new:
                steps.add("renamed")
            elif not left:
                steps.add("not begun")
            else:
                (temp,) = left
                data = temp.read_bytes()
                if not data:
                    steps.add("temp file created")
                else:
                    doc = json.loads(data)  # whole, as it would have been renamed
                    assert [x["id"] for x in doc["labels"]] == [x.id for x in before] + [
                        doc["next_id"] - 1
                    ]
                    steps.add("temp file written")
    # The kills hit every step of the write, not only before or after it.
    assert steps == {"not begun", "temp file created", "temp file written", "renamed"}

    # A removed label's id is never given again.
    smocsd("labels", "remove", str(highest), config=cfg, check=True)
    smocsd("exclude", "--from", "1", "--to", "2", config=cfg, check=True)
    ids = [x.id for x in labels.read()]
    assert ids == sorted(ids) and highest not in ids and ids[-1] == highest + 1


def test_the_temp_file_of_a_killed_label_write_goes_at_the_next_start(plant):
    state, cfg = plant
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "smocsd", "exclude", "--from", "1", "--to", "2"]
    cmd += ["--config", str(cfg)]
    proc = subprocess.run(faults.strace_inject(cmd, "rename", "KILL"), capture_output=True, env=env)
    assert proc.returncode in (-9, 137)
    (temp,) = temp_files(state)  # the killed write's, whole, never renamed
    smocsd("exclude", "--from", "3", "--to", "4", config=cfg, check=True)
    proc = smocsd("train-once", config=cfg, check=True)  # as the daemon's start
    assert f"removed {temp.name} left by an interrupted write" in proc.stderr
    assert not temp_files(state)
    assert [(x.id, x.first) for x in Labels(state).read()] == [(1, 3)]


# --- a damaged labels.json


DAMAGE = {
    "garbage": b"\x00\xff garbage {",
    "truncated": b'{"format": "smocsd.labels/1", "next_id": 2, "labels": [{"id": 1, "ki',
    "wrong format": json.dumps({"format": "smocsd.labels/2", "next_id": 1, "labels": []}),
    "a label without its range": json.dumps(
        {"format": "smocsd.labels/1", "next_id": 2, "labels": [{"id": 1, "kind": "exclude"}]}
    ),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_corrupt_labels_file_is_one_line_naming_it(tmp_path, screened, caplog, damage):
    state, cfg = copy_of(screened, tmp_path)
    path = state / FILE
    data = DAMAGE[damage]
    path.write_bytes(data if isinstance(data, bytes) else data.encode())

    for command in (("labels",), ("labels", "--json"), ("exclude", "--from", "1", "--to", "2")):
        proc = smocsd(*command, config=cfg)
        assert (proc.returncode, proc.stdout) == (1, ""), command
        assert one_line(proc).startswith(f"smocsd: {path}: "), proc.stderr
    assert path.read_bytes() == (data if isinstance(data, bytes) else data.encode())
    # status shows the rest, and what is wrong with the labels.
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert (status["current_version"], status["labels"]) == (2, [])
    assert status["labels_problem"].startswith(f"{path}: "), status["labels_problem"]
    text = smocsd("status", config=cfg, check=True).stdout.splitlines()
    assert f"labels:      UNREADABLE: {status['labels_problem']}" in text

    # A cycle that would train fails, naming the file, and trains on nothing it cannot read.
    demo.write(state / "readings.db", 600)
    proc = smocsd("train-once", config=cfg)
    result = json.loads(proc.stdout)
    validate(result)
    assert (proc.returncode, result["outcome"]) == (1, "failed")
    assert str(path) in result["error"] and "\n" not in result["error"], result["error"]
    assert sorted(p.name for p in (state / "models/autoencoder").glob("v*")) == [
        "v000001",
        "v000002",
    ]

    # Live scoring says it once and excludes nothing until the file is fixed.
    scorer = LiveScorer(config.load(cfg))
    outbox = Outbox(state / "outbox.db")
    try:
        with caplog.at_level("ERROR", logger="smocsd.app.live"):
            assert scorer.excluded() == []
            scorer.step(outbox)  # starts at the newest row, reading labels.json again
            assert scorer.excluded() == []
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(path) in errors[0], errors
        assert errors[0].startswith("scoring: excluded periods not applied: ")
        path.unlink()
        Labels(state).add(Kind.EXCLUDE, 5, 6)
        assert scorer.excluded() == [(5, 6)]
    finally:
        scorer.close()
        outbox.close()


def test_an_infinite_order_value_is_one_line_naming_the_file(plant):
    state, cfg = plant
    path = state / FILE
    label = {"id": 1, "kind": "exclude", "first": 1, "last": 1e999, "created_at": "x"}
    path.write_text(json.dumps({"format": "smocsd.labels/1", "next_id": 2, "labels": [label]}))
    proc = smocsd("labels", config=cfg)
    assert proc.returncode == 1
    assert one_line(proc).startswith(f"smocsd: {path}: "), proc.stderr


# --- a message that cannot be queued


@pytest.fixture(params=["directory", "disk full"])
def broken_outbox(
    request: pytest.FixtureRequest, plant: tuple[Path, Path]
) -> Iterator[Callable[[list[str]], list[str]]]:
    """How to run a command whose outbox write fails: with a directory where outbox.db
    should be, or under strace failing every write to the outbox's journal (ENOSPC)."""
    state, _ = plant
    outbox = state / "outbox.db"
    if request.param == "directory":
        outbox.mkdir()
        yield lambda cmd: cmd
    else:
        Outbox(outbox).close()  # the file exists: its writes fail, not its creation
        yield lambda cmd: faults.strace_inject(cmd, "pwrite64", "ENOSPC", "1+", f"{outbox}-wal")


def test_a_label_message_that_cannot_be_queued_keeps_the_label(plant, broken_outbox):
    state, cfg = plant
    cmd = [sys.executable, "-m", "smocsd", "exclude", "--from", "10", "--to", "20"]
    cmd += ["--reason", "calibration", "--config", str(cfg)]
    proc = subprocess.run(broken_outbox(cmd), capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_line(proc).startswith(f"smocsd: {state}/outbox.db: "), proc.stderr
    (label,) = Labels(state).read()
    assert (label.id, label.kind, label.first, label.last, label.reason) == (
        1,
        Kind.EXCLUDE,
        10,
        20,
        "calibration",
    )
    # Once the outbox takes writes again, the next label is added and queued.
    if (state / "outbox.db").is_dir():
        (state / "outbox.db").rmdir()
    smocsd("exclude", "--from", "30", "--to", "40", config=cfg, check=True)
    assert [x.id for x in Labels(state).read()] == [1, 2]
    assert ("added", 2, "exclude") in label_messages(state)


# --- the commands


def test_exclude_needs_a_range_in_order(plant):
    state, cfg = plant
    for given in (["--from", "5"], ["--to", "5"], []):
        proc = smocsd("exclude", *given, config=cfg)
        assert proc.returncode == 2, given
        assert "required" in proc.stderr and "usage: smocsd exclude" in proc.stderr
    proc = smocsd("exclude", "--from", "20", "--to", "10", config=cfg)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_line(proc) == "smocsd: --from 20 is after --to 10"
    proc = smocsd("accept", "--from", "20", "--to", "10", config=cfg)
    assert (proc.returncode, one_line(proc)) == (1, "smocsd: --from 20 is after --to 10")
    assert not (state / FILE).exists() and not (state / "outbox.db").exists()


def test_ids_grow_and_are_never_reused(plant):
    state, cfg = plant
    out = smocsd("exclude", "--from", "10", "--to", "20", "--reason", "calibration", config=cfg)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "added #1 exclude 10..20: calibration: never trained on, never alarmed\n"
    out = smocsd("accept", "--from", "100", "--to", "200", config=cfg, check=True)
    assert out.stdout == "added #2 accept 100..200: the next check trains on these rows\n"
    smocsd("exclude", "--from", "300", "--to", "300", config=cfg, check=True)
    out = smocsd("labels", "remove", "3", config=cfg, check=True)
    assert out.stdout == "removed #3 exclude 300..300\n"
    smocsd("labels", "remove", "1", config=cfg, check=True)
    smocsd("exclude", "--from", "400", "--to", "500", config=cfg, check=True)
    doc = json.loads((state / FILE).read_text())
    assert (doc["format"], doc["next_id"]) == ("smocsd.labels/1", 5)
    assert [x["id"] for x in doc["labels"]] == [2, 4]

    # A removed label is gone: removing it again fails, naming the file.
    for gone in ("1", "3", "99"):
        proc = smocsd("labels", "remove", gone, config=cfg)
        assert (proc.returncode, proc.stdout) == (1, "")
        assert one_line(proc) == f"smocsd: {state / FILE}: no label #{gone}"
    assert json.loads((state / FILE).read_text()) == doc

    # --json is the file's list, and reads back into the same labels.
    for command in (("labels", "--json"), ("labels", "list", "--json")):
        listed = json.loads(smocsd(*command, config=cfg, check=True).stdout)
        assert listed == doc["labels"]
        assert [Label.from_json(x).to_json() for x in listed] == listed
    assert [x.to_json() for x in Labels(state).read()] == doc["labels"]
    text = smocsd("labels", config=cfg, check=True).stdout.splitlines()
    assert text == [
        f"{doc['labels'][0]['created_at']}  #2 accept 100..200",
        f"{doc['labels'][1]['created_at']}  #4 exclude 400..500",
        "2 label(s)",
    ]
    assert smocsd("labels", "list", config=cfg, check=True).stdout.splitlines() == text

    # Every add and remove is a message, in order.
    assert label_messages(state) == [
        ("added", 1, "exclude"),
        ("added", 2, "accept"),
        ("added", 3, "exclude"),
        ("removed", 3, "exclude"),
        ("removed", 1, "exclude"),
        ("added", 4, "exclude"),
    ]


def test_every_label_message_passes_its_schema_and_is_listed(plant):
    state, cfg = plant
    smocsd("exclude", "--from", "10", "--to", "20", "--reason", "über «calibration»", config=cfg)
    smocsd("accept", "--from", "2000", config=cfg, check=True)
    smocsd("labels", "remove", "1", config=cfg, check=True)
    queued = messages(state)  # each validated
    assert [m["action"] for m in queued] == ["added", "added", "removed"]
    file = {x.id: x.to_json() for x in Labels(state).read()}
    assert queued[1]["label"] == file[2]
    assert queued[0]["label"] == queued[2]["label"]  # as it was when removed
    assert queued[0]["label"]["reason"] == "über «calibration»"
    for m in queued:
        assert (m["device_id"], m["model"], m["label"]["by"]) == (
            "gw-test",
            "autoencoder",
            "operator",
        )
    assert len({m["message_id"] for m in queued}) == 3

    listed = smocsd("outbox", "list", config=cfg, check=True).stdout.splitlines()
    assert listed == [
        f"{m['timestamp']}  {m['message_id']}  autoencoder  label #{m['label']['id']} "
        f"{m['label']['kind']} {m['action']}"
        for m in queued
    ] + ["3 message(s) waiting"]
    assert json.loads(smocsd("outbox", "list", "--json", config=cfg).stdout) == queued


def test_accept_needs_an_alarm_or_from_and_reaches_to_the_newest_row(plant):
    state, cfg = plant
    proc = smocsd("accept", config=cfg)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_line(proc) == (
        "smocsd: no alarm to accept (none open, none recorded): give --from ORDER"
    )
    assert not (state / FILE).exists()
    out = smocsd("accept", "--from", "2500", "--reason", "new bearing", config=cfg, check=True)
    assert (
        out.stdout
        == "added #1 accept 2500..3000: new bearing: the next check trains on these rows\n"
    )
    demo.write(state / "readings.db", 10)
    smocsd("accept", "--from", "2995", config=cfg, check=True)
    assert [(x.first, x.last) for x in Labels(state).read()] == [(2500, 3000), (2995, 3010)]


def test_accept_defaults_to_the_newest_screened_alarm_and_status_shows_it(tmp_path, screened):
    state, cfg = copy_of(screened, tmp_path)
    alarms = screened_alarms(state)
    assert alarms, "the screening recorded no alarm"
    first, last = max(alarms)

    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert status["labels"] == []
    assert {(x["first"], x["last"]) for x in status["left_out"] if x["why"] == "alarm"} == set(
        alarms
    )
    assert all(x["version"] == 1 for x in status["left_out"])
    text = smocsd("status", config=cfg, check=True).stdout.splitlines()
    assert f"left out:    {len(status['left_out'])} range(s) of rows " in "\n".join(text)
    # v2 was trained without them, and its report says so.
    v2 = state / "models/autoencoder/v000002"
    left_out = json.loads((v2 / "metadata.json").read_text())["data"]["left_out"]
    assert [(r["first"], r["last"]) for r in left_out["ranges"] if r["why"] == "alarm"] == alarms
    html = (v2 / "report.html").read_text()
    assert f"<th>{first} … {last}: the model that was current alarmed on them</th>" in html

    out = smocsd("accept", "--reason", "a new pump", config=cfg, check=True).stdout
    assert (
        out == f"added #1 accept {first}..3600: a new pump: the next check trains on these rows\n"
    )
    assert first <= 3301 and last >= 3400
    # That alarm is accepted: there is none left to accept by default.
    proc = smocsd("accept", config=cfg)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "give --from ORDER" in one_line(proc)

    smocsd("exclude", "--from", "3500", "--to", "3550", config=cfg, check=True)
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert status["labels"] == [x.to_json() for x in Labels(state).read()]
    assert [(x["id"], x["kind"]) for x in status["labels"]] == [(1, "accept"), (2, "exclude")]
    text = smocsd("status", config=cfg, check=True).stdout.splitlines()
    assert f"label:       #1 accept {first}..3600: a new pump" in text
    assert "label:       #2 exclude 3500..3550" in text


def test_accept_defaults_to_live_scorings_open_alarm(tmp_path, screened):
    """An open alarm wins over the older one the screening recorded, and once screened,
    the run of alarmed rows that holds it gives its start."""
    state, cfg = copy_of(screened, tmp_path)
    scorer = LiveScorer(config.load(cfg))
    outbox = Outbox(state / "outbox.db")
    try:
        scorer.step(outbox)  # starts at row 3600
        demo.write(state / "readings.db", 40)
        add_fault(state / "readings.db", 3611, 3640)
        scorer.step(outbox)
    finally:
        scorer.close()
        outbox.close()
    # Each model's position is under models.<name> (a release before [models] kept it at
    # the top level).
    event = json.loads((state / "state.json").read_text())["models"]["autoencoder"]["scoring"][
        "event"
    ]
    assert event is not None, "no alarm opened"
    start = event["start"]["order"]
    assert 3611 <= start <= 3640 and start > max(screened_alarms(state))[0]
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert status["scoring"]["open_alarm"]["start"]["order"] == start

    out = smocsd("accept", config=cfg, check=True).stdout
    assert out == f"added #1 accept {start}..3640: the next check trains on these rows\n"
    (queued,) = [m for m in messages(state) if m["schema"] == "smocsd.label/1"]
    assert (queued["label"]["first"], queued["label"]["last"]) == (start, 3640)

    # Once a cycle has screened the alarm's rows, it starts where their recorded run does:
    # with the rows leading into its first window over the threshold.
    smocsd("labels", "remove", "1", config=cfg, check=True)
    smocsd("train-once", "--force", config=cfg, check=True)
    (run,) = [(a, b) for a, b in screened_alarms(state) if a <= start <= b]
    assert run[0] < start
    out = smocsd("accept", config=cfg, check=True).stdout
    assert out == f"added #2 accept {run[0]}..3640: the next check trains on these rows\n"


def test_label_commands_on_a_missing_state_dir_create_nothing(tmp_path):
    """The writing ones; `labels` and `labels list` are among test_cli's READERS."""
    state = tmp_path / "stat"
    cfg = write_config(tmp_path / "c.toml", state)
    for command in (
        ("accept", "--from", "1", "--to", "2"),
        ("exclude", "--from", "1", "--to", "2"),
        ("labels", "remove", "1"),
    ):
        proc = smocsd(*command, config=cfg)
        assert (proc.returncode, proc.stdout) == (1, ""), command
        assert proc.stderr == f"smocsd: state directory {state} does not exist (daemon.state_dir)\n"
    assert not state.exists()


# --- run by root on another user's state directory


@pytest.fixture
def nobodys_state() -> Iterator[tuple[Path, Path]]:
    """A state directory owned by nobody, where nobody can reach it (pytest's tmp_path is
    under a root-only one): (state, config)."""
    root = Path(tempfile.mkdtemp(prefix="smocsd-test-"))
    root.chmod(0o755)
    state = root / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    try:
        yield state, write_config(root / "c.toml", state)
    finally:
        shutil.rmtree(root)


@needs_root
def test_label_commands_run_by_root_become_the_state_dirs_owner(nobodys_state, capfd):
    state, cfg = nobodys_state
    switched = f"INFO smocsd: running as nobody, the owner of {state}\n"
    code, out, err = run_forked(
        ["exclude", "--from", "1", "--to", "2", "--config", str(cfg)], capfd
    )
    assert code == 0, err
    assert switched in err and out.startswith("added #1 exclude 1..2")
    nogroup = pwd.getpwuid(NOBODY).pw_gid
    assert {p.name for p in state.iterdir()} >= {FILE, "labels.lock", "outbox.db"}
    assert {(p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()} == {(NOBODY, nogroup)}

    code, out, err = run_forked(["labels", "--config", str(cfg)], capfd)  # reads: no switch
    assert (code, "running as" in err) == (0, False), err
    code, out, err = run_forked(["labels", "remove", "1", "--config", str(cfg)], capfd)
    assert code == 0 and switched in err, err
    assert {(p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()} == {(NOBODY, nogroup)}
    assert Labels(state).read() == []


# --- labels per model


def two_models(root: Path) -> tuple[Path, Path]:
    """[models.a] and [models.b], each its own table of 3000 demo rows: (state, config)."""
    state = root / "state"
    demo.write(state / "readings.db", 3000, seed=1, table="ra")
    demo.write(state / "readings.db", 3000, seed=2, table="rb")
    sections = {"models.a.source": {"table": "ra"}, "models.b.source": {"table": "rb"}}
    return state, write_config(root / "c.toml", state, sections)


def test_a_label_with_model_is_that_models_only(tmp_path):
    state, cfg = two_models(tmp_path)
    out = smocsd("exclude", "--from", "10", "--to", "20", "--model", "a", config=cfg, check=True)
    assert out.stdout == "added #1 exclude 10..20 for a: never trained on, never alarmed\n"
    smocsd("exclude", "--from", "30", "--to", "40", config=cfg, check=True)  # every model
    out = smocsd("accept", "--from", "50", "--to", "60", "--model", "b", config=cfg, check=True)
    assert out.stdout == "added #3 accept 50..60 for b: the next check trains on these rows\n"

    doc = json.loads((state / FILE).read_text())
    assert [x.get("model") for x in doc["labels"]] == ["a", None, "b"]
    assert "model" not in doc["labels"][1]  # one for every model is written as before
    labels = Labels(state).read()
    assert [x.model for x in labels] == ["a", None, "b"]
    assert [x.id for x in for_model(labels, "a")] == [1, 2]
    assert [x.id for x in for_model(labels, "b")] == [2, 3]
    assert [x.id for x in for_model(labels, "c")] == [2]

    listed = json.loads(smocsd("labels", "--json", config=cfg, check=True).stdout)
    assert listed == doc["labels"]
    for model, ids in (("a", [1, 2]), ("b", [2, 3])):
        for args in (
            ("labels", "--model", model, "--json"),
            ("labels", "list", "--json", "--model", model),
        ):
            listed = json.loads(smocsd(*args, config=cfg, check=True).stdout)
            assert [x["id"] for x in listed] == ids
    text = smocsd("labels", "--model", "a", config=cfg, check=True).stdout.splitlines()
    assert [line.split("  ", 1)[-1] for line in text] == [
        "#1 exclude 10..20 for a",
        "#2 exclude 30..40",
        "2 label(s)",
    ]
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert status["labels"] == doc["labels"]

    # A message names the label's model; one of every model, the top level's model.name.
    queued = [m for m in messages_unchecked(state) if m["schema"] == "smocsd.label/1"]
    assert [(m["model"], m["label"].get("model")) for m in queued] == [
        ("a", "a"),
        ("autoencoder", None),
        ("b", "b"),
    ]

    # A wrong name is a usage error listing the models; none is needed to add or list.
    for command in (
        ("exclude", "--from", "1", "--to", "2"),
        ("accept", "--from", "1", "--to", "2"),
        ("labels",),
        ("labels", "remove", "1"),
    ):
        proc = smocsd(*command, "--model", "c", config=cfg)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert one_line(proc) == "smocsd: no model 'c': the models are a, b"
    assert len(Labels(state).read()) == 3

    # Removing with --model: only a label in force for that model.
    proc = smocsd("labels", "remove", "1", "--model", "b", config=cfg)
    assert (proc.returncode, one_line(proc)) == (
        1,
        f"smocsd: {state / FILE}: label #1 is for a, not b",
    )
    out = smocsd("labels", "remove", "1", "--model", "a", config=cfg, check=True)
    assert out.stdout == "removed #1 exclude 10..20 for a\n"
    smocsd("labels", "remove", "2", "--model", "b", config=cfg, check=True)  # every model's
    assert [x.id for x in Labels(state).read()] == [3]


def test_accept_with_several_models_needs_from_or_model(tmp_path):
    state, cfg = two_models(tmp_path)
    proc = smocsd("accept", config=cfg)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_line(proc) == (
        "smocsd: several models: give --from ORDER, or --model NAME to accept that model's alarm"
    )
    proc = smocsd("accept", "--model", "a", config=cfg)
    assert one_line(proc) == (
        "smocsd: no alarm to accept (none open, none recorded): give --from ORDER"
    )
    # --to: the newest row of the tables the label is for.
    demo.write(state / "readings.db", 5, table="rb")
    out = smocsd("accept", "--from", "2990", config=cfg, check=True)
    assert out.stdout == "added #1 accept 2990..3005: the next check trains on these rows\n"
    out = smocsd("accept", "--from", "2990", "--model", "a", config=cfg, check=True)
    assert out.stdout == "added #2 accept 2990..3000 for a: the next check trains on these rows\n"


def test_another_models_accept_label_does_not_make_a_model_train(tmp_path):
    """The gate's "an accept label is new: train now" counts this model's labels and those
    of every model only."""
    _, cfg = two_models(tmp_path)
    for model in ("a", "b"):
        smocsd("train-once", "--model", model, config=cfg, check=True)
    smocsd("accept", "--from", "100", "--to", "200", "--model", "b", config=cfg, check=True)
    result = json.loads(smocsd("train-once", "--model", "a", config=cfg, check=True).stdout)
    assert result["outcome"] == "skipped", result
    result = json.loads(smocsd("train-once", "--model", "b", config=cfg, check=True).stdout)
    assert result["outcome"] != "skipped", result
    smocsd("accept", "--from", "100", "--to", "200", config=cfg, check=True)  # every model
    result = json.loads(smocsd("train-once", "--model", "a", config=cfg, check=True).stdout)
    assert result["outcome"] != "skipped", result


def test_a_labels_file_of_the_previous_release_reads_the_same(tmp_path):
    """No `model` in any label: each applies to every model, and is written back as it was."""
    state = tmp_path / "state"
    state.mkdir()
    old = {
        "format": "smocsd.labels/1",
        "next_id": 4,
        "labels": [
            {
                "id": 1,
                "kind": "accept",
                "first": 18231,
                "last": 18262,
                "reason": "bearing replaced",
                "by": "operator",
                "created_at": "2026-11-28T05:00:00Z",
            },
            {
                "id": 3,
                "kind": "exclude",
                "first": 120000,
                "last": 121500,
                "reason": "",
                "by": "accept_after",
                "created_at": "2026-11-29T05:00:00Z",
            },
        ],
    }
    (state / FILE).write_text(json.dumps(old, indent=2) + "\n")
    labels = Labels(state).read()
    assert [x.model for x in labels] == [None, None]
    assert [x.to_json() for x in labels] == old["labels"]
    assert for_model(labels, "pumps@P-101") == labels
    assert labels[0].describe() == "#1 accept 18231..18262: bearing replaced"
    cfg = write_config(tmp_path / "c.toml", state)
    assert json.loads(smocsd("labels", "--json", config=cfg, check=True).stdout) == old["labels"]
    # A write keeps them as they were.
    smocsd("labels", "remove", "3", config=cfg, check=True)
    assert json.loads((state / FILE).read_text())["labels"] == old["labels"][:1]

    # A `model` that is no name is a damaged file, one line naming it.
    (state / FILE).write_text(json.dumps({**old, "labels": [{**old["labels"][0], "model": 7}]}))
    proc = smocsd("labels", config=cfg)
    assert proc.returncode == 1
    assert one_line(proc).startswith(f"smocsd: {state / FILE}: not a labels file: model is 7")


def test_a_label_message_names_the_labels_model():
    label = Label(1, Kind.ACCEPT, 1, 2, "", By.OPERATOR, "2026-11-28T05:00:00Z", "pumps@P-101")
    made = label_message(label, "added", "gw-01", "pumps")
    assert (made["model"], made["label"]["model"]) == ("pumps@P-101", "pumps@P-101")
    anyone = Label(2, Kind.EXCLUDE, 1, 2, "", By.OPERATOR, "2026-11-28T05:00:00Z")
    made = label_message(anyone, "removed", "gw-01", "autoencoder")
    assert made["model"] == "autoencoder" and "model" not in made["label"]
    validate(made)


def test_another_models_excluded_period_is_trained_on(tmp_path):
    """Screening leaves out this model's excluded periods and those of every model only."""
    _, cfg = two_models(tmp_path)
    smocsd("exclude", "--from", "100", "--to", "200", "--model", "b", config=cfg, check=True)
    smocsd("exclude", "--from", "300", "--to", "350", config=cfg, check=True)

    def excluded(model: str) -> list[tuple[int, int]]:
        out = smocsd("train-once", "--force", "--model", model, config=cfg, check=True).stdout
        ranges = json.loads(out)["model_meta"]["data"]["left_out"]["ranges"]
        return [(r["first"], r["last"]) for r in ranges if r["why"] == "excluded"]

    assert excluded("a") == [(300, 350)]
    assert excluded("b") == [(100, 200), (300, 350)]
