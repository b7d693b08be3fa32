"""Versioned model store: immutable version directories and an atomic `current` symlink.

Layout (under state_dir/models/<name>/):
    v000001/ ... v00000N/    immutable once renamed into place
    current -> v00000N       replaced by rename(2), never edited in place
    .lock                    flock: version allocation, promotion, retention, rollback
    .last_version            highest number ever allocated, so numbers only grow
    .tmp-v00000N/            a version being built; removed at start if a crash left it
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import modelfile

if TYPE_CHECKING:
    from .config import Config

_VERSION = re.compile(r"^v(\d{6,})$")
TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A request the store cannot satisfy (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class Champion:
    """The version `current` pointed to when a cycle began (None: none). A promotion
    over it swaps `current` only if it still points there (see commit)."""

    version: int | None


class CurrentMoved(StoreError):
    """`current` moved during the cycle (`models rollback`): the promotion is refused,
    nothing was renamed, the staging directory is left to commit unpromoted."""

    def __init__(self, champion: Champion, now: int | None) -> None:
        def name(version: int | None) -> str:
            return f"v{version}" if version is not None else "none"

        super().__init__(
            f"current was moved from {name(champion.version)} to {name(now)} during this "
            "cycle (smocsd models rollback): the rollback stands"
        )


def version_name(version: int) -> str:
    return f"v{version:06d}"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # fsync's error does not name the file on its own
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
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
    fsync_path(path.parent)


def remove_temp_files(path: Path) -> list[str]:
    """The temp files write_atomic(path) leaves when killed: removed; their names. Call
    it under the lock that the file's writers hold, so that none of them is a live one."""
    leftovers = list(path.parent.glob(f"{TMP_PREFIX}{path.name}.*"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return [p.name for p in leftovers]


class ModelStore:
    def __init__(self, root: Path, keep_versions: int):
        # Created by the first allocate(), not here: reading commands create nothing.
        self.root = root
        self.keep_versions = keep_versions

    @classmethod
    def of(cls, cfg: Config) -> ModelStore:
        """The store of the configured model: <state_dir>/models/<model.name>."""
        return cls(cfg.state_dir / "models" / cfg.model.name, cfg.model.keep_versions)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- reading

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m[1]) for m in found if m)

    def path(self, version: int) -> Path:
        return self.root / version_name(version)

    def current(self) -> int | None:
        try:
            target = os.readlink(self.root / "current")
        except FileNotFoundError:
            return None
        m = _VERSION.match(target)
        return int(m[1]) if m and self.path(int(m[1])).is_dir() else None

    def dangling(self) -> str | None:
        """One line when `current` exists but names no kept version (its directory was
        removed by hand), else None: nothing is current then, and status says why."""
        link = self.root / "current"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        if self.current() is not None:
            return None
        return f"{link} -> {target}: no such version directory (dangling link)"

    def metadata(self, version: int) -> dict[str, Any]:
        path = self.path(version) / "metadata.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"model version {version} does not exist") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"{path}: not a JSON object")
        return meta

    def check(self, version: int) -> str | None:
        """None if the version is whole and usable, else one line saying what is damaged.

        Called before a version is used as champion, warm start or rollback target: a
        disk that lies or a hand-edited file must cost one rejected use, not every cycle.
        """
        return modelfile.check(self.path(version))

    # --- writing

    def recover(self) -> list[str]:
        """Removes what a crash can leave behind: half-built versions and temp links."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        with self.lock():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    removed.append(p.name)
        return removed

    def allocate(self) -> tuple[int, Path]:
        """A new version number and an empty directory to build it in."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.lock():
            counter = self.root / ".last_version"
            last = int(counter.read_text()) if counter.exists() else 0
            version = max([last, *self.versions()]) + 1
            write_atomic(counter, f"{version}\n".encode())
        staging = self.root / f"{TMP_PREFIX}{version_name(version)}"
        staging.mkdir()
        return version, staging

    def commit(
        self, version: int, staging: Path, *, promote: bool, over: Champion | None = None
    ) -> Path:
        """The atomic save: makes a built version durable, then (if promoted) swaps `current`.

        Every file is fsync'ed, then the directory, then it is renamed into place and the
        parent fsync'ed; `current` is swapped the same way. A crash at any instant leaves
        `current` at the old or the new version, never at something partial.

        With `over`, a promotion is a compare-and-swap under the lock that rollback takes:
        if `current` no longer points at that champion, CurrentMoved is raised before
        anything is renamed. A cycle holds no lock while it trains (minutes), so this is
        how an operator's rollback during it wins over its promotion.
        """
        for f in staging.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(staging)
        final = self.path(version)
        with self.lock():
            if promote and over is not None and (now := self.current()) != over.version:
                raise CurrentMoved(over, now)
            os.rename(staging, final)
            fsync_path(self.root)
            if promote:
                self._point_current(version)
            self._prune()
        return final

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def rollback(self, version: int | None = None) -> int:
        """Points `current` at `version`, or at the newest kept version older than current."""
        if not self.root.is_dir():
            raise StoreError(f"no model versions in {self.root}")
        with self.lock():
            current = self.current()
            kept = self.versions()
            if version is None:
                older = [v for v in kept if current is None or v < current]
                whole = [v for v in older if self.check(v) is None]
                if not whole:
                    damaged = f" ({len(older)} damaged)" if older else ""
                    raise StoreError(f"no older kept version to roll back to{damaged}")
                version = whole[-1]
            elif version not in kept:
                raise StoreError(f"model version {version} is not kept (kept: {kept})")
            elif problem := self.check(version):
                raise StoreError(f"refusing to roll back to a damaged version: {problem}")
            self._point_current(version)
        return version

    def _point_current(self, version: int) -> None:
        tmp = self.root / f"{TMP_PREFIX}current"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(version_name(version), tmp)
        os.replace(tmp, self.root / "current")
        fsync_path(self.root)

    def _prune(self) -> None:
        """Keeps the newest `keep_versions`, and always the one `current` points to."""
        current = self.current()
        for version in self.versions()[: -self.keep_versions]:
            if version != current:
                # Renamed first, so a crash mid-delete leaves a .tmp- leftover, not a
                # half-deleted version under a valid name.
                doomed = self.root / f"{TMP_PREFIX}{version_name(version)}-deleted"
                try:
                    os.rename(self.path(version), doomed)
                    shutil.rmtree(doomed)
                except OSError as exc:
                    # Housekeeping only (a version left root-owned by hand, say): the save
                    # that pruned has succeeded and must be reported as such.
                    log.warning("cannot remove old version %s: %s", version_name(version), exc)
