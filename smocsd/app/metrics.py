"""Metrics for the operator's monitoring: a Prometheus text file ([metrics] textfile) for
node_exporter's textfile collector, the way Debian gateways export machine metrics.

The daemon alone writes it: after every check (cycle) and, while live scoring runs, after
its steps, at most once a second. Each write replaces the file whole, so node_exporter
reads the previous file or the new one, never a part. What the file says comes from
where it is durable (the model store, the outbox, state.json's scoring position) or from
the daemon's own counts (the `_total` counters), which start again at 0 when the daemon
does: Prometheus' rate() and increase() take such resets in their stride, and
`smocsd_start_time_seconds` says when one happened. Persisting them instead would cost a
state.json write per delivery and still lose the deliveries of `smocsd outbox flush`.

Every metric of a model carries its name (`model="pump@P-3"`), one sample per model; the
daemon's own (outbox, deliveries, start) carry only the device.

The text is prometheus_client's (generate_latest of the families one write gathers), the
file smocsd's own write (write_textfile says why). What that costs, measured against the
hand-written exposition it replaced (prometheus-client 0.26.0, Python 3.11, x86_64): a
`smocsd run` with scoring off, idle after its first cycle, holds 36.6 MB (VmRSS) instead
of 35.1 MB, importing 34 more modules; a write of its one model is 3,406 bytes instead of
3,371, of two partition models with scoring on 6,726 instead of 6,641. The bytes are Go's
float format, which Prometheus reads alike: `1.0` for `1`, `1.7958300001e+09` for
`1795830000.1`. Names, # HELP and # TYPE lines and label sets are as before, labels in
the same order (generate_latest sorts them by name, as ours already were).

Nothing here imports numpy (nor does prometheus_client): the daemon stays lean when
scoring is off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..common.config import Config
from ..common.files import remove_temp_files, write_atomic
from ..common.modelmeta import ModelMeta
from ..common.records import number_or_none
from ..common.state import TIME_FORMAT, CycleRecord, State
from ..delivery.outbox import Outbox
from ..store import ModelStore, StoreError
from ..training.result import Outcome

if TYPE_CHECKING:  # numpy: imported by the daemon only when scoring is on
    from ..delivery.publish import Publisher, Sink
    from .live import Scoring

log = logging.getLogger(__name__)

# Scoring steps come every poll_interval (0.5 s by default); a scrape comes every 15 s or
# more. Once a second keeps the file fresh without an fsync per step.
MIN_INTERVAL = 1.0
# Readable by node_exporter's user (prometheus) whatever the unit's UMask=0027 leaves:
# the file names the device and model and holds numbers, nothing secret.
FILE_MODE = 0o644
# A current version's check (modelfile.check: the sha256 of every file, every weight) is
# kept while its files' stat stays the same, so that ~100 models are not hashed once a
# second; it is redone when it is this old all the same: bit rot (flash wear) changes a
# file's bytes and leaves its inode, size and mtime as they were.
RECHECK_INTERVAL = 3600.0


# --- the text format (Prometheus exposition format 0.0.4, by prometheus_client)


class Snapshot(Collector):
    """The families of one write, each made at its first sample: they come out in that
    order, each with the samples of every model. A family never gets made without one: an
    empty family tells a scraper nothing, and generate_latest would still write its # HELP.

    generate_latest reads it as a Collector of its own, not through the global REGISTRY,
    whose process_, python_gc_ and python_info collectors would add metrics of their own.
    """

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, text: str, value: float, **labels: str) -> None:
        self._add(GaugeMetricFamily, name, text, value, labels)

    def counter(self, name: str, text: str, value: float, **labels: str) -> None:
        """`name` ends in _total, which the family takes off and its sample puts back; no
        `created`: the file would get a smocsd_*_created gauge for every counter."""
        self._add(CounterMetricFamily, name, text, value, labels)

    def _add(
        self,
        kind: type[GaugeMetricFamily | CounterMetricFamily],
        name: str,
        text: str,
        value: float,
        labels: dict[str, str],
    ) -> None:
        family = self._families.get(name)
        if family is None:  # every sample of a family has the same label names
            family = self._families[name] = kind(name, text, labels=list(labels))
        family.add_metric(list(labels.values()), value)

    def collect(self) -> Iterable[Metric]:
        return list(self._families.values())


def write_textfile(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` by files.write_atomic: its temp file (hidden and not
    *.prom, so the collector never reads it) gets mode 0644 and is renamed over `path`.

    Not prometheus_client's write_to_textfile, which (0.26.0, measured) creates the file
    with the umask's mode, 0640 under the unit's UMask=0027, unreadable to node_exporter's
    user; renames it without an fsync (a power loss may leave it empty); and names its temp
    file `<path>.<pid>.<thread>`, which remove_temp_files() would not clear after a kill.

    The directory is not fsync'ed: after a power loss it holds the old file or the new
    one, both whole, and the daemon rewrites it as it starts. Errors name `path`.
    """
    try:
        write_atomic(path, data, mode=FILE_MODE, sync_directory=False)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (metrics.textfile)", str(path)) from None


# --- what the daemon counts


def _epoch(utc: Any) -> float | None:
    """'2026-11-28T04:17:54Z' (state.py's utcnow) as Unix time; None if it is not one."""
    try:
        when = datetime.strptime(utc, TIME_FORMAT)
    except (TypeError, ValueError):
        return None
    return when.replace(tzinfo=timezone.utc).timestamp()


@dataclass
class LastCycle:
    """The last cycle the daemon knows of: its own, or at start state.json's."""

    outcome: Outcome
    ended: float  # Unix time
    duration: float | None  # None: a cycle of an earlier daemon, known from state.json


def _last_cycle(record: CycleRecord | None) -> LastCycle | None:
    """A cycle state.json keeps; None if it holds no outcome and time we know."""
    if record is None:
        return None
    ended = _epoch(record.at)
    try:
        return None if ended is None else LastCycle(Outcome(record.outcome), ended, None)
    except ValueError:  # another release's outcome
        return None


@dataclass
class Tally:
    """What the daemon counts, per model where it is a model's: kept across a reload,
    started anew with the process."""

    started: float = field(default_factory=time.time)
    cycles: Counter[tuple[str, Outcome]] = field(default_factory=Counter)  # (model, outcome)
    delivered: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    alarms_opened: Counter[str] = field(default_factory=Counter)  # per model
    last: dict[str, LastCycle] = field(default_factory=dict)  # per model
    # state.json's top-level last_cycle as a release before [models] tables left it: the
    # cycle of the model named like the top-level model.name (StateFile.last_cycle_of).
    legacy: LastCycle | None = None
    # time.monotonic() when scoring last had every row, per model
    caught_up: dict[str, float] = field(default_factory=dict)

    @classmethod
    def resume(cls, state_dir: Path) -> Tally:
        """A new tally that knows each model's last cycle from state.json, so that the
        file says it before the first cycle of this daemon (which may train for minutes)
        ends."""
        tally = cls()
        try:
            state = State(state_dir).read()
        except OSError:  # unreadable now: the first cycle will tell
            return tally
        for name, record in state.models.items():
            last = _last_cycle(record.last_cycle)
            if last is not None:
                tally.last[name] = last
        tally.legacy = _last_cycle(state.legacy_last_cycle)
        return tally

    def last_of(self, model: str, legacy_owner: str) -> LastCycle | None:
        """`model`'s last cycle; `legacy_owner` (the top-level model.name) owns an older
        release's."""
        last = self.last.get(model)
        if last is None and model == legacy_owner:
            return self.legacy
        return last

    def cycle_ended(self, model: str, outcome: Outcome, duration: float) -> None:
        self.cycles[model, outcome] += 1
        self.last[model] = LastCycle(outcome, time.time(), duration)

    def scored(
        self, model: str, queued: int, was_open: bool, is_open: bool, *, scoring: bool
    ) -> None:
        """After a live scoring step that queued `queued` alarm messages of `model`. Each
        opens or closes an event, so (queued + the change in open events) / 2 of them
        opened one. `scoring`: a model scored, so every row there was is now scored."""
        self.alarms_opened[model] += (queued + int(is_open) - int(was_open)) // 2
        if scoring:
            self.caught_up[model] = time.monotonic()

    def sent(self, sink: str, acked: list[bool]) -> None:
        ok = sum(acked)
        self.delivered[sink] += ok
        self.failed[sink] += len(acked) - ok


class CountedSink:
    """A publish sink whose messages are tallied: acknowledged, or offered to it and not
    acknowledged. Publisher skips a sink that failed for the rest of a flush; the
    messages it was not offered are not counted against it."""

    def __init__(self, sink: Sink, tally: Tally) -> None:
        self.sink, self.tally, self.name, self.said = sink, tally, sink.name, sink.said

    def send(self, messages: list[dict], should_stop: Callable[[], bool]) -> list[bool]:
        try:
            acked = self.sink.send(messages, should_stop)
        except Exception:  # Publisher logs it and counts the messages as not taken
            self.tally.sent(self.name, [False] * len(messages))
            raise
        self.tally.sent(self.name, acked)
        return acked


def count_deliveries(publisher: Publisher, tally: Tally) -> None:
    """Has `tally` count what each of the publisher's sinks delivers and fails."""
    publisher.sinks = [CountedSink(sink, tally) for sink in publisher.sinks]


# --- the current version's check


Signature = tuple[tuple[str, int, int, int], ...] | None


def _signature(directory: Path) -> Signature:
    """The name, inode, size and mtime of each file in a version directory: a file
    replaced, rewritten, truncated, added or removed changes it. None if it cannot be
    listed (the check then says why)."""
    try:
        with os.scandir(directory) as entries:
            found = [(e.name, e.stat()) for e in entries]
    except OSError:
        return None
    return tuple(sorted((name, s.st_ino, s.st_size, s.st_mtime_ns) for name, s in found))


@dataclass(frozen=True)
class Checked:
    """A version's check: its problem (None: whole), the signature of its files before
    it read them, and when (time.monotonic())."""

    version: int
    signature: Signature
    problem: str | None
    at: float

    def holds(self, version: int, signature: Signature, now: float) -> bool:
        """Whether it still says what a check of `version` would: no file's stat changed,
        and it is younger than RECHECK_INTERVAL."""
        return (version, signature) == (self.version, self.signature) and (
            now - self.at < RECHECK_INTERVAL
        )


# --- the part


class Metrics:
    """The metrics of one configuration: gathered from the parts, written to the file."""

    def __init__(self, cfg: Config, tally: Tally) -> None:
        self.cfg = cfg
        self.tally = tally
        self.path = cfg.metrics.textfile
        self._stores: dict[str, ModelStore] = {}
        self._meta: dict[tuple[str, int], ModelMeta | None] = {}  # versions never change
        # The check of each model's current version, and the models logged as damaged: one
        # warning when a model turns damaged, not one a write.
        self._checks: dict[str, Checked] = {}
        self._damaged: set[str] = set()
        self._written = -math.inf  # time.monotonic() of the last write

    def due(self) -> bool:
        """Whether a scoring step should write: a file is configured and the last write
        (or failed attempt) is MIN_INTERVAL old. After a cycle the daemon always writes."""
        return self.path is not None and time.monotonic() - self._written >= MIN_INTERVAL

    def write(
        self, outbox: Callable[[], Outbox], scoring: Scoring | None, models: list[Config]
    ) -> None:
        """Writes the file, if one is configured, with a sample per model of `models` in
        each model's family. Raises OSError naming the file."""
        if self.path is None:
            return
        first = self._written == -math.inf
        self._written = time.monotonic()
        if first:  # The daemon is the file's one writer: a temp file there is a kill's.
            remove_temp_files(self.path)
        write_textfile(self.path, generate_latest(self.snapshot(outbox, scoring, models)))

    def remove(self) -> None:
        """Removes the file (its path left the configuration): nothing would update it."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def snapshot(
        self, outbox: Callable[[], Outbox], scoring: Scoring | None, models: list[Config]
    ) -> Snapshot:
        """Every metric. What cannot be read now (the outbox on a broken disk, the
        readings database, a model's store) is left out, never the whole file: the step
        that uses it logs why."""
        cfg, tally = self.cfg, self.tally
        dev = {"device": cfg.daemon.device_id}
        out = Snapshot()
        out.gauge(
            "smocsd_build_info",
            "The running smocsd's version; always 1.",
            1,
            **dev,
            version=__version__,
        )
        out.gauge(
            "smocsd_start_time_seconds",
            "When the daemon started (Unix time); its _total counters count from then.",
            tally.started,
            **dev,
        )
        for model in models:
            self._cycle_families(out, {**dev, "model": model.model.name})
        names = {m.model.name for m in models}
        self._stores = {n: s for n, s in self._stores.items() if n in names}
        self._checks = {n: c for n, c in self._checks.items() if n in names}
        self._damaged &= names
        for model in models:
            self._model_families(out, {**dev, "model": model.model.name}, model)
        self._outbox_families(out, dev, outbox)

        configured = list(cfg.publish.order)
        seen = (set(tally.delivered) | set(tally.failed)) - set(configured)  # before a reload
        for sink in configured + sorted(seen):
            out.counter(
                "smocsd_deliveries_total",
                "Results and alarm events a sink acknowledged, since the daemon started.",
                tally.delivered[sink],
                **dev,
                sink=sink,
            )
            out.counter(
                "smocsd_delivery_failures_total",
                "Results and alarm events a sink was offered and did not acknowledge.",
                tally.failed[sink],
                **dev,
                sink=sink,
            )

        if scoring is not None:
            for model in models:
                name = model.model.name
                if name in scoring.scorers:
                    self._scoring_families(out, {**dev, "model": name}, scoring, name)
        return out

    def _cycle_families(self, out: Snapshot, mod: dict[str, str]) -> None:
        """The model's last cycle, and its cycles by outcome since the daemon started."""
        tally = self.tally
        last = tally.last_of(mod["model"], self.cfg.model.name)
        for o in Outcome:
            if last is not None:
                out.gauge(
                    "smocsd_last_cycle_outcome",
                    "1 for the outcome of the last cycle, 0 for the others; skipped: too "
                    "little new data to train.",
                    int(o is last.outcome),
                    **mod,
                    outcome=o.value,
                )
            out.counter(
                "smocsd_cycles_total",
                "Cycles ended since the daemon started, by outcome.",
                tally.cycles[mod["model"], o],
                **mod,
                outcome=o.value,
            )
        if last is not None:
            out.gauge(
                "smocsd_last_cycle_timestamp_seconds",
                "When the last cycle ended.",
                last.ended,
                **mod,
            )
        if last is not None and last.duration is not None:
            out.gauge(
                "smocsd_last_cycle_duration_seconds",
                "How long the last cycle took: gate, read, training, evaluation, save.",
                round(last.duration, 3),
                **mod,
            )

    def _metadata(self, store: ModelStore, name: str, version: int) -> ModelMeta | None:
        if (name, version) not in self._meta:
            try:
                self._meta[name, version] = store.metadata(version)
            except (StoreError, OSError):
                self._meta[name, version] = None
        return self._meta[name, version]

    def _current_problem(self, store: ModelStore, name: str, current: int | None) -> str | None:
        """What `smocsd status` says is wrong with the current version or the link to it;
        None if it is whole or there is none. Logged once when the model turns damaged."""
        if current is None:
            self._checks.pop(name, None)
            problem = store.dangling()
        else:
            signature = _signature(store.path(current))
            now = time.monotonic()
            checked = self._checks.get(name)
            if checked is None or not checked.holds(current, signature, now):
                checked = Checked(current, signature, store.check(current), now)
                self._checks[name] = checked
            problem = checked.problem
        if problem is None:
            self._damaged.discard(name)
        elif name not in self._damaged:
            self._damaged.add(name)
            log.warning(
                "%s: the current model is damaged: %s; point `current` at a whole version "
                "with smocsd models rollback --model %s",
                name,
                problem,
                name,
            )
        return problem

    def _model_families(self, out: Snapshot, mod: dict[str, str], model: Config) -> None:
        """The current model and the newest version (the last training), from the model's
        store: right across restarts, rollbacks and manual train-once runs."""
        name = mod["model"]
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = ModelStore.of(model)
        current = store.current()
        versions = store.versions()
        self._meta = {(n, v): m for (n, v), m in self._meta.items() if n != name or v in versions}
        out.gauge(
            "smocsd_current_version",
            "The model version `current` points to; 0: none.",
            current or 0,
            **mod,
        )
        out.gauge(
            "smocsd_current_damaged",
            "1 when `current` names no kept version (dangling) or one that fails its check "
            "(a file's size or sha256, a non-finite weight), else 0.",
            int(self._current_problem(store, name, current) is not None),
            **mod,
        )
        meta = self._metadata(store, name, current) if current is not None else None
        if meta is not None:
            for what, value, text in (
                ("threshold", meta.threshold, "The current model's alarm threshold."),
                (
                    "validation_loss",
                    meta.metrics.get("val_loss"),
                    "The current model's validation loss (its best epoch's).",
                ),
            ):
                if (number := number_or_none(value)) is not None:
                    out.gauge(f"smocsd_current_{what}", text, number, **mod)
        newest = self._metadata(store, name, versions[-1]) if versions else None
        if newest is None:
            return
        created = _epoch(newest.created_at)
        if created is not None:
            out.gauge(
                "smocsd_last_training_timestamp_seconds",
                "When the newest version (promoted or rejected) was trained.",
                created,
                **mod,
            )
        for number, what, text in (
            (newest.data.rows, "read_rows", "Rows the newest version's training read."),
            (
                newest.data.dropped_rows,
                "dropped_rows",
                "Rows it left out: NULL, NaN, inf, non-numeric.",
            ),
        ):
            out.gauge(f"smocsd_last_training_{what}", text, number, **mod)

    def _outbox_families(
        self, out: Snapshot, dev: dict[str, str], outbox: Callable[[], Outbox]
    ) -> None:
        try:
            box = outbox()
            depth, oldest = len(box), box.pending(1)
        except Exception:  # unreadable now: the tick says why
            log.debug("metrics: outbox not read", exc_info=True)
            return
        out.gauge(
            "smocsd_outbox_depth",
            "Results and alarm events in the outbox, not yet acknowledged by a broker.",
            depth,
            **dev,
        )
        created = _epoch(oldest[0].get("timestamp")) if oldest else None
        if not oldest or created is not None:
            age = max(0.0, time.time() - created) if created is not None else 0.0
            out.gauge(
                "smocsd_outbox_oldest_age_seconds",
                "Age of the oldest message waiting in the outbox; 0 when none waits.",
                round(age, 3),
                **dev,
            )

    def _scoring_families(
        self, out: Snapshot, mod: dict[str, str], scoring: Scoring, name: str
    ) -> None:
        pos = scoring.scorers[name].position
        out.gauge(
            "smocsd_alarms_open",
            "1 while an alarm event is open, else 0.",
            int(pos.event is not None),
            **mod,
        )
        out.counter(
            "smocsd_alarms_total",
            "Alarm events live scoring opened since the daemon started.",
            self.tally.alarms_opened[name],
            **mod,
        )
        caught_up = self.tally.caught_up.get(name)
        if caught_up is not None:
            out.gauge(
                "smocsd_scoring_lag_seconds",
                "Seconds since live scoring last had scored every row there was.",
                round(time.monotonic() - caught_up, 3),
                **mod,
            )
        try:
            behind = scoring.lag_rows(name)
        except Exception:  # the scoring step logs why
            log.debug("metrics: readings not counted", exc_info=True)
            return
        if behind is not None:
            out.gauge(
                "smocsd_scoring_lag_rows",
                "Rows in the readings table (of the model's partition) past the last row "
                "live scoring scored; a partition's as of the last poll of its table.",
                behind,
                **mod,
            )
