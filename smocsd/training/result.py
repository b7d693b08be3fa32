"""What a training cycle comes to: its Outcome, the CycleResult the child sends back and
the daemon records, and the training result message it publishes (smocsd/app/cycle.py runs
the cycle).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..common.config import Config
from ..common.state import utcnow
from ..schemas import RESULT_SCHEMA


class Outcome(str, Enum):
    PROMOTED = "promoted"
    REJECTED = "rejected"  # trained and saved, but not better than the current model
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to do this tick; never published


@dataclass
class CycleResult:
    outcome: Outcome
    version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    model_meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # failed: one line naming the cause
    reason: str | None = None  # skipped
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timestamp: str = field(default_factory=utcnow)
    recovered: bool = False  # enqueued from the model store after the original was lost
    job_state: dict[str, Any] | None = None  # to commit; None keeps the previous state
    labels: list[dict[str, Any]] = field(default_factory=list)  # label messages to publish

    def message(self, cfg: Config) -> dict[str, Any]:
        """The object published (and printed by train-once)."""
        if self.outcome is Outcome.SKIPPED:
            return {"outcome": self.outcome.value, "reason": self.reason}
        message: dict[str, Any] = {
            "schema": RESULT_SCHEMA,
            "message_id": self.message_id,
            "device_id": cfg.daemon.device_id,
            "model": cfg.model.name,
            "version": self.version,
            "outcome": self.outcome.value,
            "timestamp": self.timestamp,
            "metrics": self.metrics,
            "eval": self.eval,
            "model_meta": self.model_meta,
        }
        if self.error is not None:
            message["error"] = self.error
        if self.recovered:
            message["recovered"] = True
        return message

    def describe(self) -> str:
        """One log line."""
        if self.outcome is Outcome.SKIPPED:
            return f"skipped: {self.reason}"
        version = f" v{self.version}" if self.version is not None else ""
        detail = self.error or ", ".join(
            f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, float)
        )
        return f"{self.outcome.value}{version}: {detail}" if detail else self.outcome.value


def error_line(exc: BaseException) -> str:
    """An exception as one log or result line: its type and the first line of its text."""
    return (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
