"""state_dir/state.json: what smocsd remembers between cycles and shows in `status`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .store import remove_temp_files, write_atomic

log = logging.getLogger(__name__)


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class State:
    """The daemon and manual commands share the file: writes are read-modify-write under
    state.lock, each an atomic replace, so a crash or a full disk leaves the old file."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "state.json"

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            log.error("%s: unreadable, starting from empty state", self.path)
            return {}
        if not isinstance(data, dict):
            log.error("%s: not a JSON object, starting from empty state", self.path)
            return {}
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name("state.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def update(self, job: tuple[str, dict[str, Any]] | None = None, **changes: Any) -> None:
        """Sets the top-level `changes` and, given `job` (model name, its state), that
        one job's entry in `jobs`, leaving the other models' entries as they are."""
        with self._locked():
            data = self.read()
            data.update(changes)
            if job is not None:
                data["jobs"] = {**data.get("jobs", {}), job[0]: job[1]}
            write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode())

    def remove_leftovers(self) -> list[str]:
        """Temp files of writes a crash interrupted; under the lock, so never a live one."""
        with self._locked():
            return remove_temp_files(self.path)
