"""One daemon watching many machines: first trainings, the daemon's memory and CPU, and
the time from an anomaly's insert to its alarm, per number of assets.

    .venv/bin/python bench/assets.py [--assets 1,10,50,200] [--window 30] [--epochs 50]
                                     [--alarm-assets 50]

For each asset count, with one row per second per asset:
1. builds a state directory whose readings table holds every asset's history
   (MIN_TRAINING rows, backdated 1 s apart, normal only), indexed on (asset, id);
2. starts `smocsd run` (source.partition_column = "asset", scoring on, publishing off)
   and an inserter thread appending one normal row per asset per second, and times
   until every asset's first model is `current` (the longest any asset waited);
3. reads the daemon process's RSS (VmRSS) and CPU (utime + stime, % of one core; its
   training children not counted) over --window seconds, idle (inserter paused, every
   model trained) and while scoring (inserter running);
4. inserts a burst of anomalous rows (vibration x8) into each of --alarm-assets assets
   (all when fewer), one asset at a time, and times each insert until its model's "open"
   message is in the outbox;
5. counts the "open" messages no burst explains: false alarms, of other assets.
Prints one markdown table, a row per asset count, and a line of machine and settings.

The readings follow the demo's process (smocsd/data/demo.py) at a steady load: each
asset has its own load, offset and noise stream, and a 10-minute vibration oscillation
on the wall clock, so the live rows continue the history without a seam.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smocsd.common import config
from smocsd.data import demo
from smocsd.delivery.outbox import Outbox

MIN_TRAINING = 600  # rows of each asset's history: training.min_training_samples
MIN_NEW = 1_000_000_000  # training.min_new_samples: no retraining during the benchmark
ANOMALY = 8.0  # vibration factor of a burst's rows
TRAIN_TIMEOUT = 120.0  # seconds allowed per asset for the first trainings, plus one round
ALARM_TIMEOUT = 60.0  # seconds allowed from a burst's insert to its alarm
POLL = 0.01  # seconds between looks at the outbox and the models


@dataclass
class Asset:
    """One machine: a steady load and its own noise stream (demo.py's channels)."""

    name: str
    load: float
    offset: float  # temperature offset of this machine
    rng: np.random.Generator

    @classmethod
    def of(cls, index: int) -> Asset:
        rng = np.random.default_rng(index)
        return cls(f"m{index:03d}", rng.uniform(0.3, 0.9), rng.uniform(-3.0, 3.0), rng)

    def rows(self, ts: np.ndarray, vibration: float = 1.0) -> list[tuple]:
        """(ts, asset, temperature, vibration, current) at times `ts`, vibration scaled."""
        noise = self.rng.standard_normal((len(ts), 3)) * demo.NOISE
        spin = np.sin(2 * np.pi * (ts % 600.0) / 600.0)
        temperature = 45 + self.offset + 12 * self.load + noise[:, 0]
        vib = (0.4 + 1.2 * self.load + 0.15 * spin + noise[:, 1]) * vibration
        current = 8 + 14 * self.load + noise[:, 2]
        return [
            (float(t), self.name, float(a), float(b), float(c))
            for t, a, b, c in zip(ts, temperature, vib, current, strict=True)
        ]


INSERT = "INSERT INTO readings (ts, asset, temperature, vibration, current) VALUES (?,?,?,?,?)"


def build(db: Path, assets: list[Asset]) -> None:
    """The readings table with every asset's history, its newest row a second ago."""
    db.parent.mkdir(parents=True)
    ts = time.time() - MIN_TRAINING + np.arange(MIN_TRAINING, dtype=float)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, ts REAL, asset TEXT, "
            "temperature REAL, vibration REAL, current REAL)"
        )
        conn.execute("CREATE INDEX readings_asset ON readings (asset, id)")
        with conn:
            for asset in assets:
                conn.executemany(INSERT, asset.rows(ts))


def write_config(path: Path, state: Path, epochs: int) -> config.Config:
    path.write_text(
        f'[daemon]\nstate_dir = "{state}"\ndevice_id = "bench"\n'
        '[source]\norder_column = "id"\npartition_column = "asset"\n'
        f"[training]\nmin_training_samples = {MIN_TRAINING}\nmin_new_samples = {MIN_NEW}\n"
        f"epochs = {epochs}\n"
        "[scoring]\nenabled = true\n[publish]\norder = []\n"
    )
    return config.load(path)


class Inserter(threading.Thread):
    """One normal row per asset per second while `running` is set; `burst` inserts
    anomalous rows between two seconds' rows."""

    def __init__(self, db: Path, assets: list[Asset]) -> None:
        super().__init__(daemon=True)
        self.assets = assets
        # One connection throughout, as an ingest service keeps it; used under `lock`.
        self.conn = sqlite3.connect(db, timeout=30, check_same_thread=False)
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # the connection, the noise streams, the rows' order

    def _insert(self, rows: list[tuple]) -> None:
        with self.conn:
            self.conn.executemany(INSERT, rows)

    def run(self) -> None:
        tick = time.monotonic()
        while not self.stopped.is_set():
            if self.running.is_set():
                with self.lock:
                    now = np.array([time.time()])
                    self._insert([row for a in self.assets for row in a.rows(now)])
            tick += 1.0
            self.stopped.wait(max(0.0, tick - time.monotonic()))

    def burst(self, asset: Asset, rows: int) -> float:
        """`rows` anomalous rows of `asset`; returns the monotonic time of their commit."""
        with self.lock:
            self._insert(asset.rows(time.time() + 1e-3 * np.arange(rows), ANOMALY))
            return time.monotonic()

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.conn.close()


@dataclass
class Daemon:
    """`smocsd run` with its stderr in a file."""

    config_path: Path
    log: Path
    proc: subprocess.Popen = field(init=False)

    def __post_init__(self) -> None:
        with self.log.open("w") as stderr:  # the child writes to its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smocsd", "run", "--config", str(self.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def check(self) -> None:
        """Raises, with the log's end, if the daemon has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:])

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process itself (not its waited-for children)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(done: Callable[[], bool], daemon: Daemon, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        daemon.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s:\n{daemon.tail()}")
        time.sleep(POLL)


def first_models(state: Path, assets: list[Asset], daemon: Daemon, started: float) -> list[float]:
    """Seconds from `started` until each asset's first model is current."""
    times: dict[str, float] = {}

    def all_trained() -> bool:
        for asset in assets:
            current = state / "models" / f"autoencoder@{asset.name}" / "current"
            if asset.name not in times and current.exists():
                times[asset.name] = time.monotonic() - started
        return len(times) == len(assets)

    timeout = TRAIN_TIMEOUT * (len(assets) + 1)
    wait_until(all_trained, daemon, timeout, "first model for every asset")
    return list(times.values())


def usage(daemon: Daemon, window: float) -> tuple[float, float]:
    """The daemon's RSS at the end of `window` seconds (MiB) and its CPU over them (%)."""
    cpu, started = daemon.cpu_seconds(), time.monotonic()
    time.sleep(window)
    daemon.check()
    percent = 100 * (daemon.cpu_seconds() - cpu) / (time.monotonic() - started)
    return daemon.rss_mib(), percent


def opened(outbox_path: Path) -> Counter[str]:
    """The "open" alarm messages in the outbox, per model."""
    outbox = Outbox.open_readonly(outbox_path)
    try:
        return Counter(m["model"] for m in outbox.pending() if m.get("state") == "open")
    finally:
        outbox.close()


def sample(assets: list[Asset], count: int) -> list[Asset]:
    """`count` assets spread evenly over the list (all when fewer)."""
    if count >= len(assets):
        return assets
    return [assets[i * len(assets) // count] for i in range(count)]


def latencies(
    inserter: Inserter, assets: list[Asset], rows: int, outbox: Path, daemon: Daemon
) -> list[float]:
    """Seconds from each asset's burst to its model's new "open" message."""
    result = []
    for asset in assets:
        model = f"autoencoder@{asset.name}"
        before = opened(outbox)[model]
        inserted = inserter.burst(asset, rows)
        wait_until(lambda m=model, b=before: opened(outbox)[m] > b, daemon, ALARM_TIMEOUT, model)
        result.append(time.monotonic() - inserted)
    return result


@dataclass
class Row:
    assets: int
    first_all: float
    longest_wait: float
    idle: tuple[float, float]
    scoring: tuple[float, float]
    latency: list[float]
    false_alarms: int
    took: float

    def markdown(self) -> str:
        return (
            f"| {self.assets} | {self.first_all:.1f} | {self.longest_wait:.1f} "
            f"| {self.idle[0]:.0f} | {self.idle[1]:.1f} "
            f"| {self.scoring[0]:.0f} | {self.scoring[1]:.1f} "
            f"| {statistics.median(self.latency):.2f} / {max(self.latency):.2f} "
            f"(n = {len(self.latency)}) "
            f"| {self.false_alarms} |"
        )


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench(count: int, args: argparse.Namespace) -> Row:
    began = time.monotonic()
    assets = [Asset.of(i) for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        db = state / "readings.db"
        build(db, assets)
        cfg = write_config(Path(tmp) / "smocsd.toml", state, args.epochs)
        inserter = Inserter(db, assets)
        inserter.running.set()
        inserter.start()
        daemon = Daemon(Path(tmp) / "smocsd.toml", Path(tmp) / "daemon.log")
        started = time.monotonic()
        try:
            waits = first_models(state, assets, daemon, started)
            first_all = time.monotonic() - started
            progress(f"{count} assets: every first model after {first_all:.1f} s")
            inserter.running.clear()
            time.sleep(2)  # the last rows scored
            idle = usage(daemon, args.window)
            inserter.running.set()
            time.sleep(2)
            scoring = usage(daemon, args.window)
            burst = sample(assets, args.alarm_assets)
            progress(f"{count} assets: bursts of {cfg.model.alarm_of} rows in {len(burst)}")
            latency = latencies(inserter, burst, cfg.model.alarm_of, state / "outbox.db", daemon)
            time.sleep(2)  # an alarm a burst set off elsewhere
            false_alarms = sum(opened(state / "outbox.db").values()) - len(burst)
        finally:
            inserter.stop()
            daemon.stop()
    took = time.monotonic() - began
    print(
        f"{count} assets: insert→alarm over {len(burst)} of them: min {min(latency):.2f} s, "
        f"median {statistics.median(latency):.2f} s, max {max(latency):.2f} s; "
        f"{took:.0f} s in all",
        flush=True,
    )
    return Row(count, first_all, max(waits), idle, scoring, latency, false_alarms, took)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="1,10,50,200", help="asset counts, comma-separated")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per CPU reading")
    parser.add_argument("--epochs", type=int, default=50, help="training.epochs")
    parser.add_argument(
        "--alarm-assets", type=int, default=50, help="assets given a burst (at most)"
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C: the daemon is stopped and the directories removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = [bench(int(n), args) for n in args.assets.split(",")]
    print(
        "| assets | first model for all (s) | longest wait for training (s) "
        "| RSS idle (MiB) | CPU idle (% core) | RSS scoring (MiB) | CPU scoring (% core) "
        "| insert→alarm median / max (s) | false alarms (other assets) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row.markdown())
    print(
        f"\n{os.cpu_count()} CPUs, Python {platform.python_version()}; one row per second "
        f"per asset; training.min_training_samples = {MIN_TRAINING} (each asset's history), "
        f"min_new_samples = {MIN_NEW}, epochs = {args.epochs}, otherwise the default "
        "network; daemon.check_interval and scoring.poll_interval default; "
        f"bursts of alarm_of rows, vibration x{ANOMALY:g}, in up to {args.alarm_assets} "
        f"assets per count; CPU over {args.window:g} s windows; "
        f"seconds per count: {', '.join(f'{r.assets}: {r.took:.0f}' for r in rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
