"""tests/faults.py does what it says: real ENOSPC, EROFS, injected errors, a shifted clock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import faults
import pytest


def _errno(exc: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc.value.errno


def test_a_filled_tmpfs_answers_enospc_until_freed(tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    with faults.tmpfs(mount, "512k") as disk:
        assert os.path.ismount(disk)
        (disk / "before").write_text("fits")
        faults.fill(disk)
        with pytest.raises(OSError) as exc:
            (disk / "after").write_text("x")
        assert _errno(exc) == errno.ENOSPC
        with pytest.raises(OSError) as exc, (disk / "before").open("a") as f:
            f.write("x" * 2 * os.sysconf("SC_PAGESIZE"))  # only the file's last page fits
        assert _errno(exc) == errno.ENOSPC
        faults.free(disk)
        (disk / "after").write_text("x")
        assert (disk / "before").read_text().startswith("fits")
    assert not os.path.ismount(mount)
    assert list(mount.iterdir()) == []


def test_fill_refuses_a_large_file_system(tmp_path: Path) -> None:
    if os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize <= faults.FILL_LIMIT:
        pytest.skip("the temporary directory is on a small file system")
    with pytest.raises(ValueError, match="too large"):
        faults.fill(tmp_path)
    assert not (tmp_path / faults.FILLER).exists()


def test_read_only_answers_erofs_even_to_root_then_writes_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "kept").write_text("a")
    with faults.read_only(state):
        assert (state / "kept").read_text() == "a"
        for change in (
            lambda: (state / "new").write_text("x"),
            lambda: (state / "kept").write_text("x"),
            lambda: (state / "kept").unlink(),
            lambda: (state / "kept").rename(state / "moved"),
            lambda: (state / "dir").mkdir(),
        ):
            with pytest.raises(OSError) as exc:
                change()
            assert _errno(exc) == errno.EROFS
    assert not os.path.ismount(state)
    (state / "kept").write_text("b")
    assert sorted(p.name for p in state.iterdir()) == ["kept"]


@pytest.mark.parametrize(("error", "code"), [("ENOSPC", errno.ENOSPC), ("EIO", errno.EIO)])
def test_strace_inject_fails_a_write_with_the_errno(tmp_path: Path, error: str, code: int) -> None:
    target = tmp_path / "x"
    # close() makes the write, and reports its error; a file closed by the garbage
    # collector at exit would not (Python ignores that error and writes the data again:
    # the second write() is not injected).
    cmd = [sys.executable, "-c", f"f = open({str(target)!r}, 'w'); f.write('a'); f.close()"]
    proc = subprocess.run(faults.strace_inject(cmd, "write", error), capture_output=True, text=True)
    assert proc.returncode == 1, proc
    assert f"[Errno {code}] {os.strerror(code)}" in proc.stderr


def test_strace_inject_counts_calls_and_keeps_to_the_path(tmp_path: Path) -> None:
    target = tmp_path / "x"
    script = (
        f"import sys; f = open({str(target)!r}, 'wb', buffering=0); f.write(b'1'); "
        "print('stdout still written', flush=True); f.write(b'2')"
    )
    cmd = [sys.executable, "-c", script]
    proc = subprocess.run(
        faults.strace_inject(cmd, "write", "ENOSPC", when=2, path=target),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc
    assert proc.stdout == "stdout still written\n"
    assert "[Errno 28] No space left on device" in proc.stderr  # stderr is still written
    assert target.read_bytes() == b"1"


CLOCKS = """
import json, subprocess, sys, time
wall, mono = time.time(), time.monotonic()
time.sleep(0.3)
slept = time.monotonic() - mono
child = float(subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                             capture_output=True, text=True, check=True).stdout)
print(json.dumps({"wall": wall, "mono": mono, "slept": slept, "child": child,
                  "after": time.time()}))
"""


@pytest.mark.parametrize(
    "when", [datetime(2030, 1, 1, tzinfo=timezone.utc), timedelta(days=-400)], ids=str
)
def test_faketime_shifts_the_wall_clock_of_a_subprocess(when: datetime | timedelta) -> None:
    env = faults.faketime_env(when)
    start, mono = time.time(), time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CLOCKS], env=env, capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - mono
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    expected = when.timestamp() if isinstance(when, datetime) else start + when.total_seconds()
    assert expected <= seen["wall"] <= expected + took
    assert abs(time.time() - start) < took + 1  # this process's clock is untouched
    # time.sleep works and the monotonic clock runs at the real rate...
    assert 0.29 <= seen["slept"] <= took
    # ... and the program's children share its clock.
    assert seen["wall"] <= seen["child"] <= seen["after"] <= seen["wall"] + took
    if env.get("FAKETIME_DONT_FAKE_MONOTONIC") == "1":
        assert mono <= seen["mono"] <= mono + took  # the real monotonic clock


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_facility_skips_or_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(faults, "_libfaketime", lambda: "libfaketime is not installed")
    monkeypatch.setattr(faults, "_strace_problem", lambda: "strace is not installed")
    outcome = pytest.fail.Exception if ci == "true" else pytest.skip.Exception
    with pytest.raises(outcome, match="libfaketime is not installed"):
        faults.faketime_env(timedelta(hours=1))
    with pytest.raises(outcome, match="strace is not installed"):
        faults.strace_inject(["true"], "write", "EIO")
