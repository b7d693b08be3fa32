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
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import modelfile
from .common import modelmeta
from .common.files import TMP_PREFIX, fsync_path, locked, write_atomic
from .common.modelmeta import METADATA, MetaError, ModelMeta

if TYPE_CHECKING:
    from .common.config import Config

_VERSION = re.compile(r"^v(\d{6,})$")

log = logging.getLogger(__name__)


def _last_allocated(counter: Path) -> int:
    """The number in `.last_version`, 0 if there is none yet. A damaged one (a hand edit,
    a disk that lies) is a warning naming it, and the versions on disk number the next
    version: failing every cycle on it would block training until someone read the
    traceback. Retention keeps the newest versions, so only a number allocated to a
    cycle that failed, or to a version deleted by hand, can come again."""
    try:
        raw = counter.read_bytes()
    except FileNotFoundError:
        return 0
    if raw.strip().isdigit():  # ASCII digits only, as bytes
        return int(raw)
    log.warning(
        "%s: expected the highest version number allocated, got %r; numbering after the "
        "versions on disk, and rewriting it",
        counter,
        raw[:40],
    )
    return 0


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


class ModelStore:
    def __init__(self, root: Path, keep_versions: int):
        # Created by the first allocate(), not here: reading commands create nothing.
        self.root = root
        self.keep_versions = keep_versions

    @classmethod
    def of(cls, cfg: Config) -> ModelStore:
        """The store of the configured model: <state_dir>/models/<model.name>."""
        return cls(cfg.state_dir / "models" / cfg.model.name, cfg.model.keep_versions)

    def lock(self) -> contextlib.AbstractContextManager[bool]:
        return locked(self.root / ".lock")

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

    def metadata(self, version: int) -> ModelMeta:
        """The version's metadata.json, every field checked; StoreError names the file and
        the field that fails (check() names it the same way)."""
        path = self.path(version) / METADATA
        try:
            return modelmeta.load(path)
        except FileNotFoundError:
            raise StoreError(f"model version {version} does not exist") from None
        except MetaError as exc:
            raise StoreError(f"{path}: {exc}") from None

    def metadata_json(self, version: int) -> Any:
        """metadata.json as the file has it, unchecked: `models show --json` shows a
        damaged one too, for the operator to see what is wrong."""
        path = self.path(version) / METADATA
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"model version {version} does not exist") from None
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"{path}: not JSON: {exc}") from None

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
            version = max([_last_allocated(counter), *self.versions()]) + 1
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
