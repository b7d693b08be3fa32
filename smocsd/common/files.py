"""How smocsd writes and locks its files: the one atomic-replace protocol and the one flock.

A file is replaced whole (write_atomic): a temp file in the same directory (rename(2) is
atomic only within one file system), fsync'ed, renamed over the target, the directory
fsync'ed. A crash at any instant leaves the old content or the new, never a part; what
a kill leaves is a hidden temp file, which remove_temp_files() clears under the lock
the file's writers hold. tests/test_crash.py and tests/test_labels.py kill a write at
each of these steps.

Processes (the daemon, `smocsd` commands, a cycle's child) take turns with flock(2) on
a lock file of its own (locked()), never on the data file: a rename replaces that one
(a lock on the old inode guards nothing), and closing any other descriptor of an SQLite
file would drop SQLite's POSIX locks on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

# Shared with the model store's staging and deleting directories, so that its recover()
# also clears the temp files of its .last_version.
TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # fsync's error does not name the file on its own
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, *, mode: int | None = None, sync_directory: bool = True
) -> None:
    """Replaces `path` with `data` so that a crash leaves the old or the new content.

    `mode`: the file's permissions whatever the umask (None: the umask's). Without
    `sync_directory`, a power loss may undo the rename and leave the old file, whole:
    for a file rewritten anyway (metrics.py's textfile, every second), that spares the
    SD card a journal commit per write.
    """
    # The pid: a writer that holds no lock never writes into another's temp file.
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        # O_NOFOLLOW: a symlink planted at the temp name is refused, not written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with os.fdopen(os.open(tmp, flags, 0o666 if mode is None else mode), "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # os.open's mode went through the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # A full disk or a stop must not leave the temp file behind to fill it further.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:  # write() names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    if sync_directory:
        fsync_path(path.parent)


def remove_temp_files(path: Path) -> list[str]:
    """The temp files write_atomic(path) leaves when killed: removed; their names. Call
    it under the lock that the file's writers hold, so that none of them is a live one."""
    leftovers = list(path.parent.glob(f"{TMP_PREFIX}{path.name}.*"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return [p.name for p in leftovers]


@contextlib.contextmanager
def locked(path: Path, *, wait: bool = True, read_only: bool = False) -> Iterator[bool]:
    """An exclusive flock(2) on `path` for the block; yields whether it is held.

    `path` is a lock file (created if missing, mode 0644 less the umask) or a directory.
    wait=False tries once: yields False at once if another process holds the lock.
    The file is opened for writing, as the writer that takes it is about to write beside
    it: on a read-only file system the lock fails (EROFS) before the work it guards.
    `read_only` opens it for reading: once it exists, taking it needs no write access
    (outbox.py's flush, whose writes go through its database connection).
    """
    if path.is_dir():
        flags = os.O_RDONLY | os.O_DIRECTORY
    else:
        flags = os.O_CREAT | (os.O_RDONLY if read_only else os.O_WRONLY)
    fd = os.open(path, flags, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
