"""The daemon: a lean loop of timer, outbox, publishing and sd_notify; each training cycle
runs in a child process (smocsd/app/child.py).

Signals only set flags; the loop acts on them between steps, so a stop never interrupts
the store's atomic save and a reload never races a cycle. Nothing raised in a tick ends
the loop: it is logged once, and the next tick comes after a backoff, so a full or
read-only disk is survived and recovered from without a restart.
"""

from __future__ import annotations

import logging
import random
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common import config as config_mod
from ..common.config import Config, ConfigError
from ..common.labels import LabelError, Labels
from ..common.state import CycleRecord, State, utc, utcnow
from ..delivery.outbox import Outbox
from ..delivery.publish import Publisher
from ..store import ModelStore
from ..training.job import Stopped
from ..training.result import CycleResult, Outcome, error_line
from . import cycle, metrics, systemd
from .gates import Gates
from .modelset import ModelSet

if TYPE_CHECKING:  # numpy and onnxruntime: imported only when scoring is on
    from .live import Scoring

log = logging.getLogger("smocsd")

# Backoff after failed ticks: check_interval doubled per failure in a row, up to this
# (or check_interval, if longer), so a broken disk neither storms the journal nor
# delays recovery by more than ten minutes once it is fixed.
MAX_BACKOFF = 600.0


class Parts:
    """What one configuration builds; rebuilt on reload.

    The outbox opens on first use, not here: a state directory that is read-only or
    full at start must not stop the daemon, which retries at every tick. `tally` holds
    the daemon's counts, which outlive a reload's new Parts.
    """

    def __init__(self, cfg: Config, tally: metrics.Tally | None = None) -> None:
        self.cfg = cfg
        self.publisher = Publisher(cfg.publish, cfg.daemon.device_id)
        self.metrics = metrics.Metrics(cfg, tally if tally is not None else metrics.Tally())
        metrics.count_deliveries(self.publisher, self.metrics.tally)
        self._outbox: Outbox | None = None
        # Results the last flush left in the outbox (None: no flush yet, so all of them):
        # what a failed delivery held back. Their delivery is news; that of a result at its
        # first try (every cycle's, every alarm's) is a DEBUG line, or the journal would
        # have two lines a cycle.
        self._held: int | None = None

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            config_mod.make_state_dir(self.cfg)
            self._outbox = Outbox(self.cfg.state_dir / "outbox.db", self.cfg.publish.outbox_max)
        return self._outbox

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.close()

    def flush(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        outbox = self.outbox
        waiting = len(outbox)
        held = waiting if self._held is None else min(self._held, waiting)
        if waiting:
            # should_stop also inside each sink's attempt: the daemon's feeds the watchdog,
            # and one attempt may outlast WatchdogSec (publish.*.timeout up to 15 min).
            attempt = self.publisher.attempt(should_stop)
            delivered = outbox.flush(attempt, should_stop=should_stop)
            waiting = len(outbox)
            if delivered:
                level = logging.INFO if held else logging.DEBUG
                log.log(level, "delivered %d result(s); %d waiting", delivered, waiting)
        self._held = waiting

    def cycle(
        self,
        model: Config | None = None,
        *,
        force: bool = False,
        should_stop: Callable[[], bool] = lambda: False,
        on_alive: Callable[[], None] = lambda: None,
        on_status: Callable[[str], None] = lambda text: None,
    ) -> tuple[CycleResult, bool]:
        """Results waiting go out first, lost ones are recovered from the store, then one
        cycle of `model` (None: the configuration itself, a single model), whose result is
        durable in the outbox before its delivery is tried."""
        model = model or self.cfg
        self.flush(should_stop)
        if should_stop():  # asked mid-flush: no cycle to start
            raise Stopped()
        cycle.reconcile(model, self.outbox)
        started = time.monotonic()
        result, queued = cycle.run(
            model,
            self.outbox,
            force=force,
            should_stop=should_stop,
            on_alive=on_alive,
            on_status=on_status,
        )
        self.metrics.tally.cycle_ended(model.model.name, result.outcome, time.monotonic() - started)
        if result.outcome is not Outcome.SKIPPED:
            self.flush(should_stop)
        return result, queued


def prepare_state_dir(cfg: Config) -> None:
    """Removes what a crash left behind in the state directory (the command made it:
    config.make_state_dir).

    Only under the cycle lock: while another process (a manual train-once) runs a
    cycle, its half-built version is work in progress, not a leftover.
    """
    for leftover in (
        State(cfg.state_dir).remove_leftovers() + Labels(cfg.state_dir).remove_leftovers()
    ):
        log.warning("removed %s left by an interrupted write", leftover)
    for model in ModelSet(cfg).resolve(read_table=False):
        if not ModelStore.of(model).root.is_dir():  # nothing saved, nothing to recover
            continue
        with cycle.cycle_lock(model) as locked:
            for leftover in ModelStore.of(model).recover() if locked else ():
                log.warning("removed %s left by an interrupted save", leftover)


class Daemon:
    def __init__(self, config_path: Path, cfg: Config):
        self.config_path = config_path
        self.parts = Parts(cfg, metrics.Tally.resume(cfg.state_dir))
        self.watchdog = systemd.Watchdog()
        self.stop_requested = False
        self.reload_requested = False
        self.last: str = "no check yet"
        # Failed results the outbox could not take (disk full); tried again every tick.
        # A saved version's result needs no place here: reconcile() finds it in the store.
        self.unsent: list[dict[str, Any]] = []
        self.failures = 0  # ticks in a row that raised
        self.errors: dict[str, str] = {}  # the error each step of the loop last logged
        self.modelset = ModelSet(cfg)
        self.models: list[Config] = self.modelset.resolve(read_table=False)
        self.gates = Gates(cfg)
        self.trained_last: str | None = None  # the model whose cycle ran last
        self.reconciled = False  # every model's store reconciled with the outbox
        self.waits_said: dict[str, set[str]] = {}  # per model, the kinds of wait logged
        self.scorer = self._scorer(cfg)
        if self.scorer is not None:
            self.scorer.set_models(self.models)

    @staticmethod
    def _scorer(cfg: Config) -> Scoring | None:
        """Live scoring, if any model has it on: only then does the daemon load numpy and
        onnxruntime. Its models are set after each resolution (set_models)."""
        if not any(d.scoring.enabled for d in cfg.definitions()):
            return None
        from .live import Scoring

        return Scoring(cfg)

    def _score(self) -> None:
        """A scoring step of the tables that are due; alarm events go out at once. An
        error of one table or model is Scoring's to say, and stops none of the others."""
        if self.scorer is None or not self.scorer.due():
            return
        tally = self.parts.metrics.tally
        alarms = 0
        for s in self.scorer.step(self.parts.outbox):
            tally.scored(s.name, s.alarms, s.was_open, s.is_open, scoring=s.scoring)
            alarms += s.alarms
        if alarms:
            self.parts.flush(self._should_stop)

    def _alive(self) -> None:
        """Called every turn of the idle wait and of the wait for a cycle's training
        child: the loop is alive, and scoring goes on, so an alarm never waits for
        training to end."""
        self.watchdog.ping()
        self._guarded("scoring", self._score)
        if self.scorer is not None and self.parts.metrics.due():  # at most once a second
            self._guarded("metrics", self._write_metrics)

    def _write_metrics(self) -> None:
        """The metrics file, if configured: after every check, and after scoring steps.
        A failure is the guarded step's, logged once, never the loop's."""
        self.parts.metrics.write(lambda: self.parts.outbox, self.scorer, self.models)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        cfg = self.parts.cfg
        log.info("smocsd started: device %s, state in %s", cfg.daemon.device_id, cfg.state_dir)
        systemd.notify("READY=1", "STATUS=starting first check")
        self._guarded("start", lambda: prepare_state_dir(cfg))
        self._guarded("metrics", self._write_metrics)
        try:
            while not self.stop_requested:
                if self.reload_requested:
                    self._reload()
                self._guarded("tick", self._tick)
                self._guarded("metrics", self._write_metrics)
                self._idle()
        except Stopped:
            log.info("stopped mid-cycle; nothing partial was promoted")
        finally:
            systemd.notify("STOPPING=1", "STATUS=stopping")
            self.parts.close()
            self.gates.close()
            self.modelset.close()
            if self.scorer is not None:
                self.scorer.close()
        log.info("smocsd stopped")
        return 0

    def _should_stop(self) -> bool:
        """Asked between the steps of long work (batches of a flush, polls of the
        training child), which is also where the watchdog is fed."""
        self.watchdog.ping()
        return self.stop_requested

    def _guarded(self, name: str, step: Callable[[], None]) -> None:
        """Runs a step of the loop; an exception is logged once (again only when it
        changes), never raised. A failed tick counts for the backoff."""
        try:
            step()
        except Stopped:
            raise
        except Exception as exc:
            error = error_line(exc)
            if self.errors.get(name) != error:
                log.error("%s: %s (retrying with a backoff)", name, error)
                log.debug("traceback", exc_info=True)
            self.errors[name] = error
            if name == "tick":
                self.failures += 1
                self.last = f"error: {error}"
        else:
            if name in self.errors:
                log.info("%s: recovered from: %s", name, self.errors.pop(name))
            if name == "tick":
                self.failures = 0

    def _tick(self) -> None:
        """Every model's gates, and a cycle of each whose gates pass, one training process
        at a time, starting after the model that trained last: with many models, none
        waits more than one round for another's training."""
        outbox = self.parts.outbox
        while self.unsent:
            outbox.put(self.unsent[0])
            self.unsent.pop(0)
        self.parts.flush(self._should_stop)
        self.models = self.modelset.resolve()
        if self.scorer is not None:
            self.scorer.set_models(self.models)
        if not self.reconciled:  # a cycle reconciles its own model; at start, all of them
            for model in self.models:
                cycle.reconcile(model, outbox)
            self.reconciled = True
        names = [m.model.name for m in self.models]
        start = names.index(self.trained_last) + 1 if self.trained_last in names else 0
        trained: list[str] = []
        waiting: dict[str, CycleRecord] = {}
        state = State(self.parts.cfg.state_dir).read()
        try:
            labels = Labels(self.parts.cfg.state_dir).read()
        except LabelError:  # the training process fails on it, naming the file
            labels = []
        due: list[Config] = []
        for model in self.models[start:] + self.models[:start]:
            started = time.monotonic()
            reason = self.gates.waiting(model, state, labels)
            if reason is None:
                due.append(model)
                continue
            self.parts.metrics.tally.cycle_ended(
                model.model.name, Outcome.SKIPPED, time.monotonic() - started
            )
            waiting[model.model.name] = CycleRecord(utcnow(), Outcome.SKIPPED.value, None, reason)
            self.last = reason
        # Not held until the next check: one PostgreSQL connection per model would be more
        # than a server's max_connections (100 by default) at a hundred assets.
        self.gates.close()
        slots = self.parts.cfg.daemon.training_processes
        if slots > 1 and len(due) > 1:
            cycles = self._cycles_at_once(due, slots)
        else:
            cycles = (self._cycle(model) for model in due)
        waits = {name: c.reason or "" for name, c in waiting.items()}
        for model, result, queued in cycles:
            if not queued and result.version is None:
                self.unsent.append(result.message(model))
            self.last = result.reason or result.describe()
            if result.outcome is Outcome.SKIPPED:  # a user job's own gates, or a busy lock
                waits[model.model.name] = result.reason or ""
            else:
                self.trained_last = model.model.name
                trained.append(f"{model.model.name}: {result.describe()}")
        if waiting:  # in one write: one per model and minute would wear an SD card
            State(self.parts.cfg.state_dir).update(skipped=waiting)
        self._say_waits(waits)
        if len(self.models) > 1:
            self.last = f"{len(self.models)} models, {len(waiting)} waiting for data"
            if trained:
                self.last += "; " + "; ".join(trained)

    def _say_waits(self, waits: dict[str, str]) -> None:
        """The models that wait, and why, in one line a check however many they are: at
        INFO those whose kind of wait (its reason, numbers aside) is new since the daemon
        started, the others at DEBUG. A line a minute saying "840 new rows of 1000
        needed", then "841 …", would be most of a gateway's journal and say nothing new;
        `smocsd status` shows the wait as it is now."""
        new: dict[str, str] = {}
        for name, reason in waits.items():
            kind = re.sub(r"\d+(\.\d+)?", "N", reason)
            said = self.waits_said.setdefault(name, set())
            if kind not in said:
                said.add(kind)
                new[name] = reason
        seen = {name: reason for name, reason in waits.items() if name not in new}
        for level, group in ((logging.INFO, new), (logging.DEBUG, seen)):
            if group:
                shown = [f"{name}: skipped: {reason}" for name, reason in list(group.items())[:3]]
                more = f" and {len(group) - 3} more waiting" if len(group) > 3 else ""
                log.log(level, "%s%s", "; ".join(shown), more)

    def _cycle(self, model: Config) -> tuple[Config, CycleResult, bool]:
        """One cycle of `model`, this thread feeding the watchdog and scoring meanwhile."""
        result, queued = self.parts.cycle(
            model,
            should_stop=self._should_stop,
            on_alive=self._alive,
            on_status=lambda text: systemd.notify(f"STATUS={text}"),
        )
        return model, result, queued

    def _cycles_at_once(
        self, models: list[Config], slots: int
    ) -> list[tuple[Config, CycleResult, bool]]:
        """Cycles of `models`, `slots` training processes at a time (daemon.training_processes),
        each supervised by a thread with its own outbox connection (a SQLite connection is
        one thread's); this thread feeds the watchdog and scores meanwhile, and delivers
        once they are all done."""
        cfg = self.parts.cfg

        def run(model: Config) -> tuple[CycleResult, bool, float]:
            started = time.monotonic()
            outbox = Outbox(cfg.state_dir / "outbox.db", cfg.publish.outbox_max)
            try:
                cycle.reconcile(model, outbox)
                result, queued = cycle.run(model, outbox, should_stop=lambda: self.stop_requested)
            finally:
                outbox.close()
            return result, queued, time.monotonic() - started

        with ThreadPoolExecutor(slots, thread_name_prefix="smocsd-cycle") as pool:
            running = {pool.submit(run, model): model for model in models}
            pending = set(running)
            while pending:
                _, pending = wait(pending, timeout=0.5)
                self._alive()
        done = []
        for future, model in running.items():
            result, queued, took = future.result()  # Stopped, if a stop came first
            self.parts.metrics.tally.cycle_ended(model.model.name, result.outcome, took)
            done.append((model, result, queued))
        self.parts.flush(self._should_stop)
        return done

    def _wait(self) -> float:
        interval = self.parts.cfg.daemon.check_interval
        if self.failures:
            interval = min(interval * 2 ** (self.failures - 1), max(interval, MAX_BACKOFF))
        return interval * random.uniform(0.9, 1.1)

    def _idle(self) -> None:
        # The monotonic clock: a wall-clock jump (NTP after boot, a reset RTC) neither
        # stalls the timer nor makes it fire in a storm.
        wait = self._wait()
        deadline = time.monotonic() + wait
        when = utc(time.time() + wait)
        state = State(self.parts.cfg.state_dir)
        self._guarded("next check", lambda: state.update(next_check=when))
        status = f"idle: next check {when}, {self.last}{self._waiting()}"
        systemd.notify(f"STATUS={status}")
        step = min(1.0, self.scorer.poll_interval) if self.scorer else 1.0
        while not (self.stop_requested or self.reload_requested) and time.monotonic() < deadline:
            self._alive()
            time.sleep(min(step, max(0.0, deadline - time.monotonic())))

    def _waiting(self) -> str:
        """The status line's word on results not delivered yet."""
        try:
            queued = len(self.parts.outbox)
        except Exception:  # the outbox cannot be read now: the tick has logged why
            queued = 0
        waiting = f", {queued} result(s) in outbox" if queued else ""
        if self.unsent:
            waiting += f", {len(self.unsent)} result(s) not yet in the outbox"
        return waiting

    @staticmethod
    def _retire(old: metrics.Metrics) -> None:
        """A metrics file the new configuration no longer writes goes: node_exporter
        would go on serving its numbers, frozen."""
        try:
            old.remove()
        except OSError as exc:
            log.warning("metrics: old file not removed: %s", exc)

    def _reload(self) -> None:
        self.reload_requested = False
        systemd.notify("RELOADING=1")
        try:
            cfg = config_mod.load(self.config_path)
            config_mod.make_state_dir(cfg)
            parts = Parts(cfg, self.parts.metrics.tally)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running config: %s", problem)
        except Exception as exc:
            log.error("reload refused, keeping the running config: %s", exc)
        else:
            self.parts.close()
            self.gates.close()
            self.modelset.close()
            if parts.metrics.path != self.parts.metrics.path:
                self._retire(self.parts.metrics)
            self.parts = parts
            self.modelset, self.gates = ModelSet(cfg), Gates(cfg)
            self.reconciled = False
            if self.scorer is not None:
                self.scorer.close()  # saves where its models stand
            self.scorer = self._scorer(cfg)
            if self.scorer is not None:  # the next tick adds the partitions new in the table
                self.scorer.set_models(self.modelset.resolve(read_table=False))
            systemd.configure_logging(cfg.daemon.log_level)
            for warning in cfg.warnings:
                log.warning("%s", warning)
            log.info("configuration reloaded from %s", self.config_path)
        systemd.notify("READY=1")
