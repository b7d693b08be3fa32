"""Shared helpers for the tests of the core: small configs, the CLI as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

# Small enough to train in a second or two, large enough to learn something.
FAST = {
    "training": {
        "window_size": 10,
        "min_training_samples": 2000,
        "min_new_samples": 500,
        "min_interval": 0,
        "max_rows": 4000,
        "epochs": 4,
        "batch_size": 64,
        "hidden": [16, 4],
    },
    "publish": {"order": []},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, state_dir: Path, sections: dict | None = None, **extra) -> Path:
    """A config file with FAST settings, `sections` merged over them."""
    merged: dict[str, dict] = {"daemon": {"state_dir": str(state_dir), "device_id": "gw-test"}}
    for source in (FAST, sections or {}, extra):
        for name, table in source.items():
            merged.setdefault(name, {}).update(table)
    lines = []
    for name, table in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def smocsd(
    *args: str,
    config: Path | None = None,
    check: bool = False,
    timeout: float = 120,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Runs `python -m smocsd ARGS` and captures its output."""
    cmd = [sys.executable, "-m", "smocsd", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    if config is not None:
        full_env.pop("SMOCSD_CONFIG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Running:
    """A `smocsd run` subprocess whose stderr is collected in a file."""

    def __init__(self, config: Path, log: Path, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smocsd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            env={**(env or os.environ), "PYTHONPATH": str(Path(__file__).parent)},
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, fragment: str, timeout: float = 60, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(fragment) < count:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {fragment!r} in:\n{self.text()}"
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def gpg_test_key(home: Path) -> str:
    """Creates a throw-away ed25519 signing key without passphrase in the GnuPG home `home`;
    returns its fingerprint.

    gpg-agent puts its sockets in `home` (where /run/user/UID is missing), and a socket path
    has at most 107 bytes: take a short one, tempfile.mkdtemp(dir="/tmp"). gpg starts the
    agent here and again for every signature, so the caller stops it at the end:
    gpgconf --homedir HOME --kill gpg-agent."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--passphrase", ""]
    for args in (
        ["--quick-gen-key", "smocsd test <test@invalid>", "ed25519", "sign", "never"],
        ["--with-colons", "--list-secret-keys"],
    ):
        proc = subprocess.run([*gpg, *args], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"gpg {args[0]} exited {proc.returncode}:\n{proc.stderr}")
    return next(line.split(":")[9] for line in proc.stdout.splitlines() if line[:4] == "fpr:")


def _release(python: Path) -> tuple[int, ...]:
    """(3, 10, 13) for .../versions/3.10.13/bin/python3.10."""
    return tuple(int(n) for n in re.findall(r"\d+", python.parts[-3]))


def find_python(version: str) -> Path | None:
    """An interpreter of `version` ("3.10"): python3.X on PATH, else pyenv's install of it.

    A pyenv shim is on PATH for every installed version but fails for one the global
    setting does not select, so each candidate is asked its version.
    """
    candidates: list[str | Path | None] = [shutil.which(f"python{version}")]
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    installs = root.glob(f"versions/{version}.*/bin/python{version}")
    # newest patch release first: 3.10.13 before 3.10.9
    candidates += sorted(installs, key=_release, reverse=True)
    for candidate in filter(None, candidates):
        proc = subprocess.run(
            [candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0 and proc.stdout.strip() == version:
            return Path(candidate)
    return None


def insert(db: Path, rows: int, vibration_factor: float = 1.0) -> int:
    """`rows` more rows in a demo database, repeating its newest normal ones (vibration
    scaled; scaled rows are labelled anomalous); returns the order value of the first.

    The connection is closed on return, not left to the garbage collector: SQLite shares its
    locks per file within a process, and a WAL database renamed while a connection here still
    had it open failed to open under its new name ("disk I/O error").
    """
    with closing(sqlite3.connect(db)) as conn, conn:
        last = conn.execute(
            "SELECT ts, temperature, vibration, current FROM readings ORDER BY rowid DESC LIMIT 1"
        ).fetchone()
        recent = conn.execute(  # normal rows only: a copy of an anomaly is anomalous
            "SELECT temperature, vibration, current FROM readings WHERE label = 0 "
            "ORDER BY rowid DESC LIMIT ?",
            (rows,),
        ).fetchall()[::-1]
        first = conn.execute("SELECT max(rowid) FROM readings").fetchone()[0] + 1
        ts = last[0]
        for i in range(rows):
            t, v, c = recent[i % len(recent)]
            ts += 1
            conn.execute(
                "INSERT INTO readings (ts, temperature, vibration, current, label) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    ts,
                    t,
                    None if v is None else v * vibration_factor,
                    c,
                    int(vibration_factor != 1.0),
                ),
            )
    return first


PUMPS = ("P-1", "P-2", "P-3", "P-4", "P-5")


def pump_rows(
    db: Path,
    start: int,
    rows: int,
    faulty: str | None = None,
    fault: tuple[int, int] = (0, 0),
    *,
    dropouts: bool = False,
    regimes: bool = True,
) -> None:
    """Rows `start`..`start + rows - 1` of each pump's own simulated timeline (demo.py's
    process, seed = its number), interleaved by time into one table as a historian writes
    them; `faulty`'s vibration carries a bearing fault (+1.5, the demo's clear-cut size)
    on its rows fault[0]..fault[1] - 1 of these."""
    from smocsd.data import demo

    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, ts REAL, asset TEXT, "
            "temperature REAL, vibration REAL, current REAL)"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS readings_asset ON readings (asset, id)")
        runs = {
            pump: demo.simulate(
                rows,
                start,
                seed=n,
                anomalies=False,
                startup=False,
                gaps=False,
                dropouts=dropouts,
                regimes=regimes,
            )
            for n, pump in enumerate(PUMPS, 1)
        }
        for i in range(rows):
            for pump, run in runs.items():
                bad = pump == faulty and fault[0] <= i < fault[1]
                vibration = run["vibration"][i] + (1.5 if bad else 0.0)
                conn.execute(
                    "INSERT INTO readings (ts, asset, temperature, vibration, current) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [run["ts"][i], pump, run["temperature"][i], vibration, run["current"][i]],
                )


def run_forked(argv: list[str], capfd) -> tuple[int, str, str]:
    """main(argv) in a forked child, which may become another user: this interpreter may
    live where that user cannot read, so everything is imported before the fork."""
    from smocsd.app.cli import main

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    out, err = capfd.readouterr()
    return os.waitstatus_to_exitcode(wait_status), out, err


def model_meta(model_onnx: bytes, channels: tuple[str, ...] = ("a",), **fields) -> dict:
    """A metadata.json of the current format for a version whose model.onnx is
    `model_onnx`, every field as the built-in job writes it; `fields` replace the top-level
    ones."""
    n = len(channels)
    quantiles = {"p50": 1.0, "p90": 2.0, "p95": 2.5, "p99": 3.0, "p99.9": 4.0, "max": 5.0}
    meta = {
        "format": "smocsd.model/1",
        "name": "autoencoder",
        "version": 1,
        "outcome": "promoted",
        "result_id": "2f1c7e1e-8b4e-4b51-9a43-7c2d35e1a0b2",
        "created_at": "2026-11-26T05:00:00Z",
        "device_id": "gw-1",
        "backend": "numpy",
        "window_size": 4,
        "stride": 1,
        "channels": list(channels),
        "input_name": "input",
        "output_name": "reconstruction",
        "normalization": {"kind": "zscore", "mean": [0.0] * n, "scale": [1.0] * n},
        "score": "channel-max",
        "channel_scale": [1.0] * n,
        "threshold": 1.0,
        "threshold_fit": {
            "method": "lognormal-tolerance",
            "false_alarm_rate": 0.001,
            "confidence": 0.95,
            "log_median": -1.5,
            "log_scale": 0.35,
            "windows": 1000,
            "effective_windows": 100.0,
            "k": 3.2,
        },
        "score_quantiles": {"validation": quantiles, "training": dict(quantiles)},
        "alarm": {
            "kind": "k-of-n",
            "above": 2,
            "of": 3,
            "sustained": {"above": 20, "of": 30, "level": 1.25},
            "level": {"gap": 100, "baseline": 50, "limit": [0.8] * len(channels)},
        },
        "time": {
            "interval_s": 10.0,
            "max_gap_s": 30.0,
            "gaps": 0,
            "out_of_order": 0,
            "duplicate_times": 0,
            "rows_without_time": 0,
        },
        "channel_error": {c: {"val_mse": 0.5, "share": 1 / n} for c in channels},
        "metrics": {
            "train_loss": 0.5,
            "val_loss": 0.6,
            "epochs_run": 3,
            "duration_s": 1.5,
            "warm_started": False,
        },
        "history": {"train_loss": [0.7, None, 0.5], "val_loss": [0.8, 0.7, 0.6]},
        "eval": {
            "val_score_p50": 1.0,
            "val_score_p99": 3.0,
            "threshold": 1.0,
            "val_loss": 0.6,
            "val_windows_over_threshold": 0.01,
            "previous_version": None,
            "previous_val_loss": None,
            "champion_problem": None,
            "left_out_rows": 4,
            "champion_alarm_windows": 0,
            "alarm_windows_kept": None,
            "rejection": None,
        },
        "data": {
            "rows": 1000,
            "dropped_rows": 0,
            "windows": 997,
            "train_windows": 800,
            "val_windows": 197,
            "first_order": 1,
            "last_order": 1000,
            "left_out": {
                "rows": 4,
                "ranges": [{"first": 10, "last": 13, "why": "alarm", "rows": 4}],
                "accepted": [{"first": 20, "last": 30, "rows": 11}],
            },
        },
        "files": {
            "model.onnx": {
                "sha256": hashlib.sha256(model_onnx).hexdigest(),
                "bytes": len(model_onnx),
            }
        },
        "software": {"smocsd": "0.1.0", "onnxruntime": "1.19.2", "python": "3.11.7"},
    }
    return {**meta, **fields}
