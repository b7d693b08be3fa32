"""The training child: a process started per cycle (multiprocessing "spawn": a fresh
interpreter that inherits no lock, thread or socket of the daemon) that calls the hooks
(smocsd/training/hooks.py), supervised from the daemon: its liveness, its status lines, the stall
timeout, a stop request, and its death, which becomes a `failed` result naming the cause.

The same supervision loads `training.job` in a short-lived child when the daemon checks
its config, so that the daemon never imports the job's libraries.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..common.config import Config
from ..training.hooks import call_hooks, load_job_class
from ..training.job import CycleProgress, Stopped
from ..training.result import CycleResult, Outcome, error_line

# The child reports that it is alive at most this often (it is called every batch).
ALIVE_EVERY = 1.0
# After SIGTERM the child stops at its next batch; one that does not (stuck in a long
# read) is killed after this, well inside the unit's TimeoutStopSec=30s.
STOP_GRACE = 15.0

log = logging.getLogger(__name__)


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
        cause = exit_cause(child.exitcode).removeprefix("training process ")
        raise JobLoadFailed(f"training.job: the process loading {spec!r} {cause}") from None
    finally:
        child.join()
        receiver.close()
    if isinstance(answer, JobLoadFailed):
        raise answer
    return answer


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


def exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? see `journalctl -k`)" if exitcode == -signal.SIGKILL else ""
        return f"training process was killed by {name}{hint}"
    if exitcode:
        return f"training process exited with status {exitcode}"
    return "training process ended without a result"


def in_child(
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
        error = exit_cause(child.exitcode)
    return CycleResult(Outcome.FAILED, error=error)


def _terminate(child: multiprocessing.process.BaseProcess) -> float:
    """Asks the child to stop at its next batch; returns when it was asked."""
    child.terminate()
    return time.monotonic()
