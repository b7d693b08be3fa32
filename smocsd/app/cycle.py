"""One training cycle, end to end: the cycle lock, the job's state read, a child process
that calls the five hooks (smocsd/app/child.py supervises it, smocsd/training/hooks.py calls them),
cleanup of a half-built version, then the result in the outbox and the job's state
(smocsd/app/recording.py); and, before a cycle, the results of saved versions that never
reached the outbox.

The daemon never imports numpy, ONNX Runtime or a user's job: the hooks run in a child
process started per cycle (multiprocessing "spawn": a fresh interpreter that inherits no
lock, thread or socket of the daemon). A crash, an OOM kill or a hang there becomes a
`failed` result naming the cause, never a dead daemon, and the memory training needed
goes back to the system when the child exits. `train-once` runs the very same function.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..common.config import Config
from ..common.files import locked
from ..common.records import number_or_none
from ..common.state import State
from ..delivery.outbox import Outbox
from ..store import ModelStore
from ..training.result import CycleResult, Outcome
from .child import in_child
from .recording import record, recovered

log = logging.getLogger(__name__)


def slot_lock(state_dir: Path, slot: int) -> Path:
    """The lock of training slot `slot` (0 is the only one by default)."""
    return state_dir / ("cycle.lock" if slot == 0 else f"cycle-{slot + 1}.lock")


@contextlib.contextmanager
def cycle_lock(cfg: Config) -> Iterator[bool]:
    """Whether a cycle of this model may run: one at a time per model (the daemon and a
    manual train-once may race), and at most `daemon.training_processes` of any model
    per state_dir (each training process takes a small gateway's memory); a cycle already
    running makes this one a skip, not a wait. The model's lock is its store directory's."""
    store = ModelStore.of(cfg).root
    store.mkdir(parents=True, exist_ok=True)
    with locked(store, wait=False) as mine:
        if mine:
            for slot in range(cfg.daemon.training_processes):
                with locked(slot_lock(cfg.state_dir, slot), wait=False) as held:
                    if held:
                        yield True
                        return
        yield False


def run(
    cfg: Config,
    outbox: Outbox,
    *,
    force: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    on_alive: Callable[[], None] = lambda: None,
    on_status: Callable[[str], None] = lambda text: None,
) -> tuple[CycleResult, bool]:
    """One cycle: (its result, whether the result is durable in the outbox).

    Raises Stopped when `should_stop` turned true (or Ctrl-C came) before a result.
    Logs the cycle's one line, except a skip's: the caller says that (the daemon once per
    kind of wait, train-once in its output).
    """
    started = time.monotonic()
    with cycle_lock(cfg) as held:
        if not held:
            return CycleResult(Outcome.SKIPPED, reason="another training cycle is running"), True
        entry = State(cfg.state_dir).read().jobs.get(cfg.model.name)
        job_state = None if entry is None else entry.to_json()
        result: CycleResult | None = None
        try:
            result = in_child(cfg, force, job_state, should_stop, on_alive, on_status)
        finally:
            if result is None or result.outcome is Outcome.FAILED:
                # The child died or failed mid-build: its half-built version goes now,
                # under the cycle lock that no other cycle holds.
                for leftover in ModelStore.of(cfg).recover():
                    log.info("removed %s left by the failed cycle", leftover)
        if result.outcome is Outcome.FAILED:
            log.error("%s: %s", cfg.model.name, result.describe())
        elif result.outcome is not Outcome.SKIPPED:
            log.info("%s", summary(cfg, result, time.monotonic() - started))
        return result, record(cfg, outbox, result)


def _number(record: Any, key: str) -> float | None:
    """`record[key]` if it is a number: a job's dicts are its own, of any shape."""
    return number_or_none(record.get(key)) if isinstance(record, dict) else None


def summary(cfg: Config, result: CycleResult, seconds: float) -> str:
    """A trained cycle's one log line, of what its result holds: the rows and windows
    (the built-in job's metadata.json), the epochs, the losses, the threshold, the time it
    took. Every epoch and step is a DEBUG line: at INFO the journal of a gateway's SD card
    holds one line a cycle."""
    head = f"{cfg.model.name}: {result.outcome.value}"
    if result.version is not None:
        head += f" v{result.version}"
    why = result.eval.get("rejection")
    why = f"{why}; " if result.outcome is Outcome.REJECTED and isinstance(why, str) else ""
    items = []
    data = result.model_meta.get("data")
    data = data if isinstance(data, dict) else {}
    rows, dropped = _number(data, "rows"), _number(data, "dropped_rows")
    if rows is not None:
        left = _number(data.get("left_out"), "rows")
        aside = [f"{n:.0f} {what}" for n, what in ((dropped, "dropped"), (left, "left out")) if n]
        items.append(f"{rows:.0f} rows" + (f" ({', '.join(aside)})" if aside else ""))
    train, val = _number(data, "train_windows"), _number(data, "val_windows")
    if train is not None and val is not None:
        items.append(f"{train:.0f} training and {val:.0f} validation windows")
    epochs = _number(result.metrics, "epochs_run")
    if epochs is not None:
        # training.epochs is the built-in job's bound for each of its networks; a user
        # job's may be its own.
        t = cfg.training
        networks = t.networks_for(len(cfg.source.channels))
        of = f"/{t.epochs * networks}" if t.job == "autoencoder" else ""
        warm = " (warm start)" if result.metrics.get("warm_started") is True else ""
        items.append(f"{epochs:.0f}{of} epochs{warm}")
    items += [  # duration_s: the training's part of the time the whole cycle took, below
        f"{k} {v:.4g}"
        for k, v in result.metrics.items()
        if isinstance(v, float) and k != "duration_s"
    ]
    threshold = _number(result.eval, "threshold")
    if threshold is not None:
        items.append(f"threshold {threshold:.4g}")
    items.append(f"took {seconds:.1f}s")
    return f"{head}: {why}{', '.join(items)}"


def reconcile(cfg: Config, outbox: Outbox) -> int:
    """The model store is the truth: enqueues the result of every kept version that has
    none in the outbox (a crash or a full disk between save and enqueue). Returns how
    many; under the cycle lock, so a running cycle's own result is never doubled."""
    store = ModelStore.of(cfg)
    enqueued = 0
    if not store.root.is_dir():  # no version yet
        return 0
    with cycle_lock(cfg) as held:
        if not held:
            return 0
        reported = outbox.reported(cfg.model.name)
        for version in store.versions():
            if version in reported:
                continue
            result = recovered(cfg, store, version)
            if result is None:
                continue
            outbox.put(result.message(cfg))
            enqueued += 1
            log.warning(
                "v%d had no result in the outbox (lost between save and enqueue): enqueued it",
                version,
            )
    return enqueued
