"""A cycle's result recorded: its messages into the outbox, then the job's state; and the
result of a saved version rebuilt from the model store when the original was lost.
"""

from __future__ import annotations

import logging

from ..common.config import Config
from ..common.state import CycleRecord, State, utcnow
from ..delivery.outbox import Outbox
from ..store import ModelStore, StoreError
from ..training.result import CycleResult, Outcome

log = logging.getLogger(__name__)


def record(cfg: Config, outbox: Outbox, result: CycleResult) -> bool:
    """Result to the outbox first, then the job's state: a crash in between retrains on
    the same rows, which is harmless, while the other order could lose a result.

    Returns whether the result is durable; a full or read-only disk is logged, not raised,
    and reconcile() enqueues a saved version's result once the disk takes it again.
    """
    queued = True
    # Labels the cycle made (model.accept_after) are in labels.json already; their
    # messages go first, so a consumer learns of the label before of the model it made.
    for message in result.labels:
        try:
            outbox.put(message)
        except Exception as exc:
            log.error("label message not queued: %s", exc)
    if result.outcome is not Outcome.SKIPPED:
        try:
            outbox.put(result.message(cfg))
        except Exception as exc:
            log.error("result not queued: %s", exc)
            queued = False
    last_cycle = CycleRecord(
        at=utcnow(),
        outcome=result.outcome.value,
        version=result.version,
        reason=result.reason or None,
        error=result.error or None,
    )
    try:
        State(cfg.state_dir).update(
            model=cfg.model.name, job=result.job_state, last_cycle=last_cycle
        )
    except OSError as exc:
        log.error("state not saved: %s", exc)
    return queued


def recovered(cfg: Config, store: ModelStore, version: int) -> CycleResult | None:
    """The result of a saved version, rebuilt from its metadata.json (None: saved by a
    release that did not record result ids, so its result went out then)."""
    try:
        meta = store.metadata(version)
    except StoreError as exc:
        return CycleResult(Outcome.FAILED, version, error=str(exc), recovered=True)
    if meta.result_id is None or meta.outcome is None:
        return None
    return CycleResult(
        Outcome(meta.outcome),
        version,
        meta.metrics,
        meta.eval,
        meta.to_json(),
        message_id=meta.result_id,
        timestamp=meta.created_at,
        recovered=True,
    )
