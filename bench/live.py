"""Live scoring's speed: windows scored per second on one core, the time from a row's
insert to its alarm event in the outbox, and the daemon's idle memory with scoring on.

    .venv/bin/python bench/live.py [--rows 200000] [--events 5]

Trains a model on the demo readings (the default config's network), then:
1. scores --rows rows with live scoring's own code (smocsd.app.live.decide), one thread;
2. runs `smocsd run` with scoring on (default poll_interval) and publishing off, inserts
   an anomaly --events times, and times each insert until its "open" message is in the
   outbox;
3. reads the daemon's RSS after that.
Prints one markdown table (the README's, under "Live scoring").
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smocsd.app.live import decide
from smocsd.common import config
from smocsd.data import demo
from smocsd.data.sources import open_source
from smocsd.delivery.outbox import Outbox
from smocsd.scoring import LookBack, Model
from smocsd.store import ModelStore


def smocsd(*args: str, config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smocsd", *args, "--config", str(config_path)],
        check=True,
        capture_output=True,
        text=True,
    )


def alarms(state: Path) -> int:
    outbox = Outbox.open_readonly(state / "outbox.db")
    try:
        return sum(m.get("state") == "open" for m in outbox.pending())
    finally:
        outbox.close()


def insert(db: Path, rows: int, vibration: float) -> None:
    """`rows` rows repeating the newest ones, vibration scaled by `vibration`."""
    with sqlite3.connect(db) as conn:
        (ts,) = conn.execute("SELECT max(ts) FROM readings").fetchone()
        recent = conn.execute(
            "SELECT temperature, vibration, current FROM readings WHERE label = 0 "
            "ORDER BY rowid DESC LIMIT ?",
            (rows,),
        ).fetchall()[::-1]
        conn.executemany(
            "INSERT INTO readings (ts, temperature, vibration, current, label) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (ts + i + 1, t, v * vibration, c, int(vibration != 1))
                for i, (t, v, c) in enumerate(recent)
            ],
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        db = state / "readings.db"
        demo.write(db, max(args.rows, 30_000))
        path = Path(tmp) / "smocsd.toml"
        path.write_text(
            f'[daemon]\nstate_dir = "{state}"\ncheck_interval = "1h"\n'
            "[training]\nmin_training_samples = 20000\nmax_rows = 30000\n"
            "[scoring]\nenabled = true\nclose_after = 3\n[publish]\norder = []\n"
        )
        smocsd("train-once", config_path=path)
        cfg = config.load(path)
        store = ModelStore.of(cfg)
        current = store.current()
        model = Model.of(store.path(current), store.metadata(current))
        source = open_source(cfg.source)
        readings = source.read_newest(args.rows)
        source.close()
        started = time.perf_counter()
        rows, _, _ = decide(model, readings, None, LookBack())
        per_second = len(rows) / (time.perf_counter() - started)

        env = {**os.environ, "SMOCSD_CONFIG": str(path)}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "smocsd", "run"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(3)  # the first tick, and scoring's start position
            latencies = []
            for event in range(args.events):
                insert(db, 50, 1.0)  # quiet: the previous event closes
                time.sleep(1.5)
                inserted = time.monotonic()
                insert(db, 5, 6.0)
                while alarms(state) <= event:
                    time.sleep(0.01)
                latencies.append(time.monotonic() - inserted)
            status = Path(f"/proc/{daemon.pid}/status").read_text()
            rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
        finally:
            daemon.terminate()
            daemon.wait(30)
        print(f"{len(rows)} windows of {model.window_size} rows x {len(model.channels)} channels")
        print("| measure | value | goal |")
        print("|---|---|---|")
        print(f"| windows scored per second, one core | {per_second:,.0f} | ≥ 100,000 |")
        print(
            f"| insert → alarm event in the outbox (median of {args.events}, max) | "
            f"{statistics.median(latencies):.2f} s, {max(latencies):.2f} s | ≤ 1 s |"
        )
        print(f"| daemon RSS with scoring on | {rss:.0f} MB | ≤ 80 MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
