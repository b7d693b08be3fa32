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

Nothing here imports numpy: the daemon stays lean when scoring is off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..common.config import Config
from ..common.files import remove_temp_files, write_atomic
from ..common.modelmeta import ModelMeta
from ..common.state import CycleRecord, State
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


# --- the text format (Prometheus exposition format 0.0.4)


@dataclass
class Family:
    """One metric: its # HELP and # TYPE lines and its samples."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((labels, value))
        return self


def _value(value: float) -> str:
    if isinstance(value, int):  # bool too: 0 or 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def render(families: Iterable[Family]) -> str:
    """The families as exposition format text; one without samples is left out (an empty
    family tells a scraper nothing)."""
    lines: list[str] = []
    for f in families:
        if not f.samples:
            continue
        help_text = f.help.replace("\\", r"\\").replace("\n", r"\n")
        lines += [f"# HELP {f.name} {help_text}", f"# TYPE {f.name} {f.kind}"]
        for labels, value in f.samples:
            pairs = ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items())
            name = f"{f.name}{{{pairs}}}" if pairs else f.name
            lines.append(f"{name} {_value(value)}")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replaces `path` with `text` by files.write_atomic: its temp file (hidden and not
    *.prom, so the collector never reads it) gets mode 0644 and is renamed over `path`.

    The directory is not fsync'ed: after a power loss it holds the old file or the new
    one, both whole, and the daemon rewrites it as it starts. Errors name `path`.
    """
    try:
        write_atomic(path, text.encode(), mode=FILE_MODE, sync_directory=False)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (metrics.textfile)", str(path)) from None


# --- what the daemon counts


def _epoch(utc: Any) -> float | None:
    """'2026-11-28T04:17:54Z' (state.py's utcnow) as Unix time; None if it is not one."""
    try:
        when = datetime.strptime(utc, "%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError):
        return None
    return when.replace(tzinfo=timezone.utc).timestamp()


def _number(value: Any) -> float | None:
    """A number from metadata.json or a result; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


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
        self.sink, self.tally, self.name = sink, tally, sink.name

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


# --- the part


class Metrics:
    """The metrics of one configuration: gathered from the parts, written to the file."""

    def __init__(self, cfg: Config, tally: Tally) -> None:
        self.cfg = cfg
        self.tally = tally
        self.path = cfg.metrics.textfile
        self._stores: dict[str, ModelStore] = {}
        self._meta: dict[tuple[str, int], ModelMeta | None] = {}  # versions never change
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
        write_textfile(self.path, render(self.families(outbox, scoring, models)))

    def remove(self) -> None:
        """Removes the file (its path left the configuration): nothing would update it."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def families(
        self, outbox: Callable[[], Outbox], scoring: Scoring | None, models: list[Config]
    ) -> list[Family]:
        """Every metric. What cannot be read now (the outbox on a broken disk, the
        readings database, a model's store) is left out, never the whole file: the step
        that uses it logs why."""
        cfg, tally = self.cfg, self.tally
        dev = {"device": cfg.daemon.device_id}
        out: dict[str, Family] = {}

        def family(name: str, kind: str, text: str) -> Family:
            """The family `name`, made at its first sample: families come out in that
            order, each with the samples of every model."""
            if name not in out:
                out[name] = Family(name, kind, text)
            return out[name]

        family("smocsd_build_info", "gauge", "The running smocsd's version; always 1.").add(
            1, **dev, version=__version__
        )
        family(
            "smocsd_start_time_seconds",
            "gauge",
            "When the daemon started (Unix time); its _total counters count from then.",
        ).add(tally.started, **dev)
        for model in models:
            self._cycle_families(family, {**dev, "model": model.model.name})
        names = {m.model.name for m in models}
        self._stores = {n: s for n, s in self._stores.items() if n in names}
        for model in models:
            self._model_families(family, {**dev, "model": model.model.name}, model)
        self._outbox_families(family, dev, outbox)

        delivered = family(
            "smocsd_deliveries_total",
            "counter",
            "Results and alarm events a sink acknowledged, since the daemon started.",
        )
        failed = family(
            "smocsd_delivery_failures_total",
            "counter",
            "Results and alarm events a sink was offered and did not acknowledge.",
        )
        configured = list(cfg.publish.order)
        seen = (set(tally.delivered) | set(tally.failed)) - set(configured)  # before a reload
        for sink in configured + sorted(seen):
            delivered.add(tally.delivered[sink], **dev, sink=sink)
            failed.add(tally.failed[sink], **dev, sink=sink)

        if scoring is not None:
            for model in models:
                name = model.model.name
                if name in scoring.scorers:
                    self._scoring_families(family, {**dev, "model": name}, scoring, name)
        return list(out.values())

    def _cycle_families(self, family: Callable[..., Family], mod: dict[str, str]) -> None:
        """The model's last cycle, and its cycles by outcome since the daemon started."""
        tally = self.tally
        last = tally.last_of(mod["model"], self.cfg.model.name)
        outcome = family(
            "smocsd_last_cycle_outcome",
            "gauge",
            "1 for the outcome of the last cycle, 0 for the others; skipped: too little "
            "new data to train.",
        )
        cycles = family(
            "smocsd_cycles_total", "counter", "Cycles ended since the daemon started, by outcome."
        )
        for o in Outcome:
            if last is not None:
                outcome.add(int(o is last.outcome), **mod, outcome=o.value)
            cycles.add(tally.cycles[mod["model"], o], **mod, outcome=o.value)
        if last is not None:
            family(
                "smocsd_last_cycle_timestamp_seconds", "gauge", "When the last cycle ended."
            ).add(last.ended, **mod)
        if last is not None and last.duration is not None:
            family(
                "smocsd_last_cycle_duration_seconds",
                "gauge",
                "How long the last cycle took: gate, read, training, evaluation, save.",
            ).add(round(last.duration, 3), **mod)

    def _metadata(self, store: ModelStore, name: str, version: int) -> ModelMeta | None:
        if (name, version) not in self._meta:
            try:
                self._meta[name, version] = store.metadata(version)
            except (StoreError, OSError):
                self._meta[name, version] = None
        return self._meta[name, version]

    def _model_families(
        self, family: Callable[..., Family], mod: dict[str, str], model: Config
    ) -> None:
        """The current model and the newest version (the last training), from the model's
        store: right across restarts, rollbacks and manual train-once runs."""
        name = mod["model"]
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = ModelStore.of(model)
        current = store.current()
        versions = store.versions()
        self._meta = {(n, v): m for (n, v), m in self._meta.items() if n != name or v in versions}
        family(
            "smocsd_current_version", "gauge", "The model version `current` points to; 0: none."
        ).add(current or 0, **mod)
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
                if (number := _number(value)) is not None:
                    family(f"smocsd_current_{what}", "gauge", text).add(number, **mod)
        newest = self._metadata(store, name, versions[-1]) if versions else None
        if newest is None:
            return
        created = _epoch(newest.created_at)
        if created is not None:
            family(
                "smocsd_last_training_timestamp_seconds",
                "gauge",
                "When the newest version (promoted or rejected) was trained.",
            ).add(created, **mod)
        for number, what, text in (
            (newest.data.rows, "read_rows", "Rows the newest version's training read."),
            (
                newest.data.dropped_rows,
                "dropped_rows",
                "Rows it left out: NULL, NaN, inf, non-numeric.",
            ),
        ):
            family(f"smocsd_last_training_{what}", "gauge", text).add(number, **mod)

    def _outbox_families(
        self, family: Callable[..., Family], dev: dict[str, str], outbox: Callable[[], Outbox]
    ) -> None:
        try:
            box = outbox()
            depth, oldest = len(box), box.pending(1)
        except Exception:  # unreadable now: the tick says why
            log.debug("metrics: outbox not read", exc_info=True)
            return
        family(
            "smocsd_outbox_depth",
            "gauge",
            "Results and alarm events in the outbox, not yet acknowledged by a broker.",
        ).add(depth, **dev)
        created = _epoch(oldest[0].get("timestamp")) if oldest else None
        if not oldest or created is not None:
            age = max(0.0, time.time() - created) if created is not None else 0.0
            family(
                "smocsd_outbox_oldest_age_seconds",
                "gauge",
                "Age of the oldest message waiting in the outbox; 0 when none waits.",
            ).add(round(age, 3), **dev)

    def _scoring_families(
        self, family: Callable[..., Family], mod: dict[str, str], scoring: Scoring, name: str
    ) -> None:
        pos = scoring.scorers[name].position
        family("smocsd_alarms_open", "gauge", "1 while an alarm event is open, else 0.").add(
            int(pos.event is not None), **mod
        )
        family(
            "smocsd_alarms_total",
            "counter",
            "Alarm events live scoring opened since the daemon started.",
        ).add(self.tally.alarms_opened[name], **mod)
        caught_up = self.tally.caught_up.get(name)
        if caught_up is not None:
            family(
                "smocsd_scoring_lag_seconds",
                "gauge",
                "Seconds since live scoring last had scored every row there was.",
            ).add(round(time.monotonic() - caught_up, 3), **mod)
        try:
            behind = scoring.lag_rows(name)
        except Exception:  # the scoring step logs why
            log.debug("metrics: readings not counted", exc_info=True)
            return
        if behind is not None:
            family(
                "smocsd_scoring_lag_rows",
                "gauge",
                "Rows in the readings table (of the model's partition) past the last row "
                "live scoring scored; a partition's as of the last poll of its table.",
            ).add(behind, **mod)
