"""`smocsd run`: survives failing cycles, stops on SIGTERM mid-training, reloads on SIGHUP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers import PUMPS, Running, pump_rows, smocsd, write_config

from smocsd.app.systemd import notify
from smocsd.data import demo


@pytest.fixture
def running():
    started: list[Running] = []

    def start(config: Path, log: Path, env: dict | None = None) -> Running:
        started.append(Running(config, log, env))
        return started[-1]

    yield start
    for r in started:
        r.close()


def test_a_failing_cycle_never_kills_the_daemon(tmp_path, running):
    state = tmp_path / "state"
    # debug: the same wait at a later tick is a DEBUG line
    daemon = {"check_interval": "0.3s", "log_level": "debug"}
    cfg = write_config(tmp_path / "c.toml", state, daemon=daemon)
    d = running(cfg, tmp_path / "log")
    d.wait_for("no such database file", count=2)  # not there yet: the daemon waits, idle
    sqlite3.connect(state / "readings.db").execute("CREATE TABLE other (x)").close()
    d.wait_for("failed: SourceError: ", count=2)  # there, but not what it needs: failed
    assert "no such table readings" in d.text()
    demo.write(state / "readings.db", 3000)  # ... and then it is
    d.wait_for("promoted v1")
    assert d.stop() == 0
    outcomes = [
        m["outcome"]
        for m in json.loads(smocsd("outbox", "list", "--json", config=cfg, check=True).stdout)
    ]
    assert outcomes.count("failed") >= 2 and outcomes[-1] == "promoted"
    assert "skipped" not in outcomes
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert status["current_version"] == 1 and status["outbox_depth"] == len(outcomes)


@pytest.fixture
def endless_training(tmp_path, running):
    """A daemon that trains (far longer than any test waits): (state dir, config, daemon).
    Its epochs are DEBUG lines: an INFO line each would be most of a gateway's journal."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"log_level": "debug"},
        training={"epochs": 10000, "patience": 10000, "batch_size": 8},
    )
    return state, cfg, running(cfg, tmp_path / "log")


def test_sigterm_mid_training_exits_cleanly_and_promotes_nothing(endless_training):
    state, cfg, d = endless_training
    d.wait_for("epoch 2/30000")  # 10000 for each of the three networks
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 5
    assert "stopped mid-cycle; nothing partial was promoted" in d.text()
    models = state / "models" / "autoencoder"
    assert sorted(p.name for p in models.iterdir()) == [".last_version", ".lock"]
    assert json.loads(smocsd("outbox", "list", "--json", config=cfg).stdout) == []


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(tmp_path, running):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    # debug: a wait like the last one logged is a DEBUG line, and the test counts ticks
    daemon = {"check_interval": "0.5s", "log_level": "debug"}
    cfg = write_config(tmp_path / "c.toml", state, daemon=daemon)
    good = cfg.read_text()
    d = running(cfg, tmp_path / "log")
    d.wait_for("promoted v1")
    cfg.write_text(good + "\n[bogus]\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("reload refused, keeping the running config")
    assert f"{cfg}: bogus: unknown section" in d.text()
    d.wait_for("skipped", count=2)  # still ticking on the old config
    cfg.write_text(good.replace("min_new_samples = 500", "min_new_samples = 7"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(f"configuration reloaded from {cfg}")
    d.wait_for("0 new rows of 7 needed")
    assert d.stop() == 0


def test_a_manual_train_once_leaves_the_running_cycle_alone(endless_training):
    state, cfg, d = endless_training
    d.wait_for("epoch 1/30000")
    staging = state / "models" / "autoencoder" / ".tmp-v000001"
    assert staging.is_dir()
    result = json.loads(smocsd("train-once", "--force", config=cfg, check=True).stdout)
    assert result == {"outcome": "skipped", "reason": "another training cycle is running"}
    assert staging.is_dir()  # the daemon's version in progress is not a crash leftover
    count = d.text().count("epoch")
    d.wait_for("epoch", count=count + 1)  # and it keeps training
    assert d.stop() == 0


def test_the_idle_status_says_how_many_results_wait(tmp_path, running):
    """systemctl status shows the STATUS= line: the results no broker took yet are in it."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    cfg = write_config(tmp_path / "c.toml", state, daemon={"check_interval": "1h"})
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(60)
        d = running(cfg, tmp_path / "log", env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        while not (status := sock.recv(4096).decode()).startswith("STATUS=idle"):
            pass
    assert d.stop() == 0
    assert re.match(r"STATUS=idle: next check \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, ", status)
    assert "promoted v1" in status
    assert status.endswith(", 1 result(s) in outbox"), status


def test_a_silent_kafka_broker_never_starves_the_watchdog(tmp_path, running):
    """A broker that accepts connections and never answers holds a delivery attempt for
    publish.kafka.timeout, which may be 15 minutes while the unit's WatchdogSec is 2: the
    daemon pings the watchdog all through the attempt, and a stop ends it."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    notify = tmp_path / "notify"
    with socket.socket() as silent, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(120)
        sock.bind(str(notify))
        cfg = write_config(
            tmp_path / "c.toml",
            state,
            daemon={"check_interval": "1h"},
            publish={"order": ["kafka"]},
            **{
                "publish.kafka": {
                    "bootstrap_servers": f"127.0.0.1:{silent.getsockname()[1]}",
                    "timeout": "15m",
                }
            },
        )
        # A ping every second (WATCHDOG_USEC / 2), as under WatchdogSec=2s.
        env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
        d = running(cfg, tmp_path / "log", env=env)
        conn, _ = silent.accept()  # v1 is trained and its delivery attempt has begun
        with conn:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # what was sent before the attempt
                    sock.recv(4096)
            sock.settimeout(60)
            pings = 0
            while pings < 3:
                pings += sock.recv(4096) == b"WATCHDOG=1"
            assert "delivered" not in d.text()  # still in the attempt
            assert d.stop(timeout=30) == 0
    waiting = json.loads(smocsd("outbox", "list", "--json", config=cfg, check=True).stdout)
    assert [(m["outcome"], m["version"]) for m in waiting] == [("promoted", 1)]


def test_sd_notify_never_waits_for_a_receiver_that_does_not_read(tmp_path, monkeypatch):
    """A full notify socket (10 datagrams queued, net.unix.max_dgram_qlen's default) loses
    the status lines beyond it; the daemon does not stop at them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        sent: list[bool] = []
        sender = threading.Thread(
            target=lambda: sent.extend(notify(f"STATUS={i}") for i in range(100)), daemon=True
        )
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "notify() waited for the receiver"
        assert sent[0] and not sent[-1]
        receiver.setblocking(False)
        assert receiver.recv(100) == b"STATUS=0"


def test_five_pumps_in_one_table_five_models_and_alarms_for_the_faulty_one_only(tmp_path, running):
    state = tmp_path / "state"
    state.mkdir()
    db = state / "readings.db"
    pump_rows(db, 0, 8000, regimes=False)  # a day each: shorter, a threshold rests on hours
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "0.5s"},
        source={"order_column": "id", "partition_column": "asset"},
        training={
            "min_training_samples": 7000,
            "max_rows": 8000,
            "min_new_samples": 100000,
            "epochs": 50,  # the defaults' network and training, not the tests' fast one
            "hidden": [32],
            "batch_size": 32,
        },
        scoring={"enabled": True, "poll_interval": "0.2s"},
    )
    d = running(cfg, tmp_path / "log")
    for pump in PUMPS:
        d.wait_for(f"autoencoder@{pump}: promoted v1", timeout=180)
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert [(m["name"], m["partition"], m["current_version"]) for m in status["models"]] == [
        (f"autoencoder@{pump}", pump, 1) for pump in PUMPS
    ]
    time.sleep(1)  # every model's scoring has started at the newest row
    # 80 rows: no healthy pump changes its operating point in them (P-1 steps to a load at
    # row 8100 whose mix its model scores just above its threshold: issue 17's ground).
    pump_rows(db, 8000, 80, "P-3", (20, 80), regimes=False)
    deadline = time.monotonic() + 60
    while True:
        alarms = [
            m
            for m in json.loads(smocsd("outbox", "list", "--json", config=cfg, check=True).stdout)
            if m.get("schema", "").startswith("smocsd.alarm")
        ]
        if any(m["model"] == "autoencoder@P-3" for m in alarms) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert d.stop() == 0
    assert {m["model"] for m in alarms} == {"autoencoder@P-3"}, alarms
    assert sorted(p.name for p in (state / "models").iterdir()) == [
        f"autoencoder@{pump}" for pump in PUMPS
    ]


@pytest.mark.parametrize("processes", [1, 2])
def test_training_processes_bounds_the_models_training_at_once(tmp_path, running, processes):
    """Two models due at once: one training process at a time by default, both at once with
    daemon.training_processes = 2 (each paused in its save until the test resumes it)."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    paused.mkdir()
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "0.5s", "training_processes": processes},
        training={"job": "pausingjob:PausingJob"},
        job={"paused": str(paused), "resume": str(resume)},
    )
    cfg.write_text(cfg.read_text() + "[models.a]\n[models.b]\n")
    d = running(cfg, tmp_path / "log")
    deadline = time.monotonic() + 60
    while len(list(paused.iterdir())) < processes:  # both at once, if both may train
        assert time.monotonic() < deadline, d.text()
        time.sleep(0.05)
    if processes == 1:
        time.sleep(3)  # a second training process, if one started, has reached its save
        assert len(list(paused.iterdir())) == 1
    resume.touch()
    d.wait_for("a: promoted v1")
    d.wait_for("b: promoted v1")
    assert d.stop() == 0


def test_an_ingest_that_connects_per_insert_to_a_wal_database_is_seen_by_every_model(
    tmp_path, running
):
    """Closing any descriptor of a file drops all the process's POSIX locks on it, SQLite's
    WAL readers' included: a source closed beside others (a partition's first read) let
    the ingest's close delete the -wal and -shm under the open ones, which then never saw
    a new row. Each insert here is a connection of its own, closed, as many ingests do."""
    state = tmp_path / "state"
    state.mkdir()
    db = state / "readings.db"
    pump_rows(db, 0, 2500, regimes=False)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "0.5s", "log_level": "debug"},  # each wait, at every tick
        source={"order_column": "id", "partition_column": "asset"},
        training={"min_new_samples": 100000},
        scoring={"enabled": True, "poll_interval": "0.2s"},
    )
    d = running(cfg, tmp_path / "log")
    for pump in PUMPS:
        d.wait_for(f"autoencoder@{pump}: scoring with v1")
    time.sleep(1)  # each partition's first rows read: its passing source closed
    for _ in range(8):
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.executemany(
                "INSERT INTO readings (ts, asset, temperature, vibration, current) "
                "VALUES (0, ?, 50, 1, 15)",
                [(pump,) for pump in PUMPS],
            )
        time.sleep(0.3)
    d.wait_for("autoencoder@P-1: skipped: 8 new rows", timeout=30)
    assert d.stop() == 0
