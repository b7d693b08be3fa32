"""Fault injection for the reliability tests: a full disk, a read-only directory, a
failing system call, a shifted wall clock.

    with faults.tmpfs(tmp_path / "state", "4M") as state:   # real ENOSPC
        faults.fill(state)                                  # ... now every write fails
        faults.free(state)                                  # ... and works again
    with faults.read_only(state_dir):                       # real EROFS
        ...
    subprocess.run(faults.strace_inject(cmd, "fsync", "EIO", path=db))
    subprocess.run(cmd, env=faults.faketime_env(timedelta(days=-400)))

The tests run as root, so permissions (chmod 555) cannot make a directory read-only, and
a disk cannot be filled safely: hence mounts, which need root (CAP_SYS_ADMIN). A helper
whose facility is missing (no root, no strace or ptrace, no libfaketime: tests/provision
installs the tools) skips the test, and fails it under CI (CI=true), as tests/conftest.py
does for the servers.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NoReturn

import pytest

# What fill() writes, in the file system it fills.
FILLER = ".faults-filler"
# fill() refuses larger file systems: it is for tmpfs(), not for the machine's disk.
FILL_LIMIT = 256 * 1024 * 1024


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _mount(*args: str | Path) -> None:
    """`mount args`; the test is skipped (failed under CI) when the mount is refused."""
    cmd = ["mount", *map(str, args)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        _unavailable(f"fault injection needs root and mounts: {' '.join(cmd)}: {detail}")


def _umount(path: Path) -> None:
    # Lazily if busy (a process still in it): detached now, gone with its last user.
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1M") -> Iterator[Path]:
    """A fresh tmpfs of `size` (mount's syntax: "512k", "4M") mounted at path (created if
    missing, its content hidden meanwhile), unmounted on exit. Filled up (fill()), it
    answers every write with a real ENOSPC; it has no blocks reserved for root."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "faults", path)
    try:
        yield path
    finally:
        _umount(path)


def fill(path: Path) -> Path:
    """Fills the file system of directory path (a tmpfs() one) until a write of one more
    byte fails with ENOSPC, with one file, which it returns. Creating empty files and
    directories still works (tmpfs counts inodes apart); anything with data does not."""
    fs = os.statvfs(path)
    if fs.f_blocks * fs.f_frsize > FILL_LIMIT:
        raise ValueError(f"{path}: file system too large to fill; use faults.tmpfs()")
    filler = path / FILLER
    chunk = b"\0" * (1024 * 1024)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return filler
                chunk = chunk[: len(chunk) // 16 or 1]  # the last pages, then the last byte
    finally:
        os.close(fd)


def free(path: Path) -> None:
    """Gives back what fill(path) took: writes work again."""
    (path / FILLER).unlink(missing_ok=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """Directory path made read-only, and writable again on exit: it is bind-mounted
    read-only over itself, so any directory will do. What is opened, created, removed or
    renamed through a path below it fails with a real EROFS, even for root; a file
    descriptor opened before still writes (as after `mount -o remount,ro` it could not;
    that remount refuses while files are open for writing, with EBUSY)."""
    # The kernel refuses the read-only remount (EBUSY) while a file is open for writing
    # through the new bind mount, which a running daemon may have done in between:
    # then the bind mount goes and the pair is tried again.
    for _ in range(50):
        _mount("--bind", path, path)
        cmd = ["mount", "-o", "remount,bind,ro", str(path)]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            break
        _umount(path)
        time.sleep(0.02)
    else:
        _mount("-o", "remount,bind,ro", path)  # fails the test with mount's message
    try:
        yield path
    finally:
        _umount(path)


@functools.cache
def _strace_problem() -> str | None:
    strace = shutil.which("strace")
    if not strace:
        return "strace is not installed (Debian package strace)"
    proc = subprocess.run([strace, "-qq", "-o", "/dev/null", "--", "true"], capture_output=True)
    if proc.returncode != 0:
        return f"strace cannot trace here (ptrace refused?): {proc.stderr.decode().strip()}"
    return None


def strace_inject(
    cmd: Sequence[str | Path],
    syscall: str,
    error: str,
    when: int | str = 1,
    path: str | Path | None = None,
) -> list[str]:
    """cmd run under strace, whose call of `syscall` ("write", "fsync", "openat", or a set
    like "write,pwrite64") fails with `error` ("ENOSPC", "EIO"...) without being made;
    error "KILL": the process is SIGKILLed on entering it instead, as abrupt as a power
    cut for what it had left to do.

    when: the Nth call (1 = the first), "N+" the Nth and every one after, "N..M" a range.
    Calls are counted per process, and cmd's child processes are traced too (each with
    its own count). path: only the calls on that file count and fail (a name, or for
    write, fsync... an open descriptor of it), so the program's logging still works.
    strace exits with cmd's status; the trace itself is thrown away.
    """
    problem = _strace_problem()
    if problem:
        _unavailable(problem)
    only = ["-P", str(path)] if path is not None else []
    return [
        "strace",
        "-f",
        # stop only at the traced calls: near full speed; but strace 6.1 silently skips
        # a signal= injection under it
        *(["--seccomp-bpf"] if error != "KILL" else []),
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        f"trace={syscall}",
        "-e",
        f"inject={syscall}:{'signal' if error == 'KILL' else 'error'}={error}:when={when}",
        *only,
        "--",
        *map(str, cmd),
    ]


@functools.cache
def _libfaketime() -> tuple[str, bool] | str:
    """(libfaketime's path, whether FAKETIME_DONT_FAKE_MONOTONIC works with this Python),
    or what is missing."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    libs += [p for p in [Path("/usr/local/lib/faketime/libfaketime.so.1")] if p.is_file()]
    if not libs:
        return "libfaketime is not installed (Debian package faketime)"
    lib = str(libs[0])
    # libfaketime 0.9.10 (Debian 12) breaks Python >= 3.11's time.sleep() when it leaves
    # the monotonic clock alone: the sleep fails with EINVAL (libfaketime issue #426).
    env = {**os.environ, "LD_PRELOAD": lib, "FAKETIME": "+0", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    probe = [sys.executable, "-c", "import time; time.sleep(0.001)"]
    proc = subprocess.run(probe, env=env, capture_output=True, timeout=30)
    return lib, proc.returncode == 0


def faketime_env(
    when: datetime | timedelta, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """env (default os.environ) for a subprocess whose wall clock (time.time(),
    datetime.now()) reads `when` (a datetime, naive = local time) or is shifted by it (a
    timedelta), then runs on at the normal rate; its children get the same clock.

    The monotonic clock never jumps and runs at the normal rate; where libfaketime
    allows (not 0.9.10, Debian 12's), it is left alone (FAKETIME_DONT_FAKE_MONOTONIC=1);
    else it reads like the faked wall clock, and Python's timed waits on locks
    (threading.Event.wait(t), Lock.acquire(timeout=t), queue.Queue.get(timeout=t))
    hang, since libfaketime does not fake sem_clockwait(). time.sleep, select/poll and
    subprocess timeouts, multiprocessing's Connection.poll(t) work. File times (os.stat)
    stay the kernel's, that is real.
    """
    found = _libfaketime()
    if isinstance(found, str):
        _unavailable(found)
    lib, real_monotonic = found
    if isinstance(when, datetime):
        # An offset, not FAKETIME="@when": with that, each child process would start its
        # clock at `when` again, behind its parent's.
        when = when.astimezone(timezone.utc) - datetime.now(timezone.utc)
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = " ".join(filter(None, [lib, out.get("LD_PRELOAD")]))
    out["FAKETIME"] = f"{when.total_seconds():+.6f}"
    if real_monotonic:
        out["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return out
