"""`packaging/dev run`, the README's first command: the daemon on the shipped
conf/smocsd.toml, trained on `smocsd demo` readings, scoring the rows `demo --follow`
keeps adding, and an alarm event from one of the demo's anomalies in the outbox within a
minute or two.

The script runs from a copy of the repository's layout (its own `.state`) that shares
this checkout's `.venv`, `smocsd` and `conf`, so the checkout's `.state` is left alone.
Slow: it runs the daemon for up to two minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from helpers import smocsd

REPO = Path(__file__).resolve().parent.parent


def test_dev_run_trains_and_puts_an_alarm_event_in_the_outbox_within_two_minutes(tmp_path):
    venv = Path(sys.executable).parent.parent
    root = tmp_path / "repo"
    (root / "packaging").mkdir(parents=True)
    shutil.copy2(REPO / "packaging" / "dev", root / "packaging" / "dev")
    for name in ("smocsd", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(venv)
    # The shipped config but for [publish] order: a broker a machine happens to run on
    # localhost's default ports would take the messages this test reads from the outbox.
    shipped = (REPO / "conf" / "smocsd.toml").read_text()
    assert shipped.count('\norder = ["kafka", "mqtt"]\n') == 1
    (root / "conf").mkdir()
    (root / "conf" / "smocsd.toml").write_text(
        shipped.replace('\norder = ["kafka", "mqtt"]\n', "\norder = []\n")
    )
    if not (venv / ".smocsd-installed").exists():  # the script would reinstall into .venv
        (venv / ".smocsd-installed").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "SMOCSD_CONFIG")}
    log = tmp_path / "dev.log"
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(root / "packaging" / "dev"), "run"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    state = root / ".state"
    cfg = root / "conf" / "smocsd.toml"
    outbox_env = {"STATE_DIRECTORY": str(state)}
    try:
        alarms: list[dict] = []
        while not alarms:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() - started < 120, f"no alarm event in 2 min:\n{log.read_text()}"
            time.sleep(2)
            if not (state / "outbox.db").exists():
                continue
            out = smocsd("outbox", "list", "--json", config=cfg, env=outbox_env)
            messages = json.loads(out.stdout) if out.returncode == 0 else []
            alarms = [m for m in messages if m.get("schema") == "smocsd.alarm/1"]
        assert any(m.get("outcome") == "promoted" and m["version"] == 1 for m in messages)
        rows = demo_labels(state / "readings.db")
        start = alarms[0]["start"]["order"]
        # The event is one of the demo's anomalies (a window's reach before it at most).
        assert any(rows.get(order) == 1 for order in range(start, start + 20)), alarms[0]
        assert "alarm opened at order" in log.read_text()
        feeds = processes_in(root, "demo")
        assert len(feeds) == 1, feeds
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The plant stopped with the daemon it was started beside.
    deadline = time.monotonic() + 10
    while processes_in(root, "demo"):
        assert time.monotonic() < deadline, "demo --follow outlived the daemon"
        time.sleep(0.2)


def processes_in(cwd: Path, word: str) -> list[int]:
    """The live processes working in `cwd` whose command line holds `word`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "cwd").resolve() == cwd
                and word.encode() in (proc / "cmdline").read_bytes().split(b"\0")
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def demo_labels(db: Path) -> dict[int, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT id, label FROM readings"))
