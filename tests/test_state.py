"""state.json read as a typed record: a field of the wrong kind is named once (file and
field), reset, and the rest kept; the daemon starts, trains, scores and delivers on it."""

from __future__ import annotations

import copy
import json
import math
import random
import time

import pytest
from helpers import Running, insert, smocsd, write_config

from smocsd.common.state import CycleRecord, ScoringPosition, State, StateFile
from smocsd.data import demo

EVENT_ID = "0b6f3c1e-2d4a-4f5e-9a8b-7c6d5e4f3a2b"

# A state.json as the daemon writes it: every key of the schema, each with a valid value.
VALID = {
    "last_cycle": {
        "at": "2026-11-28T04:17:54Z",
        "outcome": "failed",
        "version": 3,
        "reason": "a reason",
        "error": "an error",
    },
    "next_check": "2026-11-28T05:17:54Z",
    "scoring": {
        "last_order": 3040,
        "version": 3,
        "recent": [False, True],
        "recent_high": [[1], [], [0, 1]],
        "event": {
            "event_id": EVENT_ID,
            "version": 3,
            "start": {"order": 3031, "time": 1795839474.0},
            "last": {"order": 3040, "time": None},
            "peak_score": 2.5,
            "threshold": 1.25,
            "errors": {"vibration": 4.0, "temperature": 0.5},
            "quiet": 2,
        },
        "at": "2026-11-28T04:18:00Z",
    },
    "models": {
        "autoencoder@P-1": {
            "last_cycle": {"at": "2026-11-28T04:17:54Z", "outcome": "promoted", "version": 2},
            "scoring": {
                "last_order": 3041,
                "version": 2,
                "recent": [True],
                "event": None,
                "at": "2026-11-28T04:18:00Z",
            },
        }
    },
    "jobs": {
        "autoencoder": {
            "last_order": 3000,
            "trained_at": 1795839000.5,
            "accept_tried": 2,
            "seen": ["a user job's own key", 1],
            "screened": {
                "to": 3040,
                "spans": [[2990, 3010, "alarm", 2, 1795839000.0], [3020, 3020, "spike", 3, None]],
                "accepted_through": 1,
                "accept_known": 2,
            },
        }
    },
}

INT = ["3000", 3000.5, True, [], {}, 2**63, -(2**63) - 1, 10**30, math.nan, math.inf]
COUNT = [*INT, -1]
VERSION = [*COUNT, 0]
NUMBER = ["x", True, [], {}, math.nan, math.inf, -math.inf, 10**400]
SCORE = [*NUMBER, -0.5]
EPOCH = [*NUMBER, -1.0, 1e300]
TEXT = [5, 1.5, True, [], {}]
OBJECT = [[], "x", 5, True]
# Every field of the schema (its path in VALID), the values it must refuse, and whether
# it may be left out.
E, J = ("scoring", "event"), ("jobs", "autoencoder")
M = ("models", "autoencoder@P-1")
S = (*J, "screened")
FIELDS: list[tuple[tuple, list, bool]] = [
    (("last_cycle",), OBJECT, True),
    (("last_cycle", "at"), TEXT, False),
    (("last_cycle", "outcome"), TEXT, False),
    (("last_cycle", "version"), VERSION, True),
    (("last_cycle", "reason"), TEXT, True),
    (("last_cycle", "error"), TEXT, True),
    (("next_check",), [*TEXT, "tomorrow", "0001-01-01T00:00:00+05:00"], True),
    (("scoring",), OBJECT, True),
    (("scoring", "last_order"), INT, True),
    (("scoring", "version"), VERSION, True),
    (("scoring", "recent"), ["x", [1], [None], {}, True], True),
    (("scoring", "recent_high"), ["x", [1], [[-1]], [[True]], [[1.5]], {}], True),
    (("scoring", "at"), TEXT, True),
    (E, OBJECT, True),
    ((*E, "event_id"), [*TEXT, "x", EVENT_ID.upper()], False),
    ((*E, "version"), VERSION, False),
    ((*E, "start"), OBJECT, False),
    ((*E, "start", "order"), INT, False),
    ((*E, "start", "time"), NUMBER, True),
    ((*E, "last"), OBJECT, False),
    ((*E, "last", "order"), INT, False),
    ((*E, "peak_score"), SCORE, False),
    ((*E, "threshold"), SCORE, False),
    ((*E, "errors"), OBJECT, False),
    ((*E, "errors", "vibration"), SCORE, True),
    ((*E, "quiet"), COUNT, True),
    (("models",), OBJECT, True),
    (M, OBJECT, True),
    ((*M, "last_cycle"), OBJECT, True),
    ((*M, "last_cycle", "outcome"), TEXT, False),
    ((*M, "last_cycle", "version"), VERSION, True),
    ((*M, "scoring"), OBJECT, True),
    ((*M, "scoring", "last_order"), INT, True),
    ((*M, "scoring", "recent"), ["x", [1], [None], {}, True], True),
    (("jobs",), OBJECT, True),
    (J, OBJECT, True),
    ((*J, "last_order"), INT, True),
    ((*J, "trained_at"), EPOCH, True),
    ((*J, "accept_tried"), COUNT, True),
    (S, OBJECT, True),
    ((*S, "to"), INT, True),
    ((*S, "spans"), OBJECT[1:], True),
    ((*S, "spans", 0), [[1, 2], "x", [5, 4, "alarm", 1, None]], False),
    ((*S, "spans", 0, 0), INT, False),
    ((*S, "spans", 0, 1), INT, False),
    ((*S, "spans", 0, 2), ["excluded", "x", 1, None], False),
    ((*S, "spans", 0, 3), COUNT, False),
    ((*S, "spans", 0, 4), NUMBER, False),
    ((*S, "accepted_through"), COUNT, True),
    ((*S, "accept_known"), COUNT, True),
]
# Records whose keys are all smocsd's: a key they do not know is named.
RECORDS = [(), ("last_cycle",), ("scoring",), E, S, M, (*M, "last_cycle"), (*M, "scoring")]


def dotted(path: tuple) -> str:
    name = ""
    for key in path:
        name += f"[{key}]" if isinstance(key, int) else f".{key}" if name else key
    return name


def at(data, path: tuple):
    for key in path:
        data = data[key]
    return data


def present(data, path: tuple) -> bool:
    for key in path:
        in_dict = isinstance(data, dict) and isinstance(key, str) and key in data
        in_list = isinstance(data, list) and isinstance(key, int) and key < len(data)
        if not (in_dict or in_list):
            return False
        data = data[key]
    return True


def test_a_valid_file_is_read_without_a_finding_and_written_back_as_it_was():
    state, findings = StateFile.parse(copy.deepcopy(VALID))
    assert findings.damaged == [] and findings.unknown == []
    assert state.to_json() == VALID


def test_a_next_check_in_local_time_is_read_and_written_in_utc(tmp_path, monkeypatch, caplog):
    """Releases up to 0.1.0 wrote `next_check` in local time, with microseconds and no
    offset: it is read as local time, without a finding, and written in the one format."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30
    time.tzset()
    try:
        path = tmp_path / "state.json"
        path.write_text(json.dumps({**VALID, "next_check": "2026-11-28T05:17:54.123456"}))
        state = State(tmp_path)
        assert state.read().next_check == "2026-11-27T23:47:54Z"
        state.update()
        assert json.loads(path.read_text())["next_check"] == "2026-11-27T23:47:54Z"
    finally:
        monkeypatch.undo()
        time.tzset()
    assert caplog.records == []
    offset = StateFile.parse({"next_check": "2026-11-28T05:17:54+01:00"})[0]
    assert offset.next_check == "2026-11-28T04:17:54Z"


def test_any_damage_is_named_by_its_field_and_parsing_never_raises():
    """Seeded fuzzing over the schema: a wrong type, a missing field, a huge or non-finite
    number; optional keys left out and unknown keys added around it."""
    rng = random.Random(18)
    for case in range(3000):
        data = copy.deepcopy(VALID)
        for path, _, optional in rng.sample(FIELDS, rng.randint(0, 4)):
            if optional and present(data, path):
                del at(data, path[:-1])[path[-1]]
        extras = [r for r in rng.sample(RECORDS, rng.randint(0, 3)) if present(data, r)]
        for record in extras:
            at(data, record)["zz_unknown"] = rng.choice([1, "x", None, {"a": []}])
        path, bad, optional = rng.choice([f for f in FIELDS if present(data, f[0])])
        name = dotted(path)
        if not optional and rng.random() < 0.2 and not isinstance(path[-1], int):
            del at(data, path[:-1])[path[-1]]
        else:
            at(data, path[:-1])[path[-1]] = rng.choice(bad)
        state, findings = StateFile.parse(copy.deepcopy(data))
        # named by the field, or by the item of it that fails (a span's [first, last])
        assert len(findings.damaged) == 1, (case, name, findings.damaged)
        line = findings.damaged[0]
        assert line.startswith(name) and line[len(name)] in ":[", (case, name, line)
        for record in extras:
            if present(data, record) and isinstance(at(data, record), dict):
                assert dotted((*record, "zz_unknown")) in findings.unknown, (case, findings)
        repaired = json.loads(json.dumps(state.to_json(), allow_nan=False))
        again, clean = StateFile.parse(repaired)
        assert (again, clean.damaged, clean.unknown) == (state, [], []), case


def test_a_damaged_field_is_said_once_reset_and_saved_repaired(tmp_path, caplog):
    saved = copy.deepcopy(VALID)
    saved["scoring"]["event"]["peak_score"] = "x"
    saved["scoring"]["event"]["opened_at"] = 17
    saved["jobs"]["autoencoder"]["trained_at"] = 1e300
    (tmp_path / "state.json").write_text(json.dumps(saved))
    state = State(tmp_path)
    for _ in range(3):  # live scoring reads at every step until the next write repairs it
        read = state.read()
    assert read.scoring is not None and read.scoring.event is None
    assert read.scoring.last_order == 3040 and read.jobs["autoencoder"].last_order == 3000
    lines = [r.getMessage() for r in caplog.records if r.name == "smocsd.common.state"]
    path = tmp_path / "state.json"
    assert lines == [
        f'{path}: scoring.event.peak_score: expected a number, got "x"; scoring.event reset',
        f"{path}: jobs.autoencoder.trained_at: expected an epoch time in 1970..9999, got "
        "1e+300; reset",
        f"{path}: unknown keys ignored: scoring.event.opened_at",
    ]
    state.update(next_check="2026-11-28T06:00:00Z")
    written = json.loads(path.read_text())
    job = written["jobs"]["autoencoder"]
    assert written["scoring"]["event"] is None and "trained_at" not in job
    assert job["seen"] == VALID["jobs"]["autoencoder"]["seen"]  # the job's own key, kept
    assert StateFile.parse(written)[1].damaged == []
    caplog.clear()
    state.read()
    path.write_text(json.dumps(saved))  # damaged again after a repair: said again
    state.read()
    assert len([r for r in caplog.records if r.name == "smocsd.common.state"]) == 3


@pytest.fixture
def damaged(tmp_path):
    """A trained plant (v1) whose state.json then took every kind of damage that used to
    stop `smocsd run` at start or fail every cycle: (state dir, config path)."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    path = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "1h"},
        scoring={"enabled": True, "close_after": 5},
    )
    smocsd("train-once", config=path, check=True)
    saved = json.loads((state / "state.json").read_text())
    job = saved["jobs"]["autoencoder"]
    job["last_order"] = "3000"  # a string where a number belongs
    job["trained_at"] = 1e300  # beyond what time.gmtime takes
    saved["last_cycle"] = []
    saved["next_check"] = 5
    event = {**VALID["scoring"]["event"], "version": 1, "opened_at": "x"}  # a newer key
    event["start"] = {"order": 2991, "time": None}
    event["last"] = {"order": 3000, "time": None}
    event["errors"] = {"temperature": 1.0, "vibration": 3.0, "current": 0.5}
    saved["scoring"] = {"last_order": "x", "version": 1, "recent": [True, None], "event": event}
    (state / "state.json").write_text(json.dumps(saved))
    return state, path


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_daemon_trains_scores_and_delivers_on_a_damaged_state_file(
    damaged, tmp_path, mosquitto
):
    state, path = damaged
    path.write_text(
        path.read_text().replace("order = []", 'order = ["mqtt"]')
        + f"\n[publish.mqtt]\nport = {mosquitto.port}\n"
    )

    def scoring() -> dict:
        saved = json.loads((state / "state.json").read_text())
        return saved.get("models", {}).get("autoencoder", {}).get("scoring") or {}

    with mosquitto.subscriber("smocsd/gw-test/#") as sub:
        daemon = Running(path, tmp_path / "log")
        try:
            daemon.wait_for(" v2: ")  # the gate started over: trained at the first check
            _wait_for(lambda: scoring().get("last_order") == 3000, "scoring never started")
            insert(state / "readings.db", 30)  # quiet windows: the saved event closes
            got = sub.messages(
                until=lambda m: (
                    any(p.get("state") == "closed" for _, p in m)
                    and any(p.get("version") == 2 and "outcome" in p for _, p in m)
                )
            )
            assert daemon.stop() == 0
        finally:
            daemon.close()
    (closed,) = [p for _, p in got if p.get("state") == "closed"]
    assert closed["event_id"] == EVENT_ID and closed["start"]["order"] == 2991
    log = daemon.text()
    for field, problem in [
        ("jobs.autoencoder.last_order", 'expected an integer, got "3000"; reset'),
        ("jobs.autoencoder.trained_at", "expected an epoch time in 1970..9999"),
        ("last_cycle", "expected an object, got []"),
        ("next_check", "expected a string, got 5; reset"),
        ("scoring.last_order", 'expected an integer, got "x"; reset'),
        ("scoring.recent", "expected a list of booleans"),
        ("unknown keys ignored", "scoring.event.opened_at"),
    ]:
        assert log.count(f"state.json: {field}: {problem}") == 1, (field, log)
    written = json.loads((state / "state.json").read_text())
    state_file, findings = StateFile.parse(written)
    assert findings.damaged == findings.unknown == []
    job = state_file.jobs["autoencoder"]
    assert job.last_order == 3000 and job.trained_at is not None and job.trained_at <= time.time()
    status = json.loads(smocsd("status", "--json", config=path, check=True).stdout)
    assert status["last_cycle"]["version"] == 2 and status["scoring"]["open_alarm"] is None


def test_status_and_accept_read_a_damaged_state_file(damaged):
    """The reading commands name the damage and go on; `accept` finds the saved event."""
    _, path = damaged
    proc = smocsd("status", "--json", config=path, check=True)
    status = json.loads(proc.stdout)
    assert status["scoring"]["last_order"] is None
    assert status["scoring"]["open_alarm"]["event_id"] == EVENT_ID
    assert "state.json: jobs.autoencoder.last_order: expected an integer" in proc.stderr
    proc = smocsd("accept", config=path, check=True)
    assert "added #1 accept 2991..3000" in proc.stdout, proc.stdout


def test_each_model_has_its_own_records_and_the_old_single_model_position_is_kept(tmp_path):
    """A state.json of a release before [models]: its top-level `scoring` is the position of
    the model named like the top-level model.name, until that model saves its own."""
    state = State(tmp_path)
    old = {k: v for k, v in VALID.items() if k != "models"}
    (tmp_path / "state.json").write_text(json.dumps(old))
    read = state.read()
    assert read.scoring_of("autoencoder", "autoencoder").last_order == 3040
    assert read.scoring_of("other", "autoencoder") is None
    assert read.last_cycle_of("autoencoder", "autoencoder").outcome == "failed"
    assert read.last_cycle_of("autoencoder@P-1", "autoencoder") is None

    position = ScoringPosition(last_order=3100, version=3, recent=[], event=None, at="x")
    state.update(model="autoencoder", scoring=position)
    cycle = CycleRecord(at="2026-11-28T05:00:00Z", outcome="skipped", reason="wait")
    state.update(skipped={"autoencoder@P-1": cycle, "autoencoder@P-2": cycle})
    read = state.read()
    assert read.scoring_of("autoencoder", "autoencoder").last_order == 3100
    assert read.scoring_of("autoencoder", "autoencoder") == read.models["autoencoder"].scoring
    assert read.last_cycle_of("autoencoder@P-2", "autoencoder").reason == "wait"
    assert read.last_cycle == cycle  # the last cycle of any model
    assert read.jobs["autoencoder"].last_order == 3000  # the rest as it was


def test_a_models_record_needs_its_model_name(tmp_path):
    with pytest.raises(ValueError):
        State(tmp_path).update(job={"last_order": 1})
