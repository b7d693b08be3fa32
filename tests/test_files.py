"""smocsd/common/files.py: the lock helper's variants, and what write_atomic leaves on a failure.
The crash tests (test_crash.py, test_labels.py) kill the write at each of its steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smocsd.common.files import locked, remove_temp_files, write_atomic


def test_a_try_lock_says_whether_it_got_the_lock_and_a_lock_ends_with_its_block(tmp_path):
    lock = tmp_path / "x.lock"
    with locked(lock) as held:
        assert held and lock.is_file()  # created on first use
        # flock is per open file: a second open conflicts even in this process.
        with locked(lock, wait=False) as again:
            assert again is False
    with locked(lock, wait=False) as again, locked(tmp_path, wait=False) as directory:
        assert again and directory  # released; a directory is locked as itself
    with locked(tmp_path / "flush.lock", read_only=True) as held:
        assert held


def test_a_failed_write_keeps_the_old_file_leaves_no_temp_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left on device") as exc:
        write_atomic(path, b"new")
    assert exc.value.filename == str(path)  # fsync's own error names no file
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_leftover_temp_files_of_one_file_are_removed_and_named(tmp_path: Path):
    for name in (".tmp-state.json.1", ".tmp-state.json.22", ".tmp-labels.json.3"):
        (tmp_path / name).write_bytes(b"{")
    assert sorted(remove_temp_files(tmp_path / "state.json")) == [
        ".tmp-state.json.1",
        ".tmp-state.json.22",
    ]
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-labels.json.3"]
