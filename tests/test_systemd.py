"""The amd64 package under a real systemd: a Debian 12 rootfs booted by systemd-nspawn.

One container per module, the tests in order: install, train, status, watchdog, bad
config, sandbox, upgrade, purge. Needs root, debootstrap, systemd-container; under CI
(CI=true) a testbed that cannot be set up fails instead of skipping.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import write_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packaging"))
import build_deb
import testbed

STATE = "/var/lib/smocsd"
MODELS = f"{STATE}/models/autoencoder"
CONFIG = "/etc/smocsd/smocsd.toml"
DROPIN_DIR = "/etc/systemd/system/smocsd.service.d"
# Only the timings change, so a test waits seconds, not minutes; the sandbox is the unit's.
TIMINGS = "[Service]\nWatchdogSec=5s\nTimeoutAbortSec=5s\nRestartSec=1s\n"
# What the package and its service may change outside these is checked to be gone after
# purge: logs, dpkg's and apt's own records, caches and runtime state are not the package's files.
SNAPSHOT_PRUNE = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/var/tmp",
    "/var/log",
    "/var/cache",
    "/var/lib/dpkg",
    "/var/lib/apt",
    "/root",
)


class Box:
    """The booted container, with the two packages copied in."""

    def __init__(self, container: testbed.Container, v1: str, v2: str) -> None:
        self.c = container
        self.v1, self.v2 = v1, v2
        self.before: set[str] = set()  # the file system before the first install

    def sh(self, script: str, check: bool = True):
        return self.c.run("sh", "-c", script, check=check)

    def as_smocsd(self, *args: str, check: bool = True):
        return self.c.run("runuser", "-u", "smocsd", "--", "smocsd", *args, check=check)

    def show(self, *props: str) -> dict[str, str]:
        out = self.c.run("systemctl", "show", "-p", ",".join(props), "smocsd").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *options: str) -> str:
        return self.c.run("journalctl", "-u", "smocsd", "--no-pager", "-o", "cat", *options).stdout

    def write(self, path: str, text: str) -> None:
        self.c.run("sh", "-c", f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}'", input=text)

    def read(self, path: str) -> str:
        return self.c.run("cat", path).stdout

    def files(self) -> set[str]:
        prune = " -o ".join(f"-path {p}" for p in SNAPSHOT_PRUNE)
        out = self.sh(f"find / -xdev \\( {prune} \\) -prune -o -print").stdout
        return set(out.splitlines())


def wait_for(what: str, check: Callable[[], object], timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    missing = testbed.missing_tools("amd64")
    if missing:
        testbed.unavailable(f"systemd testbed needs: {', '.join(missing)}")
    debs = tmp_path_factory.getbasetemp() / "debs"
    v1 = build_deb.default_version()
    v2 = f"{build_deb.upstream_version()}-2"  # an upgrade of v1
    try:
        lower = testbed.rootfs("amd64")
        packages = [testbed.package("amd64", debs, v) for v in (v1, v2)]
        with testbed.overlay(lower) as root:
            for deb in packages:
                (root / "root" / deb.name).write_bytes(deb.read_bytes())
            log = tmp_path_factory.mktemp("nspawn") / "console.log"
            with testbed.Container(root, log) as container:
                b = Box(container, v1, v2)
                b.before = b.files()
                yield b
    except testbed.TestbedError as exc:
        testbed.unavailable(str(exc))


def test_install_creates_user_enables_and_starts(box: Box) -> None:
    box.c.run("dpkg", "-i", f"/root/smocsd_{box.v1}_amd64.deb")
    passwd = box.c.run("getent", "passwd", "smocsd").stdout
    assert passwd.split(":")[5] == STATE, passwd
    assert passwd.strip().endswith("/usr/sbin/nologin"), passwd
    assert box.c.run("systemctl", "is-enabled", "smocsd").stdout.strip() == "enabled"
    # Type=notify: "active" only after READY=1, before any data exists.
    wait_for("smocsd active", lambda: box.show("ActiveState")["ActiveState"] == "active", 60)
    props = box.show("User", "MemoryMax", "NRestarts", "StatusText")
    assert props["User"] == "smocsd"
    assert props["MemoryMax"] == str(256 * 1024 * 1024)
    assert props["NRestarts"] == "0"


def test_unit_verifies_where_installed(box: Box) -> None:
    proc = box.c.run("systemd-analyze", "verify", "--man=no", "smocsd.service", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "smocsd" not in proc.stderr, proc.stderr


def test_trains_and_promotes_under_the_sandbox(box: Box, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "smocsd.toml", Path(STATE), {"daemon": {"check_interval": "2s"}}
    )
    box.write(CONFIG, config.read_text())
    box.write(f"{DROPIN_DIR}/test-timings.conf", TIMINGS)
    box.c.run("systemctl", "daemon-reload")
    box.c.run("systemctl", "restart", "smocsd")
    box.as_smocsd("demo", "--rows", "3000")
    wait_for("a promoted model in the journal", lambda: re.search(r"promoted v1\b", box.journal()))
    assert box.c.run("readlink", f"{MODELS}/current").stdout.strip() == "v000001"
    meta = json.loads(box.read(f"{MODELS}/v000001/metadata.json"))
    assert meta["backend"] == "ort", meta  # the bundled onnxruntime-training, sandboxed
    assert box.sh(f"stat -c %U {MODELS}/v000001/model.onnx").stdout.strip() == "smocsd"


def test_status_text_says_idle(box: Box) -> None:
    status = wait_for(
        "idle status",
        lambda: re.match(r"idle: next check .+", box.show("StatusText")["StatusText"]),
    )
    assert status


def test_watchdog_restarts_a_frozen_daemon(box: Box) -> None:
    before = box.show("MainPID", "NRestarts")
    box.c.run("kill", "-STOP", before["MainPID"])

    def restarted() -> bool:
        now = box.show("MainPID", "NRestarts", "ActiveState")
        return (
            int(now["NRestarts"]) > int(before["NRestarts"])
            and now["ActiveState"] == "active"
            and now["MainPID"] != before["MainPID"]
        )

    wait_for("the watchdog to restart smocsd", restarted, 90)
    assert "Watchdog timeout" in box.c.run("journalctl", "-u", "smocsd", "--no-pager").stdout


def test_reload_keeps_running_on_a_bad_config(box: Box) -> None:
    """ExecReload= (SIGHUP) with an invalid file: logged, the old config kept, no exit."""
    good = box.read(CONFIG)
    pid = box.show("MainPID")["MainPID"]
    box.write(CONFIG, good.replace("epochs = ", "epochz = ", 1))
    try:
        box.c.run("systemctl", "reload", "smocsd")
        wait_for("the reload to be logged", lambda: "epochz" in box.journal(), 30)
        assert box.show("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    finally:
        box.write(CONFIG, good)


def test_bad_config_exits_78_and_is_not_restarted(box: Box) -> None:
    good = box.read(CONFIG)
    box.write(CONFIG, good.replace("epochs = ", "epochz = ", 1))
    try:
        check = box.as_smocsd("check-config", check=False)
        assert check.returncode == 78, check
        assert "epochz" in check.stderr
        assert box.c.run("systemctl", "restart", "smocsd", check=False).returncode != 0
        failed = box.show("ActiveState", "ExecMainStatus", "NRestarts")
        assert failed["ActiveState"] == "failed" and failed["ExecMainStatus"] == "78", failed
        time.sleep(5)  # RestartSec=1s: a restart loop would have gone round several times
        assert box.show("ActiveState", "NRestarts") == {
            "ActiveState": "failed",
            "NRestarts": failed["NRestarts"],
        }
    finally:
        box.write(CONFIG, good)
        box.c.run("systemctl", "reset-failed", "smocsd")
        box.c.run("systemctl", "start", "smocsd")
    assert box.show("ActiveState")["ActiveState"] == "active"


def test_sandbox_allows_ctypes_callbacks_and_libpq(box: Box) -> None:
    """MemoryDenyWriteExecute= and the syscall filter, with psycopg on Debian's libpq:
    its ctypes callbacks need libffi closures, which must not need W+X memory."""
    probe = (
        "import ctypes, sys; sys.path.insert(0, '/usr/lib/smocsd'); "
        "assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7; "
        "import psycopg; print('probe', psycopg.pq.__impl__, psycopg.pq.version())"
    )
    box.c.run("systemctl", "stop", "smocsd")
    box.write(
        f"{DROPIN_DIR}/zz-probe.conf",
        f'[Service]\nType=oneshot\nExecStart=\nExecStart=/usr/bin/python3 -I -c "{probe}"\n',
    )
    box.c.run("systemctl", "daemon-reload")
    try:
        proc = box.c.run("systemctl", "start", "smocsd", check=False)
        journal = box.journal()
        assert proc.returncode == 0, journal[-2000:]
        assert re.search(r"^probe python 1[5-9]\d{4}$", journal, re.M), journal[-2000:]
    finally:
        box.c.run("rm", f"{DROPIN_DIR}/zz-probe.conf")
        box.c.run("systemctl", "daemon-reload")
        box.c.run("systemctl", "start", "smocsd")


def test_credentials_from_the_credstore_reach_only_the_service(box: Box) -> None:
    """LoadCredential=ID on systemd 252: a secret in /etc/credstore is handed over, the
    missing ones are skipped without failing the start."""
    box.c.run("install", "-d", "-m", "0700", "/etc/credstore")
    box.c.run("install", "-m", "0600", "/dev/null", "/etc/credstore/pg-password")
    box.write("/etc/credstore/pg-password", "s3cret\n")
    try:
        box.c.run("systemctl", "restart", "smocsd")
        assert box.show("ActiveState")["ActiveState"] == "active"
        creds = "/run/credentials/smocsd.service"
        assert box.c.run("ls", creds).stdout.split() == ["pg-password"]
        assert box.sh(f"stat -c '%U %a' {creds}/pg-password").stdout.split() == ["smocsd", "400"]
        assert box.read(f"{creds}/pg-password") == "s3cret\n"
    finally:
        box.c.run("rm", "-r", "/etc/credstore")


def test_reads_another_services_wal_database_with_the_example_dropin(box: Box) -> None:
    """examples/shared-sqlite.conf as installed: without it the service cannot read a WAL
    database that another service owns (and says so at priority err); with it, it trains,
    and the -wal/-shm files it creates stay writable for the owner."""
    db = "/var/lib/ingest/readings.db"
    good = box.read(CONFIG)
    box.sh(
        "adduser --system --group --no-create-home --home /var/lib/ingest ingest >/dev/null"
        " && install -d -m 2770 -o ingest -g ingest /var/lib/ingest"
        # an empty config, so the owner's demo needs nothing of smocsd's own config
        " && install -m 644 /dev/null /var/lib/ingest/empty.toml"
    )
    empty = "/var/lib/ingest/empty.toml"
    ingest = ("runuser", "-u", "ingest", "--", "smocsd", "--config", empty, "demo")
    box.c.run(*ingest, "--db", db, "--rows", "3600")  # 600 rows more than v1 saw
    box.c.run("chmod", "660", db)
    wal = f"import sqlite3; sqlite3.connect('{db}').execute('pragma journal_mode=wal')"
    box.c.run("runuser", "-u", "ingest", "--", "python3", "-c", wal)
    box.write(CONFIG, good + f'[source]\npath = "{db}"\n')
    try:
        box.c.run("systemctl", "restart", "smocsd")
        wait_for("the read to fail without the drop-in", lambda: db in box.journal("-p", "err"), 30)
        assert "promoted v1" not in box.journal("-p", "err")  # info lines keep their own priority

        box.c.run(
            "install",
            "-m",
            "644",
            "/usr/share/doc/smocsd/examples/shared-sqlite.conf",
            f"{DROPIN_DIR}/shared-sqlite.conf",
        )
        box.c.run("systemctl", "daemon-reload")
        box.c.run("systemctl", "restart", "smocsd")
        wait_for(
            "v2 from the shared database",
            lambda: re.search(r"(promoted|rejected) v2\b", box.journal()),
        )
        assert box.sh(f"stat -c %a {db}-shm").stdout.strip() == "660"
        box.c.run(*ingest, "--db", db, "--rows", "10")  # the owner still writes
    finally:
        box.c.run("rm", "-f", f"{DROPIN_DIR}/shared-sqlite.conf")
        box.write(CONFIG, good)
        box.c.run("systemctl", "daemon-reload")
        box.c.run("systemctl", "restart", "smocsd")
        box.sh("deluser --system --quiet ingest; rm -rf /var/lib/ingest")
    # Back on its own 3000 rows, below the 3610th it last trained on: the order column
    # went backwards, so gating starts over and it trains once more, then settles.
    wait_for("the order column going backwards", lambda: "went backwards" in box.journal(), 60)
    wait_for(
        "v3 on its own database", lambda: re.search(r"(promoted|rejected) v3\b", box.journal())
    )


def test_upgrade_restarts_and_keeps_models_outbox_and_config(box: Box) -> None:
    pid = box.show("MainPID")["MainPID"]
    versions = box.c.run("ls", MODELS).stdout.split()
    current = box.c.run("readlink", f"{MODELS}/current").stdout
    outbox = {m["message_id"] for m in json.loads(box.as_smocsd("outbox", "list", "--json").stdout)}
    assert outbox, "results kept with publish.order = [] should be in the outbox"
    config = box.read(CONFIG)

    # The operator's way (README.Debian), offline: every dependency is already there.
    box.c.run("apt-get", "install", "-y", "-q", f"/root/smocsd_{box.v2}_amd64.deb")

    assert box.c.run("dpkg-query", "-W", "-f=${Version}", "smocsd").stdout == box.v2
    wait_for("smocsd active", lambda: box.show("ActiveState")["ActiveState"] == "active", 60)
    assert box.show("MainPID")["MainPID"] != pid
    assert box.c.run("ls", MODELS).stdout.split() == versions
    assert box.c.run("readlink", f"{MODELS}/current").stdout == current
    after = json.loads(box.as_smocsd("outbox", "list", "--json").stdout)
    assert outbox <= {m["message_id"] for m in after}
    assert box.read(CONFIG) == config


def test_purge_leaves_nothing_behind(box: Box) -> None:
    box.c.run("rm", "-r", DROPIN_DIR)  # the tests' own drop-ins, not the package's
    pid = box.show("MainPID")["MainPID"]
    assert pid != "0"
    box.c.run("dpkg", "--purge", "smocsd")
    assert box.c.run("test", "-e", f"/proc/{pid}", check=False).returncode == 1, "not stopped"
    assert box.c.run("getent", "passwd", "smocsd", check=False).returncode == 2
    assert box.c.run("getent", "group", "smocsd", check=False).returncode == 2
    assert box.show("LoadState")["LoadState"] == "not-found"
    # Nothing scheduled wrote in between either: the testbed masks every timer.
    assert not box.c.active_timers()
    # adduser/deluser leave the usual backups of the account files.
    left = {p for p in box.files() - box.before if not re.fullmatch(r"/etc/\w+-", p)}
    assert not left, sorted(left)
