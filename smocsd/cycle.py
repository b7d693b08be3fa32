"""One training cycle, end to end: the cycle lock, a child process that calls the five
hooks, cleanup of a half-built version, the job's state, and the result in the outbox.

The daemon never imports numpy, ONNX Runtime or a user's job: the hooks run in a child
process started per cycle (multiprocessing "spawn": a fresh interpreter that inherits no
lock, thread or socket of the daemon). A crash, an OOM kill or a hang there becomes a
`failed` result naming the cause, never a dead daemon, and the memory training needed
goes back to the system when the child exits. `train-once` runs the very same function.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .config import Config
from .files import locked
from .job import CycleProgress, Saved, Stopped, TrainingJob
from .outbox import Outbox
from .schemas import RESULT_SCHEMA
from .state import CycleRecord, State, utcnow
from .store import ModelStore, StoreError

# The child reports that it is alive at most this often (it is called every batch).
ALIVE_EVERY = 1.0
# After SIGTERM the child stops at its next batch; one that does not (stuck in a long
# read) is killed after this, well inside the unit's TimeoutStopSec=30s.
STOP_GRACE = 15.0

log = logging.getLogger(__name__)


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


def cycle_lock(state_dir: Path) -> contextlib.AbstractContextManager[bool]:
    """One cycle at a time per state_dir (the daemon and a manual train-once may race):
    whether this one may run; a cycle already running makes this one a skip, not a wait."""
    return locked(state_dir / "cycle.lock", wait=False)


# --- the hooks (in the child)


def load_job_class(spec: str) -> type[TrainingJob]:
    """'autoencoder' or 'package.module:ClassName' -> the TrainingJob subclass."""
    if spec == "autoencoder":
        from .autoencoder import AutoencoderJob

        return AutoencoderJob
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ValueError(f"training.job: cannot import {module_name!r}: {exc}") from None
    except AttributeError:
        raise ValueError(f"training.job: {module_name!r} has no {class_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, TrainingJob)):
        raise ValueError(f"training.job: {spec!r} is not a TrainingJob subclass")
    return cls


class JobLoadFailed(Exception):
    """Loading `training.job` failed for a reason that is not the configuration's: too
    little memory (a MemoryError, a library that cannot map itself, the OOM killer), a
    crash while importing. A runtime failure, exit 1, which systemd restarts: exit 78
    would leave the service dead after a start at a moment when memory was short."""


def _job_problem(spec: str, conn: Connection) -> None:
    try:
        load_job_class(spec)
    except ValueError as exc:  # no such module or class: the configuration's fault
        conn.send(str(exc))
    except Exception as exc:
        # The first cause says why: numpy wraps the loader's "failed to map segment" (no
        # memory left to map OpenBLAS) in an ImportError whose text is a page of advice.
        while exc.__cause__ is not None or exc.__context__ is not None:
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        conn.send(JobLoadFailed(f"training.job: loading {spec!r} failed: {error_line(exc)}"))
    else:
        conn.send(None)


def job_problem(spec: str) -> str | None:
    """Why `training.job` cannot be loaded (None: it can). Tried in a child process, so
    that the daemon checks its config at start without importing the job's libraries.

    Raises JobLoadFailed when the child failed for another reason than the configuration.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_job_problem, args=(spec, sender), name="smocsd-check-job")
    child.start()
    sender.close()
    try:
        answer = receiver.recv()
    except EOFError:  # it died importing: OpenBLAS out of memory exits, the OOM killer kills
        child.join()
        cause = _exit_cause(child.exitcode).removeprefix("training process ")
        raise JobLoadFailed(f"training.job: the process loading {spec!r} {cause}") from None
    finally:
        child.join()
        receiver.close()
    if isinstance(answer, JobLoadFailed):
        raise answer
    return answer


class HookError(Exception):
    """A hook returned something the cycle cannot publish."""


def _mapping(value: Any, hook: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise HookError(f"{hook}() returned {type(value).__name__}, not a dict with str keys")
    return value


def _saved(value: Any) -> Saved:
    """save_model's return value, checked: a Saved, a dict of its keys (the contract's
    first form) or None (promoted, no version); each wrong field is a HookError naming it."""
    if value is None:
        return Saved()
    if not isinstance(value, Saved):
        given = _mapping(value, "save_model")
        unknown = set(given) - {f.name for f in fields(Saved)}
        if unknown:
            raise HookError(f"save_model() returned unknown key(s) {', '.join(sorted(unknown))}")
        value = Saved(**given)
    if value.outcome not in (Outcome.PROMOTED.value, Outcome.REJECTED.value):
        raise HookError(
            f"save_model() returned outcome {value.outcome!r}: 'promoted' or 'rejected'"
        )
    version = value.version
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise HookError(f"save_model() returned version {version!r}, not an integer")
    _mapping(value.model_meta, "save_model model_meta")
    return value


def call_hooks(
    cfg: Config, *, force: bool, progress: CycleProgress, job_state: dict[str, Any] | None
) -> CycleResult:
    """The five hooks in order, in this process; any exception is a `failed` result and
    only Stopped propagates. This is the child's work; bench/ calls it directly."""
    from .sources import NoDatabase, open_source  # numpy: the child's import, not the daemon's

    source = open_source(cfg.source)
    job: TrainingJob | None = None
    try:
        job_class = load_job_class(cfg.training.job)
        job = job_class(
            cfg,
            source,
            cfg.state_dir,
            logging.getLogger(f"smocsd.job.{cfg.model.name}"),
            progress=progress,
            force=force,
            state=job_state,
        )
        progress.ping()
        data = job.get_training_data()
        if data is None:
            return CycleResult(
                Outcome.SKIPPED,
                reason=job.skip_reason,
                job_state=job.state,
                labels=job.label_messages,
            )
        progress.ping()
        metrics = _mapping(job.train_model(data), "train_model")
        del data  # the job may still hold what eval needs; the cycle holds nothing
        progress.ping()
        eval_results = _mapping(job.eval_model(), "eval_model")
        progress.ping()
        saved = _saved(job.save_model(metrics, eval_results))
        outcome = Outcome(saved.outcome)
        screened = job.state.get("screened")
        if outcome is Outcome.PROMOTED and screened:
            # The accepted rows it trained on are normal to the current model now: no
            # accept label it knew is pending any more (smocsd/screen.py).
            screened["accepted_through"] = screened.get("accept_known", 0)
        return CycleResult(
            outcome,
            saved.version,
            metrics,
            eval_results,
            saved.model_meta,
            # The built-in job records its result's id in metadata.json, so a result
            # enqueued again from the store (reconcile) carries the same message_id.
            message_id=saved.model_meta.get("result_id") or str(uuid.uuid4()),
            job_state=job.state,
            labels=job.label_messages,
        )
    except NoDatabase as exc:
        return CycleResult(Outcome.SKIPPED, reason=str(exc))
    except Exception as exc:
        log.debug("cycle failed", exc_info=True)
        return CycleResult(
            Outcome.FAILED,
            getattr(job, "version", None),
            error=error_line(exc),
            labels=job.label_messages if job is not None else [],
        )
    finally:
        source.close()


def _die_with(parent: int) -> None:
    """Has the kernel SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG).

    The cycle lock dies with the parent, so an orphan must not go on building a version
    beside the next cycle; a kill at any instant is safe for the store's save protocol.
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)


def _child(
    cfg: Config,
    force: bool,
    job_state: dict[str, Any] | None,
    conn: Connection,
    parent: int,
) -> None:
    """The child process: runs the hooks and sends ("alive" | "status" | "result" |
    "stopped", value) messages to the daemon."""
    from .systemd import configure_logging

    _die_with(parent)
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stop.append(signum))
    configure_logging(cfg.daemon.log_level)
    last = [0.0]

    def alive() -> None:
        now = time.monotonic()
        if now - last[0] >= ALIVE_EVERY:
            last[0] = now
            conn.send(("alive", None))

    progress = CycleProgress(
        should_stop=lambda: bool(stop),
        ping=alive,
        status=lambda text: conn.send(("status", text)),
    )
    try:
        result = call_hooks(cfg, force=force, progress=progress, job_state=job_state)
    except Stopped:
        conn.send(("stopped", None))
        return
    conn.send(("result", result))


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? see `journalctl -k`)" if exitcode == -signal.SIGKILL else ""
        return f"training process was killed by {name}{hint}"
    if exitcode:
        return f"training process exited with status {exitcode}"
    return "training process ended without a result"


def _in_child(
    cfg: Config,
    force: bool,
    job_state: dict[str, Any] | None,
    should_stop: Callable[[], bool],
    on_alive: Callable[[], None],
    on_status: Callable[[str], None],
) -> CycleResult:
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child,
        args=(cfg, force, job_state, sender, os.getpid()),
        name="smocsd-cycle",
        daemon=True,
    )
    child.start()
    sender.close()  # so that recv() sees EOF once the child is gone
    stall = cfg.training.stall_timeout
    result: CycleResult | None = None
    heard = time.monotonic()
    stop_sent: float | None = None
    stalled = False
    while True:
        # The daemon's loop is alive while it waits here, so it feeds the watchdog on
        # every turn; the child is watched by the stall timeout, which kills it.
        on_alive()
        try:
            if receiver.poll(0.5):
                kind, value = receiver.recv()
                heard = time.monotonic()
                if kind == "status":
                    on_status(value)
                elif kind == "result":
                    result = value
            elif not child.is_alive():
                break
        except EOFError:
            break
        except KeyboardInterrupt:  # train-once at a terminal: stop as on SIGTERM
            stop_sent = stop_sent or _terminate(child)
        now = time.monotonic()
        if stop_sent is None and should_stop():
            stop_sent = _terminate(child)
        elif stop_sent is not None and now - stop_sent > STOP_GRACE:
            child.kill()
        elif not stalled and stop_sent is None and now - heard > stall:
            log.error("training made no progress for %.0fs (training.stall_timeout)", stall)
            child.kill()
            stalled = True
    child.join()
    receiver.close()
    if result is not None:  # a result that was saved counts, even if a stop came after
        return result
    if stop_sent is not None:
        raise Stopped()
    if stalled:
        error = f"training made no progress for {stall:.0f}s (training.stall_timeout): killed"
    else:
        error = _exit_cause(child.exitcode)
    return CycleResult(Outcome.FAILED, error=error)


def _terminate(child: multiprocessing.process.BaseProcess) -> float:
    """Asks the child to stop at its next batch; returns when it was asked."""
    child.terminate()
    return time.monotonic()


# --- the cycle (in the daemon, or in train-once)


def _record(cfg: Config, outbox: Outbox, result: CycleResult) -> bool:
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
    job = None if result.job_state is None else (cfg.model.name, result.job_state)
    try:
        State(cfg.state_dir).update(job=job, last_cycle=last_cycle)
    except OSError as exc:
        log.error("state not saved: %s", exc)
    return queued


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
    """
    with cycle_lock(cfg.state_dir) as held:
        if not held:
            return CycleResult(Outcome.SKIPPED, reason="another training cycle is running"), True
        entry = State(cfg.state_dir).read().jobs.get(cfg.model.name)
        job_state = None if entry is None else entry.to_json()
        result: CycleResult | None = None
        try:
            result = _in_child(cfg, force, job_state, should_stop, on_alive, on_status)
        finally:
            if result is None or result.outcome is Outcome.FAILED:
                # The child died or failed mid-build: its half-built version goes now,
                # under the cycle lock that no other cycle holds.
                for leftover in ModelStore.of(cfg).recover():
                    log.info("removed %s left by the failed cycle", leftover)
        level = logging.ERROR if result.outcome is Outcome.FAILED else logging.INFO
        log.log(level, "%s", result.describe())
        return result, _record(cfg, outbox, result)


def _recovered(cfg: Config, store: ModelStore, version: int) -> CycleResult | None:
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


def reconcile(cfg: Config, outbox: Outbox) -> int:
    """The model store is the truth: enqueues the result of every kept version that has
    none in the outbox (a crash or a full disk between save and enqueue). Returns how
    many; under the cycle lock, so a running cycle's own result is never doubled."""
    store = ModelStore.of(cfg)
    enqueued = 0
    with cycle_lock(cfg.state_dir) as held:
        if not held:
            return 0
        reported = outbox.reported(cfg.model.name)
        for version in store.versions():
            if version in reported:
                continue
            result = _recovered(cfg, store, version)
            if result is None:
                continue
            outbox.put(result.message(cfg))
            enqueued += 1
            log.warning(
                "v%d had no result in the outbox (lost between save and enqueue): enqueued it",
                version,
            )
    return enqueued
