"""Debian root file systems for testing the packages, for each suite in SUITES (Debian 12
bookworm and Debian 13 trixie; Raspberry Pi OS uses Debian's packages): a bootable amd64
one, run under systemd-nspawn as a real systemd, and an arm64 one, run under qemu-user.

Each is built once by debootstrap from the machine's own Debian mirror and cached in
$SMOCSD_TEST_CACHE (default ~/.cache/smocsd-tests); a test works on a throw-away overlay,
so the cache stays clean. Needs root and Debian's debootstrap, systemd-container and
qemu-user-static (for arm64).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import build_deb
import pytest

CACHE = Path(os.environ.get("SMOCSD_TEST_CACHE", Path.home() / ".cache" / "smocsd-tests"))
# The Debian releases whose packages are proven here; Ubuntu's are checked statically
# (tests/test_deb.py), as no Ubuntu mirror is reachable from the test machines.
SUITES = ("bookworm", "trixie")
# What a minimal gateway has, plus what the package depends on; nothing of smocsd's own
# Python stack, which the package must bring.
PACKAGES = {
    "amd64": ("systemd", "systemd-sysv", "dbus", "python3", "libpq5", "adduser", "procps"),
    "arm64": ("python3", "libpq5"),
}
QEMU = Path("/usr/bin/qemu-aarch64-static")
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""}


class TestbedError(Exception):
    """Something the tests need could not be set up (tool missing, boot failed...)."""


def unavailable(reason: str) -> None:
    """Skip the test for want of its testbed; fail it under CI (CI=true), where the
    testbed must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def missing_tools(arch: str) -> list[str]:
    """Tools (with their Debian packages) that this host lacks for arch's testbed."""
    tools = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container"}
    if arch == "amd64":
        tools["nsenter"] = "util-linux"
    else:
        tools[str(QEMU)] = "qemu-user-static"
    missing = [f"{tool} ({pkg})" for tool, pkg in tools.items() if not shutil.which(tool)]
    if os.geteuid() != 0:
        missing.append("root")
    if arch != "amd64" and not BINFMT.exists():
        # smocsd runs each training cycle in a child process: its exec of an arm64 python3
        # reaches qemu only through binfmt_misc (tests/provision registers it).
        missing.append(f"{BINFMT} (binfmt_misc registration of qemu-user-static)")
    return missing


def debian_mirror() -> str:
    """The first Debian archive this machine's apt uses (not the security one); it serves
    every suite, whichever one this machine runs."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        uris = re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s", text, re.M)
        uris += re.findall(r"^URIs:\s*(\S+)", text, re.M)
        for uri in uris:
            if "security" not in uri and "debian" in uri:
                return uri
    return "http://deb.debian.org/debian"


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [str(c) for c in cmd], check=True, capture_output=True, text=True, **kw
        )
    except subprocess.CalledProcessError as exc:
        raise TestbedError(f"{' '.join(map(str, cmd))} failed:\n{exc.stdout}{exc.stderr}") from exc


def rootfs(arch: str, suite: str = SUITES[0]) -> Path:
    """The cached rootfs of suite for arch, built first if missing or made from another
    recipe."""
    mirror = debian_mirror()
    recipe = f"{suite} {arch} {mirror} {' '.join(PACKAGES[arch])}\n"
    path = CACHE / f"rootfs-{suite}-{arch}"
    stamp = path / ".smocsd-testbed"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".rootfs-{suite}-{arch}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == recipe:
            return path
        work = Path(tempfile.mkdtemp(prefix=f".rootfs-{arch}-", dir=CACHE))
        try:
            _debootstrap(arch, suite, mirror, work / "root")
            (work / "root" / stamp.name).write_text(recipe)
            if path.exists():
                shutil.rmtree(path)
            (work / "root").rename(path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


def _debootstrap(arch: str, suite: str, mirror: str, target: Path) -> None:
    include = "--include=" + ",".join(PACKAGES[arch])
    if arch == "amd64":
        _run("debootstrap", "--variant=minbase", include, suite, target, mirror)
        return
    # A foreign architecture: debootstrap's second stage would run arm64 maintainer
    # scripts, which needs binfmt_misc registered system-wide. Running Python needs only
    # the files, so unpack every downloaded package instead, and call qemu explicitly.
    _run(
        "debootstrap",
        "--arch=arm64",
        "--foreign",
        "--variant=minbase",
        include,
        suite,
        target,
        mirror,
    )
    for deb in sorted((target / "var/cache/apt/archives").glob("*.deb")):
        _run("dpkg-deb", "--extract", deb, target)
        deb.unlink()
    shutil.copy2(QEMU, target / "usr/bin" / QEMU.name)


@contextlib.contextmanager
def overlay(lower: Path) -> Iterator[Path]:
    """A writable overlay over lower; everything written goes away on exit."""
    with tempfile.TemporaryDirectory(prefix="smocsd-overlay-") as tmp:
        upper, work, merged = (Path(tmp) / d for d in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            d.mkdir()
        _run(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={upper},workdir={work}",
            merged,
        )
        try:
            yield merged
        finally:
            subprocess.run(["umount", "--lazy", str(merged)], check=False)


# Where systemd looks for the system's units, /etc first: a unit masked there wins.
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")


def mask_timers(root: Path) -> list[str]:
    """Masks every timer unit of the rootfs at root (a link to /dev/null in /etc), and
    returns their names.

    The tests diff the container's files before the package's install and after its purge,
    and a timer that fires in between writes files of its own: Debian's
    dpkg-db-backup.timer fires at midnight and writes /var/backups, apt-daily and
    apt-daily-upgrade refresh the package lists, systemd-tmpfiles-clean deletes, fstrim
    and e2scrub_all touch the disks... So a test that crosses midnight would fail. The
    masks are written into root, which should be the test's overlay (they go away with
    it); they are in place before the first snapshot, so they are not in the diff.
    """
    etc = root / UNIT_DIRS[0]
    etc.mkdir(parents=True, exist_ok=True)
    names = sorted({p.name for d in UNIT_DIRS for p in (root / d).glob("*.timer")})
    for name in names:
        unit = etc / name
        if unit.is_symlink() or unit.exists():
            unit.unlink()
        unit.symlink_to("/dev/null")
    return names


class Container:
    """A booted systemd in a rootfs, without network, driven by nsenter.

    Every timer unit of the rootfs is masked first (see mask_timers), and the boot checks
    that no timer is active, so no scheduled job writes into a test's file system."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self._proc: subprocess.Popen | None = None
        self.pid = 0

    def __enter__(self) -> Container:
        mask_timers(self.root)
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--directory",
                    str(self.root),
                    "--boot",
                    "--console=pipe",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    f"--machine=smocsd-test-{os.getpid()}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self.pid = self._init_pid()
            self._wait_booted()
            timers = self.active_timers()
            assert not timers, f"timers active in the test container: {timers}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def _init_pid(self) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TestbedError(
                    f"systemd-nspawn exited {self._proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-3000:]}"
                )
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids:
                    return int(pids[0])
            time.sleep(0.1)
        raise TestbedError("systemd-nspawn started no init")

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise TestbedError(
            f"container did not boot (state {state!r}): "
            f"{self.log.read_text(errors='replace')[-3000:]}"
        )

    def active_timers(self) -> list[str]:
        """The timer units that systemd in the container has active (waiting to fire)."""
        out = self.run(
            "systemctl", "list-units", "--type=timer", "--state=active", "--no-legend", "--plain"
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def run(
        self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """cmd inside the container, as root, with a clean environment."""
        proc = subprocess.run(
            [
                "nsenter",
                "--target",
                str(self.pid),
                "--all",
                "--root",
                "--wd",
                "env",
                "-i",
                *(f"{k}={v}" for k, v in ENV.items()),
                *cmd,
            ],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        # SIGTERM makes nspawn ask the container's systemd to power off.
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def run_arm64(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """cmd (an arm64 program and its arguments) in the arm64 rootfs under qemu-user.

    nspawn gives it /proc and /sys, which ONNX Runtime's CPU detection reads; the program
    is started through qemu explicitly, so no binfmt_misc registration is needed."""
    return subprocess.run(
        [
            "systemd-nspawn",
            "--quiet",
            "--directory",
            str(root),
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=pipe",  # keep stdout and stderr apart
            "--setenv=LANG=C.UTF-8",
            f"/usr/bin/{QEMU.name}",
            *cmd,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def package(codename: str, arch: str, out: Path, version: str | None = None) -> Path:
    """The package for codename and arch built by packaging/build_deb.py into
    out/<codename> (quick compression), once per process for the same arguments, so test
    modules share it."""
    return _package(codename, arch, out, version or build_deb.default_version())


@functools.cache
def _package(codename: str, arch: str, out: Path, version: str) -> Path:
    return build_deb.build(codename, arch, out / codename, version, fast=True)
