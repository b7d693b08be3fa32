"""The faults of docs/RELIABILITY.md that meet the cycle, the model store and the daemon.

Each test provokes one fault class the way it happens on a gateway (a crashing or hung
training process, a crash between save and enqueue, a damaged model file, a clock set
back, a recreated database, a full disk) and checks what smocsd does about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import faults
import numpy as np
import onnx
import pytest
from helpers import Running, insert, smocsd, write_config
from onnx import numpy_helper

from smocsd.app.live import LiveScorer
from smocsd.common.config import load
from smocsd.data import demo
from smocsd.delivery.outbox import Outbox
from smocsd.scoring import BEYOND_SCORE

MODELS = Path("models/autoencoder")


def strict_json(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity are refused."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def train_once(config: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = smocsd("train-once", *args, config=config)
    return proc, strict_json(proc.stdout)


def waiting(config: Path) -> list[dict]:
    return strict_json(smocsd("outbox", "list", "--json", config=config, check=True).stdout)


def user_job(tmp_path: Path, state: Path, sections: dict | None = None, **options) -> Path:
    """tests/userjob.py's RecordingJob, told by `options` how to misbehave."""
    return write_config(
        tmp_path / "user.toml",
        state,
        sections,
        training={"job": "userjob:RecordingJob", **(sections or {}).get("training", {})},
        job={"log": str(tmp_path / "hooks.jsonl"), **options},
    )


# --- the training child process


@pytest.mark.parametrize(
    "fail, cause",
    [
        ("SIGSEGV", "training process was killed by SIGSEGV"),
        ("SIGKILL", "training process was killed by SIGKILL (out of memory?"),
        ("exit", "training process exited with status 3"),
    ],
)
def test_a_crashing_training_process_is_a_failed_result(tmp_path, plant, fail, cause):
    state, _ = plant
    config = user_job(tmp_path, state, fail=fail)
    proc, result = train_once(config)
    assert proc.returncode == 1
    assert result["outcome"] == "failed" and result["error"].startswith(cause), result
    assert [m["outcome"] for m in waiting(config)] == ["failed"]


def test_a_hung_training_process_is_killed_at_the_stall_timeout(tmp_path, plant):
    state, _ = plant
    config = user_job(tmp_path, state, {"training": {"stall_timeout": "2s"}}, fail="hang")
    proc, result = train_once(config)
    assert proc.returncode == 1
    assert result["error"] == "training made no progress for 2s (training.stall_timeout): killed"


def test_the_daemon_outlives_training_processes_that_die(tmp_path, plant):
    state, _ = plant
    config = user_job(tmp_path, state, {"daemon": {"check_interval": "0.2s"}}, fail="SIGKILL")
    daemon = Running(config, tmp_path / "log")
    try:
        daemon.wait_for("killed by SIGKILL", count=3)
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert len(waiting(config)) >= 3


def test_non_finite_metrics_are_published_as_valid_json(tmp_path, plant):
    state, _ = plant
    config = user_job(tmp_path, state, fail="nan")
    proc, result = train_once(config)
    assert proc.returncode == 0
    assert result["metrics"] == {"n": 3000, "loss": None, "peak": None}
    assert waiting(config) == [result]


@pytest.mark.parametrize("typed", [False, True])
def test_a_user_jobs_outcome_is_checked(tmp_path, plant, typed):
    """save_model's return, a dict (the contract's first form) or a Saved, checked alike."""
    state, _ = plant
    proc, result = train_once(user_job(tmp_path, state, outcome="great", typed=typed))
    assert proc.returncode == 1
    assert result["error"] == (
        "HookError: save_model() returned outcome 'great': 'promoted' or 'rejected'"
    )
    proc, result = train_once(user_job(tmp_path, state, outcome="rejected", typed=typed))
    assert proc.returncode == 0
    assert (result["outcome"], result["version"]) == ("rejected", 7)
    assert result["model_meta"] == {"kind": "recording"}


# --- the model store is the truth


CRASH_BEFORE_ENQUEUE = """
import os, sys
from smocsd.delivery.outbox import Outbox
from smocsd.app.cli import main
def put(self, message):
    if message.get("version") is not None:
        os._exit(137)  # the power fails after the save, before the result is queued
Outbox.put = put
sys.exit(main())
"""


def test_a_result_lost_between_save_and_enqueue_is_recovered_from_the_store(plant):
    state, config = plant
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_BEFORE_ENQUEUE, "train-once", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 137, proc.stderr
    meta = json.loads((state / MODELS / "v000001/metadata.json").read_text())
    assert waiting(config) == []
    proc, _ = train_once(config)  # the next cycle, whatever it does, first reconciles
    assert "v1 had no result in the outbox" in proc.stderr
    recovered = waiting(config)[0]
    assert recovered["message_id"] == meta["result_id"] and recovered["recovered"] is True
    assert (recovered["version"], recovered["outcome"]) == (1, meta["outcome"])
    assert recovered["metrics"] == meta["metrics"] and recovered["model_meta"] == meta
    train_once(config)
    assert [m["version"] for m in waiting(config)].count(1) == 1  # enqueued once only


# --- damaged models


def _rehash(version_dir: Path, name: str) -> None:
    """Makes metadata.json agree with the file as it is now: only a content check can tell."""
    meta_path = version_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    data = (version_dir / name).read_bytes()
    meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    meta_path.write_text(json.dumps(meta))


def truncated(version_dir: Path) -> None:
    path = version_dir / "model.onnx"
    path.write_bytes(path.read_bytes()[:100])


def nan_weights(version_dir: Path) -> None:
    path = version_dir / "model.onnx"
    model = onnx.load(path)
    first = model.graph.initializer[0]
    weights = numpy_helper.to_array(first).copy()
    weights.flat[0] = np.nan
    first.CopyFrom(numpy_helper.from_array(weights, first.name))
    onnx.save(model, path)
    _rehash(version_dir, "model.onnx")


def garbage_metadata(version_dir: Path) -> None:
    (version_dir / "metadata.json").write_text('{"format": "smocsd.mod')


@pytest.mark.parametrize("damage", [truncated, nan_weights, garbage_metadata])
def test_a_damaged_current_model_is_reported_and_never_blocks_training(plant, damage):
    state, config = plant
    assert train_once(config)[1]["outcome"] == "promoted"
    damage(state / MODELS / "v000001")

    status = json.loads(smocsd("status", "--json", config=config, check=True).stdout)
    assert "v000001" in status["current_problem"]
    listed = json.loads(smocsd("models", "list", "--json", config=config, check=True).stdout)
    assert "v000001" in listed[0]["problem"]

    demo.write(state / "readings.db", 600)
    proc, result = train_once(config)
    assert (result["outcome"], result["version"]) == ("promoted", 2), result
    assert "v000001" in result["eval"]["champion_problem"]
    assert "current v1 is damaged" in proc.stderr
    assert result["metrics"]["warm_started"] is False

    refused = smocsd("models", "rollback", "1", config=config)
    assert refused.returncode == 1 and "damaged" in refused.stderr
    assert os.readlink(state / MODELS / "current") == "v000002"


# Loaded at start-up by every Python process of the test (sitecustomize), so it reaches
# the training child, which is a fresh interpreter.
DIVERGE = """
import numpy as np
import onnx
from onnx import numpy_helper
from smocsd.training.trainers.numpy import NumpyTrainer
fit = NumpyTrainer.fit
def diverging(self, spec, train, val, out_dir, *args, **kwargs):
    result = fit(self, spec, train, val, out_dir, *args, **kwargs)
    model = onnx.load(out_dir / "model.onnx")
    tensor = model.graph.initializer[-1]
    weights = numpy_helper.to_array(tensor).copy()
    weights.flat[:] = np.inf  # the weights blew up; the losses were still finite
    tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    onnx.save(model, out_dir / "model.onnx")
    return result
NumpyTrainer.fit = diverging
"""


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path, plant):
    state, config = plant
    config.write_text(config.read_text().replace("[training]", "[training]\nbackend = 'numpy'"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site/sitecustomize.py").write_text(DIVERGE)
    path = f"{tmp_path / 'site'}:{Path(__file__).parent}"
    proc = smocsd("train-once", config=config, env={"PYTHONPATH": path})
    result = strict_json(proc.stdout)
    assert proc.returncode == 1 and result["outcome"] == "failed", result
    # inf weights make NaN scores, so the threshold check fires before the weights check
    assert result["error"] == "DataError: training diverged: threshold nan; nothing saved"
    assert sorted(p.name for p in (state / MODELS).iterdir()) == [".last_version", ".lock"]


# --- data and time


def test_no_database_yet_is_an_idle_skip_not_a_failure(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "state")
    proc, result = train_once(config)
    assert proc.returncode == 0, proc.stderr
    assert result["outcome"] == "skipped" and "no such database file" in result["reason"]
    assert waiting(config) == []


def test_scattered_nulls_are_a_clear_skip(tmp_path):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000, dropouts=False, gaps=False)
    with sqlite3.connect(state / "readings.db") as db:
        db.execute("UPDATE readings SET vibration = NULL WHERE rowid % 6 = 0")
    config = write_config(tmp_path / "c.toml", state, training={"min_training_samples": 2000})
    proc, result = train_once(config)
    assert proc.returncode == 0, proc.stderr
    assert result["outcome"] == "skipped"
    assert "runs shorter than window_size (10)" in result["reason"]


def test_readings_beyond_what_a_model_can_take_are_dropped_like_nulls(tmp_path):
    """One 1e308 among the newest rows failed every cycle ("diverged") for as long as it
    was among the rows read; one in the training rows overflowed the normalization."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000, dropouts=False, gaps=False)
    with sqlite3.connect(state / "readings.db") as db:
        db.execute("UPDATE readings SET vibration = 1e308 WHERE rowid = 2990")  # validation
        db.execute("UPDATE readings SET current = -1e308 WHERE rowid = 1500")  # training
        # representable, but some 1e20 standard deviations off: a validation row
        db.execute("UPDATE readings SET vibration = 1e20 WHERE rowid = 2900")
    config = write_config(tmp_path / "c.toml", state)
    proc, result = train_once(config)
    assert result["outcome"] == "promoted", proc.stderr
    data = result["model_meta"]["data"]
    assert data["dropped_rows"] == 3
    assert data["windows"] == 2991 - 3 * 10  # no window holds any of them
    assert (
        "2 of 3000 rows have a reading beyond ±1e+30 in vibration, current (first at order "
        "value 1500) and are left out like missing values" in proc.stderr
    )
    assert "1 rows have a reading in vibration more than 1e+09 standard deviations" in proc.stderr
    strict_json((state / MODELS / "current/metadata.json").read_text())


def test_readings_beyond_what_a_model_can_take_are_alarms_in_strict_json(tmp_path):
    """Scored, a window holding such a reading was NaN or inf: not anomalous, and no JSON."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000, dropouts=False, gaps=False)
    config = write_config(tmp_path / "c.toml", state, scoring={"enabled": True})
    train_once(config)
    outbox = Outbox(state / "outbox.db")
    scorer = LiveScorer(load(config))
    scorer.step(outbox)  # scoring starts at the newest row
    first = insert(state / "readings.db", 80)
    beyond = {15: 1e308, 35: -1e308, 55: 1e15}  # 1e15: representable, far off the scale
    with sqlite3.connect(state / "readings.db") as db:
        for offset, value in [*beyond.items(), (70, None)]:
            db.execute("UPDATE readings SET vibration = ? WHERE rowid = ?", (value, first + offset))
    live, queued = scorer.step(outbox)
    scorer.close()
    outbox.close()
    out = smocsd("score", "--from", str(first), "--json", config=config, check=True).stdout
    scored = [strict_json(line) for line in out.splitlines()]
    assert scored == [row.to_json() for row in live]
    by_offset = {row["order"] - first: row for row in scored}
    assert sorted(by_offset) == list(range(70))  # none holds the NULL of the last 10 rows
    for offset in beyond:
        holding = [by_offset[end] for end in range(offset, offset + 10)]
        assert all(r["score"] == BEYOND_SCORE and r["over"] for r in holding)
        assert all(r["shares"]["vibration"] == 1.0 for r in holding)
        assert all(r["anomalous"] for r in holding[1:])  # the rule: 2 of the last 3
    assert queued >= 3  # an alarm opened at each
    alarms = [m for m in waiting(config) if m.get("schema") == "smocsd.alarm/1"]
    assert alarms[0]["peak_score"] == BEYOND_SCORE
    assert alarms[0]["channels"][0] == {"name": "vibration", "share": 1.0}
    status = strict_json(smocsd("status", "--json", config=config, check=True).stdout)
    assert status["scoring"]["open_alarm"]["peak_score"] == BEYOND_SCORE


def test_a_nan_in_a_file_read_is_null_in_every_json_printed(plant):
    """metadata.json edited by hand: Python's json reads NaN, and printed it back as NaN."""
    state, config = plant
    train_once(config)
    path = state / MODELS / "v000001/metadata.json"
    meta = json.loads(path.read_text())
    meta["eval"]["val_loss"] = float("nan")
    path.write_text(json.dumps(meta))
    shown = strict_json(smocsd("models", "show", "1", "--json", config=config, check=True).stdout)
    assert shown["eval"]["val_loss"] is None


def _job_state(state: Path) -> dict:
    return json.loads((state / "state.json").read_text())["jobs"]["autoencoder"]


def test_a_last_training_time_in_the_future_is_clamped(plant):
    state, config = plant
    train_once(config)
    saved = json.loads((state / "state.json").read_text())
    saved["jobs"]["autoencoder"]["trained_at"] = time.time() + 10 * 86400  # clock set back
    (state / "state.json").write_text(json.dumps(saved))
    demo.write(state / "readings.db", 600)
    proc, result = train_once(config)  # min_interval = 0: trains if the time is believed
    assert "is in the future (clock set back?)" in proc.stderr
    assert result["outcome"] in ("promoted", "rejected"), result
    assert _job_state(state)["trained_at"] <= time.time()


def test_a_recreated_database_restarts_gating(plant):
    state, config = plant
    train_once(config)
    assert _job_state(state)["last_order"] == 3000
    (state / "readings.db").unlink()
    demo.write(state / "readings.db", 2500)  # ids restart at 1
    proc, result = train_once(config)
    assert "went backwards (newest 2500, last trained on 3000)" in proc.stderr
    assert result["outcome"] in ("promoted", "rejected"), result
    assert _job_state(state)["last_order"] == 2500


# --- the daemon


def _backlog(state: Path, n: int) -> None:
    """`n` results waiting in the outbox, written as the outbox writes them (in one
    transaction: n separate durable puts would take minutes)."""
    from smocsd.delivery.outbox import Outbox

    Outbox(state / "outbox.db", n).close()
    message = {
        "schema": "smocsd.training-result/1",
        "device_id": "gw-test",
        "model": "autoencoder",
        "version": None,
        "outcome": "failed",
        "timestamp": "2026-11-26T05:00:00Z",
    }
    rows = [(f"id-{i}", json.dumps({**message, "message_id": f"id-{i}"})) for i in range(n)]
    with sqlite3.connect(state / "outbox.db") as db:
        db.executemany("INSERT INTO messages (message_id, body) VALUES (?, ?)", rows)


def _depth(state: Path) -> int:
    from smocsd.delivery.outbox import Outbox

    outbox = Outbox.open_readonly(state / "outbox.db")
    try:
        return len(outbox)
    finally:
        outbox.close()


def test_sigterm_stops_a_long_flush(tmp_path, mosquitto):
    state = tmp_path / "state"
    state.mkdir()
    _backlog(state, 30000)
    config = write_config(
        tmp_path / "c.toml",
        state,
        publish={"order": ["mqtt"], "outbox_max": 30000},
        mqtt={"port": mosquitto.port},
    )
    config.write_text(config.read_text().replace("[mqtt]", "[publish.mqtt]"))
    daemon = Running(config, tmp_path / "log")
    try:
        deadline = time.monotonic() + 60
        while _depth(state) > 29000:  # delivering, batch by batch
            assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.text()
            time.sleep(0.05)
        started = time.monotonic()
        assert daemon.stop(timeout=30) == 0
        stopped_in = time.monotonic() - started
    finally:
        daemon.close()
    assert stopped_in < 10, daemon.text()  # a batch, not the backlog (TimeoutStopSec=30s)
    assert _depth(state) > 0, "the whole backlog went out before the stop: make it larger"


def test_the_daemon_idles_in_little_memory_after_a_cycle(plant, tmp_path):
    """Training's memory leaves with its child. Live scoring (on by default) loads numpy
    and onnxruntime into the daemon, some 73 MB (bench/live.py): off here, so that the
    daemon's own part is what is measured."""
    _, config = plant
    config.write_text(
        config.read_text().replace(
            "[daemon]", "[scoring]\nenabled = false\n[daemon]\ncheck_interval = '1h'"
        )
    )
    daemon = Running(config, tmp_path / "log")
    try:
        daemon.wait_for("promoted v1")
        time.sleep(1)
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    finally:
        daemon.close()
    rss_kib = int(status.split("VmRSS:")[1].split()[0])
    assert rss_kib <= 45 * 1024, f"idle RSS {rss_kib} KiB"
    assert not [lib for lib in ("numpy", "onnxruntime") if lib in maps]


def test_the_scoring_daemon_loads_no_training_code(plant, tmp_path):
    """Live scoring loads onnxruntime into the daemon, but not the training build's
    training half (onnxruntime.training, onnx): the daemon never trains."""
    _, config = plant
    config.write_text(config.read_text().replace("[daemon]", "[daemon]\ncheck_interval = '1h'"))
    daemon = Running(config, tmp_path / "log")
    try:
        daemon.wait_for("scoring with v1")
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    finally:
        daemon.close()
    assert "onnxruntime_pybind11_state" in maps
    assert "onnx_cpp2py_export" not in maps


def _address_space(mib: int) -> None:
    """In the child before exec: RLIMIT_AS, which the job check's process inherits."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20))


def test_too_little_memory_at_start_is_a_runtime_failure_that_systemd_restarts(plant):
    """`smocsd run` in 64 MiB of address space: the daemon itself starts in about 30, the
    check of training.job cannot load numpy (110 MiB and more). Exit 1, restarted by the
    unit, not 78, after which systemd would leave the gateway without smocsd."""
    _, config = plant
    proc = subprocess.run(
        [sys.executable, "-m", "smocsd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: _address_space(64),
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"smocsd: {config}: training.job: "), proc.stderr
    assert "'autoencoder'" in last and "smocsd started" not in proc.stderr


def _leftovers(state: Path) -> list[str]:
    """Temp files and half-built versions anywhere in the state directory."""
    return [str(p.relative_to(state)) for p in state.rglob(".tmp-*")]


@pytest.fixture
def outside_db(tmp_path):
    """Demo readings outside the state directory, which the test may fill or lock."""
    db = tmp_path / "readings.db"
    demo.write(db, 3000)
    return db


def _daemon_config(tmp_path: Path, state: Path, db: Path, **daemon) -> Path:
    return write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "0.3s", **daemon},
        source={"path": str(db)},
        training={"min_new_samples": 100},
    )


def test_a_full_disk_never_kills_the_daemon_and_it_recovers(tmp_path, outside_db):
    with faults.tmpfs(tmp_path / "state", "16M") as state:
        config = _daemon_config(tmp_path, state, outside_db)
        daemon = Running(config, tmp_path / "log")
        try:
            daemon.wait_for("promoted v1")
            filler = faults.fill(state)
            demo.write(outside_db, 300)
            daemon.wait_for("No space left on device")
            daemon.wait_for("result not queued")  # the failed cycle's result waits in memory
            time.sleep(3)  # a few ticks, on a backoff
            assert os.readlink(state / MODELS / "current") == "v000001"
            assert _leftovers(state) == []
            faults.free(state)
            assert not filler.exists()
            daemon.wait_for("recovered from", timeout=60)
            daemon.wait_for(" v2: ", timeout=60)  # promoted or rejected
            assert daemon.stop() == 0
        finally:
            daemon.close()
        log = daemon.text()
        assert log.count("(retrying with a backoff)") <= 2  # logged once, not per tick
        outcomes = [(m["outcome"], m["version"]) for m in waiting(config)]
        assert ("failed", None) in outcomes or ("failed", 2) in outcomes, outcomes
        assert outcomes[-1][1] in (2, 3), outcomes
        assert _leftovers(state) == []


def test_a_read_only_state_dir_never_kills_the_daemon_and_it_recovers(tmp_path, outside_db):
    state = tmp_path / "state"
    config = _daemon_config(tmp_path, state, outside_db)
    daemon = Running(config, tmp_path / "log")
    try:
        daemon.wait_for("promoted v1")
        with faults.read_only(state):
            demo.write(outside_db, 300)
            daemon.wait_for("Read-only file system")
            time.sleep(3)
            assert daemon.proc.poll() is None
        daemon.wait_for("recovered from", timeout=60)
        daemon.wait_for(" v2: ", timeout=60)
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert daemon.text().count("(retrying with a backoff)") <= 2
    assert _leftovers(state) == []


@pytest.mark.parametrize("shift", [timedelta(days=-10), timedelta(days=10)], ids=["back", "ahead"])
def test_a_wall_clock_jump_neither_stalls_nor_storms_the_timer(tmp_path, outside_db, shift):
    state = tmp_path / "state"
    # Every tick's wait is a debug line: the test counts the ticks by them.
    config = _daemon_config(tmp_path, state, outside_db, check_interval="0.5s", log_level="debug")
    config.write_text(config.read_text().replace("min_interval = 0", "min_interval = '1h'"))
    train_once(config)  # on the real clock
    demo.write(outside_db, 300)
    log = tmp_path / "log"
    daemon = Running(config, log, env=faults.faketime_env(shift))
    try:
        if shift < timedelta(0):  # the last training is 10 days ahead of this clock
            daemon.wait_for("is in the future (clock set back?): counting from now")
            daemon.wait_for("min_interval is 3600s", count=4)
        else:  # 10 days since the last training: it is due
            daemon.wait_for(" v2: ")
            daemon.wait_for("skipped", count=4)
        started = time.monotonic()
        ticks = daemon.text().count("autoencoder: skipped")
        time.sleep(3)
        ticks = daemon.text().count("autoencoder: skipped") - ticks
        assert daemon.stop() == 0
    finally:
        daemon.close()
    elapsed = time.monotonic() - started
    assert 2 <= ticks <= elapsed / 0.45 + 1, (ticks, elapsed)  # every ~0.5 s: no stall, no storm
    assert daemon.text().count("is in the future") <= 1  # clamped and saved once
