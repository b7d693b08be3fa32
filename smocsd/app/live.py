"""Live scoring: every new row scored by its model's `current` version as it lands, and
alarm events.

Runs in the daemon (training stays in its child), with plain onnxruntime and the model's
own threshold and alarm rules from its metadata.json. An event opens when a rule fires
and closes after `scoring.close_after` windows on which none does, so one long anomaly is
one event; each goes out as an open and a closed message through the outbox. Where scoring
stands (the last scored row, the last windows' decisions, an open event) is saved in
state.json, per model, after every step that scored rows, so no window is scored twice or
skipped across a restart.

`Scoring` is the daemon's whole live scoring: a model of its own table polls it alone
(LiveScorer.step); the partitions of one definition share their table, which is polled
once for all of them (one max() per poll, one read of the new rows of every partition),
however many there are: a per-model poll would cost a gateway with hundreds of assets
hundreds of queries every half second.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .. import scoring
from ..common.config import PARTITION_SEPARATOR, Config, SourceConfig, partition_value
from ..common.labels import Kind, Label, LabelError, Labels, for_model, ranges_of
from ..common.state import AlarmEvent, ScoringPosition, State, StateFile, utcnow
from ..data.sources import Moved, NoDatabase, Readings, Source, open_source
from ..delivery.outbox import Outbox
from ..schemas import ALARM_SCHEMA
from ..scoring import LookBack, Model, shares
from ..store import ModelStore
from ..training.result import error_line

log = logging.getLogger(__name__)

# Alarm events of one device and model share this namespace: an event's id is derived from
# where it started, so an event re-opened after a crash carries the same id.
_EVENTS = uuid.UUID("6f1d3c2e-4b6a-4f0e-9a51-5d0c8e7b2a90")
TOP_CHANNELS = 3


@dataclass(frozen=True)
class ScoredRow:
    """The decision at the window ending at this row."""

    order: int
    time: float | None
    score: float
    over: bool  # the window alone is above the threshold
    anomalous: bool  # the alarm rule fires
    shares: dict[str, float]  # each channel's share of the window's error

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    model: Model,
    readings: Readings,
    after: int | None,
    recent: LookBack | None,
    excluded: Sequence[tuple[int, int]] = (),
) -> tuple[list[ScoredRow], np.ndarray, LookBack]:
    """Scores the windows of `readings` that end past order `after` (scoring.decide), as
    rows: the rows, their windows' per-channel errors, and the new `recent`."""
    d = scoring.decide(
        model, readings.values, readings.time, readings.order, after, recent, excluded
    )
    rows = [
        ScoredRow(
            order=int(readings.order[i]),
            time=None if np.isnan(readings.time[i]) else float(readings.time[i]),
            score=float(s),
            over=bool(o),
            anomalous=bool(a),
            shares={c: round(float(x), 4) for c, x in zip(model.channels, sh, strict=True)},
        )
        for i, s, o, a, sh in zip(d.ends, d.score, d.over, d.alarm, shares(d.errors), strict=True)
    ]
    return rows, d.errors, d.recent


@dataclass
class Event(AlarmEvent):
    """An open alarm: where it started, its peak, and the channels' summed errors; its
    fields are the record state.json keeps (state.AlarmEvent)."""

    def message(self, cfg: Config, state: str) -> dict[str, Any]:
        total = sum(self.errors.values()) or 1.0
        ranked = sorted(self.errors.items(), key=lambda kv: kv[1], reverse=True)
        return {
            "schema": ALARM_SCHEMA,
            # Derived, as event_id is: a crash between the put and the saved position
            # makes the same message again, and consumers drop the copy by message_id.
            "message_id": str(uuid.uuid5(_EVENTS, f"{self.event_id}/{state}")),
            "event_id": self.event_id,
            "state": state,
            "device_id": cfg.daemon.device_id,
            "model": cfg.model.name,
            "version": self.version,
            "start": self.start,
            "end": self.last if state == "closed" else None,
            "peak_score": self.peak_score,
            "threshold": self.threshold,
            "channels": [
                {"name": name, "share": round(err / total, 4)}
                for name, err in ranked[:TOP_CHANNELS]
            ],
            "timestamp": utcnow(),
        }


@dataclass
class Position:
    """Where live scoring stands; state.json's `scoring`."""

    last_order: int | None = None
    version: int | None = None
    recent: LookBack = field(default_factory=LookBack)
    event: Event | None = None

    @classmethod
    def from_state(cls, saved: ScoringPosition | None) -> Position:
        """From the record state.py has checked."""
        if saved is None:
            return cls()
        return cls(
            last_order=saved.last_order,
            version=saved.version,
            recent=LookBack(list(saved.recent), [list(x) for x in saved.recent_high]),
            event=None if saved.event is None else Event(**asdict(saved.event)),
        )


class ExcludedRanges:
    """The operator's excluded periods of each model, read again only when labels.json
    changes: shared by all the models of a daemon, so the file is parsed once per change,
    and an unreadable one is said once, not once per model. Until it is fixed it excludes
    nothing."""

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self._seen: tuple | None = None  # the file's identity when last read
        self._read: list[Label] = []
        self._of: dict[str, list[tuple[int, int]]] = {}

    def of(self, model: str) -> list[tuple[int, int]]:
        try:
            st = self.labels.path.stat()
        except FileNotFoundError:
            return []
        # Every write renames a new file into place: a new inode, even within one mtime tick.
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._seen != seen:
            try:
                self._read = self.labels.read()
            except LabelError as exc:
                log.error("scoring: excluded periods not applied: %s", exc)
                self._read = []
            self._seen, self._of = seen, {}
        if model not in self._of:
            self._of[model] = ranges_of(for_model(self._read, model), Kind.EXCLUDE)
        return self._of[model]


class _Table:
    """A readings table as live scoring polls it. The ingest may delete, replace, recreate
    or empty it under us: each is said once, and a database that is not the one scored so
    far is scored from its first row (`renewed`)."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.source: Source | None = None
        self.missing = False  # no database at the source, said once
        self.renewed = False  # the database is not the one the positions are in

    def open(self) -> Source:
        if self.source is None:
            self.source = open_source(self.cfg)
        return self.source

    def newest(self, furthest: int | None) -> int | None:
        """The newest order value (0: an empty table) of the database at the source now,
        None while there is none; `furthest`: the furthest position of the models scoring
        it (None: none has one yet)."""
        source = self.open()
        scored = furthest is not None
        moved = source.moved()
        if moved is not None:
            if moved is Moved.DELETED:
                then = "waiting for the ingest to create it again"
            else:
                then = "scoring the new one from its first row"
            log.warning("scoring: %s was %s: %s", source.where, moved.value, then)
            source.close()  # the next read opens whatever is at the path
            self.renewed, self.missing = scored, moved is Moved.DELETED
        try:
            newest = source.max_order() or 0
        except NoDatabase as exc:
            if not self.missing:
                log.warning("scoring: %s", exc)
                self.missing = True
            self.renewed = scored  # a database that appears is not the one scored so far
            return None
        if self.missing:
            if self.renewed:
                then = "is there again: scoring it from its first row"
            else:
                then = "is there: scoring the rows that land from now on"
            log.info("scoring: %s %s", source.where, then)
            self.missing = False
        if furthest is not None and newest < furthest and not self.renewed:
            log.warning(
                "scoring: order column went backwards (newest %s, last scored %s): the table "
                "was emptied or recreated; scoring it from its first row",
                newest,
                furthest,
            )
            self.renewed = True
        return newest

    def restart(self) -> int:
        """The position that scores a renewed table from its first row; its rows are all
        new, so an anomaly already in it is alarmed on."""
        first = self.open().min_order()
        self.renewed = False
        return 0 if first is None else first - 1

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None


class LiveScorer:
    """One model's live scoring: its current version, position and alarm events. A model
    of its own table (no partition) also polls that table here (`step`); a partition's
    table is polled by its group, which hands it its rows (`score`)."""

    def __init__(
        self,
        cfg: Config,
        legacy_owner: str | None = None,
        *,
        excluded: ExcludedRanges | None = None,
        state: StateFile | None = None,
    ) -> None:
        """`legacy_owner`: the top-level model.name, whose position a release before
        [models] tables kept at state.json's top level (default: this model's own name);
        `state`: state.json as read already (many models start at once)."""
        self.cfg = cfg
        self.name = cfg.model.name
        self.store = ModelStore.of(cfg)
        self.state = State(cfg.state_dir)
        saved = (state if state is not None else self.state.read()).scoring_of(
            self.name, self.name if legacy_owner is None else legacy_owner
        )
        self.position = Position.from_state(saved)
        self._saved = self.position.last_order  # as state.json has it
        self.table = _Table(cfg.source)
        self.model: Model | None = None
        self.version: int | None = None
        self.refused: int | None = None  # a current version that failed to load, said once
        self._excluded = excluded or ExcludedRanges(Labels(cfg.state_dir))
        # A partition's rows past its position at its group's last poll (None: not known).
        self.behind: int | None = None

    @property
    def source(self) -> Source | None:
        return self.table.source

    def excluded(self) -> list[tuple[int, int]]:
        """The operator's excluded periods for this model (ExcludedRanges)."""
        return self._excluded.of(self.name)

    def close(self) -> None:
        self.table.close()

    def _current(self) -> Model | None:
        """The current model; on a change, the new one if it checks and loads, else the
        previous one goes on scoring and the failure is said once."""
        current = self.store.current()
        if current is None or current == self.version or current == self.refused:
            return self.model
        problem = self.store.check(current)
        if problem is None:
            try:
                model = Model.of(self.store.path(current), self.store.metadata(current))
            except Exception as exc:
                problem = f"v{current} does not load: {exc}"
        if problem:
            log.error("%s: scoring: keeping v%s: %s", self.name, self.version, problem)
            self.refused = current
            return self.model
        log.info("%s: scoring with v%d from the next window on", self.name, current)
        self.model, self.version, self.refused = model, current, None
        return model

    def step(self, outbox: Outbox) -> tuple[list[ScoredRow], int]:
        """Polls the model's own table and scores the rows that landed since the last step:
        (their decisions, how many alarm messages it queued)."""
        model = self._current()
        if model is None:
            return [], 0
        pos = self.position
        newest = self.table.newest(pos.last_order)
        if newest is None:
            return [], 0
        if pos.last_order is None:  # scoring starts with the rows that land from now on
            pos.last_order = newest
            self._save()
            return [], 0
        if self.table.renewed:
            pos.last_order, pos.recent = self.table.restart(), LookBack()
            self._save()
        if newest == pos.last_order:  # nothing new: the one query of an idle poll
            return [], 0
        source = self.table.open()
        new = source.count_after(pos.last_order)
        if not new:
            return [], 0
        cap = self.cfg.training.max_rows
        if new > cap:  # after a long stop: memory is bounded, `smocsd score` has the rest
            log.warning("%s: scoring: %d rows waiting, scoring the newest %d", self.name, new, cap)
            new, pos.recent = cap, LookBack()
        return self.score(outbox, model, source.read_newest(new + model.span - 1))

    def score(
        self, outbox: Outbox, model: Model, readings: Readings, *, save: bool = True
    ) -> tuple[list[ScoredRow], int]:
        """Scores the windows of `readings` (the new rows, after the `span - 1` rows
        before them that their decisions read) that end past the position, and moves it
        to their last row; `save=False`: the caller saves it (a group, all its partitions
        in one write)."""
        # Decided on a copy, kept only once every message is in the outbox: a put that
        # fails (a full disk) leaves the position as it was, and the retry opens the same
        # event again instead of losing its "open" message.
        after = copy.deepcopy(self.position)
        rows, errors, after.recent = decide(
            model, readings, after.last_order, after.recent, self.excluded()
        )
        messages = self._events(after, model, rows, errors)
        for message in messages:
            outbox.put(message)
        after.last_order = int(readings.order[-1])
        after.version = self.version
        self.position = after
        if save:
            self._save()
        return rows, len(messages)

    def _events(
        self, pos: Position, model: Model, rows: list[ScoredRow], errors: np.ndarray
    ) -> list[dict]:
        messages = []
        for row, err in zip(rows, errors, strict=True):
            where = {"order": row.order, "time": row.time}
            event = pos.event
            if row.anomalous:
                if event is None:
                    # Where it started, in order and time: a database recreated with its
                    # ids starting over reuses orders, never the readings' times.
                    start = f"{row.order}/{row.time}"
                    event = pos.event = Event(
                        event_id=str(
                            uuid.uuid5(
                                _EVENTS,
                                f"{self.cfg.daemon.device_id}/{self.cfg.model.name}/{start}",
                            )
                        ),
                        version=self.version or 0,
                        start=where,
                        last=where,
                        peak_score=row.score,
                        threshold=model.threshold,
                        errors=dict.fromkeys(model.channels, 0.0),
                    )
                    opened = True
                else:
                    opened = False
                event.last, event.quiet = where, 0
                event.peak_score = max(event.peak_score, row.score)
                for name, e in zip(model.channels, err, strict=True):
                    # .get: a model with other channels may have been swapped in mid-event.
                    event.errors[name] = event.errors.get(name, 0.0) + float(e)
                if opened:  # after its first window's errors: the shares name the drivers
                    messages.append(event.message(self.cfg, "open"))
                    log.warning(
                        "%s: alarm opened at order %d, score %.4g", self.name, row.order, row.score
                    )
            elif event is not None:
                event.quiet += 1
                if event.quiet >= self.cfg.scoring.close_after:
                    messages.append(event.message(self.cfg, "closed"))
                    log.info("%s: alarm closed at order %d", self.name, event.last["order"])
                    pos.event = None
        return messages

    def record(self) -> ScoringPosition:
        """The position as state.json keeps it."""
        pos = self.position
        return ScoringPosition(
            last_order=pos.last_order,
            version=pos.version,
            recent=pos.recent.over,
            recent_high=pos.recent.high,
            event=pos.event,
            at=utcnow(),
        )

    def _save(self) -> None:
        self.state.update(model=self.name, scoring=self.record())
        self._saved = self.position.last_order

    def save_if_moved(self) -> None:
        """Saves a position its group moved past rows of other partitions only: each poll
        would cost a state.json write per idle partition; at a stop it spares the next
        start a read back to the oldest of them."""
        if self.position.last_order != self._saved:
            self._save()


@dataclass
class Scored:
    """What one step did for one model: for the daemon's counts and metrics."""

    name: str
    alarms: int  # alarm messages queued
    was_open: bool  # an alarm event was open before the step
    is_open: bool  # and after it
    scoring: bool  # a model scored: every row there was is now scored
    rows: list[ScoredRow] = field(default_factory=list)  # the windows it decided


@dataclass
class _Tail:
    """A partition's newest rows up to its position: the windows of its next new rows
    start in them. `wanted`: how many it holds when the partition has that many."""

    wanted: int
    readings: Readings


def _rows(readings: Readings, index: Any) -> Readings:
    return Readings(readings.order[index], readings.time[index], readings.values[index])


def _joined(first: Readings, then: Readings) -> Readings:
    return Readings(
        np.concatenate([first.order, then.order]),
        np.concatenate([first.time, then.time]),
        np.concatenate([first.values, then.values]),
    )


def _empty(channels: int) -> Readings:
    return Readings(np.empty(0, np.int64), np.empty(0), np.empty((0, channels)))


class _Poller:
    """What Scoring polls: one table, every `interval` seconds."""

    key: str  # the definition's model.name: a table error is said under it
    polled_at = -math.inf  # time.monotonic()

    @property
    def interval(self) -> float:
        raise NotImplementedError

    def poll(self, outbox: Outbox, failed: dict[str, Exception]) -> list[Scored]:
        """Scores what landed; a model that fails goes into `failed` and the others on."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Single(_Poller):
    """A model of its own table."""

    def __init__(self, scorer: LiveScorer) -> None:
        self.key = scorer.name
        self.scorer = scorer

    @property
    def interval(self) -> float:
        return self.scorer.cfg.scoring.poll_interval

    def poll(self, outbox: Outbox, failed: dict[str, Exception]) -> list[Scored]:
        scorer = self.scorer
        was_open = scorer.position.event is not None
        rows, alarms = scorer.step(outbox)  # a failure is the table's: Scoring catches it
        is_open = scorer.position.event is not None
        return [Scored(scorer.name, alarms, was_open, is_open, scorer.model is not None, rows)]

    def close(self) -> None:
        self.scorer.close()


def _group_key(definition: str) -> str:
    """How a group's errors name it: `pump@*`, never a model's name."""
    return f"{definition}{PARTITION_SEPARATOR}*"


class _Group(_Poller):
    """The partitions of one definition: their table polled once for all of them.

    One max() per poll, and when there are new rows one read of those of every partition
    past the oldest position, split by partition value. A partition's decisions read the
    `span - 1` rows before its first new row (a window's, and the level rule's before
    them): its tail, kept in memory, read once
    by a query of that partition's own after a start. A value without a model (not yet
    resolved) is left for the daemon's next resolve: its model starts at the newest row,
    as every new model does.
    """

    def __init__(self, definition: str, source: SourceConfig, max_rows: int) -> None:
        self.key = _group_key(definition)
        self.table = _Table(replace(source, partition=None))
        self.channels = len(source.channels)
        self.cap = max_rows
        self.members: dict[str, LiveScorer] = {}  # partition value -> its model's scorer
        self.tails: dict[str, _Tail] = {}
        self._values: dict[tuple[type, Any], str | None] = {}  # raw value -> its model's suffix

    @property
    def interval(self) -> float:
        return min(m.cfg.scoring.poll_interval for m in self.members.values())

    def drop(self, value: str) -> None:
        self.members.pop(value).save_if_moved()
        self.tails.pop(value, None)

    def close(self) -> None:
        """Saves, in one write, the positions its polls moved past other partitions' rows
        only: hundreds of writes would stall a stop on an SD card."""
        failed: dict[str, Exception] = {}
        moved = [m for m in self.members.values() if m.position.last_order != m._saved]
        self._save_positions(moved, failed)
        if failed:  # a faster start next time, no more
            error = error_line(next(iter(failed.values())))
            log.warning("scoring %s: positions not saved: %s", self.key, error)
        self.table.close()

    def _value(self, raw: Any) -> str | None:
        key = (type(raw), raw)  # 1, 1.0 and True are one dict key; only 1 names a model
        if key not in self._values:
            try:
                self._values[key] = partition_value(raw)
            except ValueError:  # ModelSet says it once; its rows are not modelled
                self._values[key] = None
        return self._values[key]

    def poll(self, outbox: Outbox, failed: dict[str, Exception]) -> list[Scored]:
        models: dict[str, Model] = {}
        scored: list[Scored] = []
        for value, member in self.members.items():
            member.behind = None
            try:
                model = member._current()
            except Exception as exc:
                failed[member.name] = exc
                continue
            if model is None:
                is_open = member.position.event is not None
                scored.append(Scored(member.name, 0, is_open, is_open, False))
            else:
                models[value] = model
        if not models:  # nothing to score with: not even the one query
            return scored
        saved = [m.position.last_order for m in self.members.values()]
        newest = self.table.newest(max((o for o in saved if o is not None), default=None))
        active = {v: self.members[v] for v in models}
        if newest is not None:
            self._start(active, newest, failed)
        # Those whose start failed to save go on next poll: their position is in memory.
        was_open = {v: m.position.event is not None for v, m in active.items()}
        results: dict[str, tuple[list[ScoredRow], int]] = dict.fromkeys(active, ([], 0))
        if newest is not None:
            results = self._score(outbox, models, active, newest, failed)
        for value, member in active.items():
            if member.name in failed:
                continue
            rows, alarms = results.get(value, ([], 0))
            is_open = member.position.event is not None
            scored.append(Scored(member.name, alarms, was_open[value], is_open, True, rows))
        return scored

    def _start(self, active: dict[str, LiveScorer], newest: int, failed: dict) -> None:
        """A renewed table is scored from its first row; then new models start at the
        newest row (a model new in a renewed table too: its rows are all ahead of it)."""
        moved: list[LiveScorer] = []
        if self.table.renewed:
            start = self.table.restart()
            for value, member in self.members.items():
                if member.position.last_order is not None:
                    member.position.last_order, member.position.recent = start, LookBack()
                    self.tails[value] = _Tail(sys.maxsize, _empty(self.channels))  # no row before
                    moved.append(member)
        for value, member in active.items():
            if member.position.last_order is None:
                member.position.last_order = newest
                self.tails.pop(value, None)
                moved.append(member)
        self._save_positions(moved, failed)

    def _score(
        self,
        outbox: Outbox,
        models: dict[str, Model],
        active: dict[str, LiveScorer],
        newest: int,
        failed: dict[str, Exception],
    ) -> dict[str, tuple[list[ScoredRow], int]]:
        after = min(m.position.last_order for m in active.values())  # type: ignore[type-var]
        results: dict[str, tuple[list[ScoredRow], int]] = {}
        if newest <= after:  # nothing new: the one query of an idle poll
            for member in active.values():
                member.behind = 0
            return results
        source = self.table.open()
        readings, raw = source.read_tagged(after, self.cap + 1)
        if len(readings.order) > self.cap:  # after a long stop: memory is bounded
            waiting = source.count_after(after)
            log.warning(
                "%s: scoring: %d rows waiting, scoring the newest %d",
                self.key,
                waiting,
                self.cap,
            )
            readings, raw = _rows(readings, slice(-self.cap, None)), raw[-self.cap :]
            first = int(readings.order[0])
            for value, member in active.items():
                pos = member.position
                if pos.last_order < first - 1:  # type: ignore[operator]
                    # Its rows before `first` are skipped: its windows start after them.
                    pos.last_order, pos.recent = first - 1, LookBack()
                    self.tails.pop(value, None)
        if not len(readings.order):
            return results
        top = int(readings.order[-1])
        where: dict[str, list[int]] = defaultdict(list)
        for i, tag in enumerate(raw):
            value = self._value(tag)
            if value is not None:
                where[value].append(i)
        for value, member in active.items():
            index = np.array(where.get(value, []), dtype=np.int64)
            index = index[readings.order[index] > member.position.last_order]
            try:
                if len(index):
                    results[value] = self._partition(
                        outbox, value, member, models[value], _rows(readings, index)
                    )
            except Exception as exc:
                failed[member.name] = exc
                member.behind = len(index)
                continue
            member.behind = 0
            # It has scored every row of its own up to `top`: the next poll starts there,
            # so an idle one is the one max() (saved with its next rows, or at the stop).
            member.position.last_order = max(top, member.position.last_order)  # type: ignore[type-var]
        self._save_positions([active[value] for value in results], failed)
        return results

    @staticmethod
    def _save_positions(members: list[LiveScorer], failed: dict[str, Exception]) -> None:
        """The positions of partitions that moved, in one state.json write (after their
        messages are in the outbox)."""
        if not members:
            return
        try:
            members[0].state.update(scorings={m.name: m.record() for m in members})
        except Exception as exc:  # they go on from their positions in memory
            for member in members:
                failed[member.name] = exc
            return
        for member in members:
            member._saved = member.position.last_order

    def _partition(
        self, outbox: Outbox, value: str, member: LiveScorer, model: Model, new: Readings
    ) -> tuple[list[ScoredRow], int]:
        """Scores one partition's new rows after its tail, which it then moves on."""
        need = model.span - 1
        tail = self.tails.get(value)
        if tail is None or tail.wanted < need:  # after a start, or a model reading more rows
            source = open_source(member.cfg.source)
            try:
                got = source.read_newest(need, upto=member.position.last_order)
            finally:
                source.close()
            tail = self.tails[value] = _Tail(need, got)
        rows = _joined(tail.readings, new)
        scored = member.score(outbox, model, rows, save=False)
        held = _rows(rows, slice(max(0, len(rows.order) - need), None))
        # Fewer rows than `need`: they are all the partition has, as many as the tail knew.
        self.tails[value] = _Tail(need if len(held.order) == need else tail.wanted, held)
        return scored


class Scoring:
    """The daemon's whole live scoring: every model with `scoring.enabled`, each table
    polled every `scoring.poll_interval` (the least of its models'). An error of one table
    or model is said once (again only when it changes) and never stops the others."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.legacy_owner = cfg.model.name
        self.scorers: dict[str, LiveScorer] = {}
        self._pollers: dict[str, _Poller] = {}  # by key
        self._excluded = ExcludedRanges(Labels(cfg.state_dir))
        self.errors: dict[str, str] = {}  # the error each table or model last logged

    def set_models(self, models: Iterable[Config]) -> None:
        """The models to score: those with scoring enabled; a model that is new here starts
        where state.json has it, one that is gone is dropped, the others go on as they are."""
        wanted = {m.model.name: m for m in models if m.scoring.enabled}
        for name in [n for n in self.scorers if n not in wanted]:
            self._drop(name)
        state: StateFile | None = None
        for name, model in wanted.items():
            if name in self.scorers:
                continue
            if state is None:  # read once for all the models that start now
                state = State(self.cfg.state_dir).read()
            scorer = LiveScorer(model, self.legacy_owner, excluded=self._excluded, state=state)
            self.scorers[name] = scorer
            value = model.source.partition
            if value is None:
                self._pollers[name] = _Single(scorer)
                continue
            definition = name[: -len(value) - len(PARTITION_SEPARATOR)]
            group = self._pollers.get(_group_key(definition))
            if not isinstance(group, _Group):
                group = _Group(definition, model.source, model.training.max_rows)
                self._pollers[group.key] = group
            group.members[value] = scorer

    def _drop(self, name: str) -> None:
        scorer = self.scorers.pop(name)
        value = scorer.cfg.source.partition
        if value is None:
            self._pollers.pop(name).close()
            return
        group = self._pollers[_group_key(name[: -len(value) - len(PARTITION_SEPARATOR)])]
        assert isinstance(group, _Group)
        try:
            group.drop(value)
        finally:
            if not group.members:
                self._pollers.pop(group.key).close()

    @property
    def poll_interval(self) -> float:
        """The shortest of the tables' poll intervals: how often `due` may turn true."""
        return min((p.interval for p in self._pollers.values()), default=math.inf)

    def due(self) -> bool:
        """Whether a table's poll interval has passed since it was last polled."""
        now = time.monotonic()
        return any(now - p.polled_at >= p.interval for p in self._pollers.values())

    def step(self, outbox: Outbox, *, force: bool = False) -> list[Scored]:
        """Polls every table that is due (`force`: every table), and scores what landed:
        what it did for each model of those tables."""
        now = time.monotonic()
        scored: list[Scored] = []
        failed: dict[str, Exception] = {}
        polled: list[str] = []
        for poller in list(self._pollers.values()):
            if not force and now - poller.polled_at < poller.interval:
                continue
            poller.polled_at = now
            polled.append(poller.key)
            try:
                scored += poller.poll(outbox, failed)
            except Exception as exc:  # the table's: its models' positions stay as they were
                failed[poller.key] = exc
        self._said(failed, polled + [s.name for s in scored])
        return scored

    def _said(self, failed: dict[str, Exception], ok: list[str]) -> None:
        """Logs each new error once, one line for the models that share it (a full disk
        fails them all), and each recovery."""
        new: dict[str, list[str]] = defaultdict(list)
        for name, exc in failed.items():
            error = error_line(exc)
            if self.errors.get(name) != error:
                new[error].append(name)
                log.debug("scoring %s: traceback", name, exc_info=exc)
            self.errors[name] = error
        for error, names in new.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            log.error("scoring %s: %s (trying again at the next poll)", shown, error)
        for name in ok:
            if name in self.errors and name not in failed:
                log.info("scoring %s: recovered from: %s", name, self.errors.pop(name))

    def lag_rows(self, name: str) -> int | None:
        """Rows of `name`'s table (of its partition) past the last row it scored; None when
        not known. A model of its own table counts them now; a partition as its group's
        last poll found them, which a count per partition would cost a query each."""
        scorer = self.scorers.get(name)
        if scorer is None or scorer.position.last_order is None:
            return None
        if scorer.cfg.source.partition is not None:
            return scorer.behind
        if scorer.source is None:
            return None
        return scorer.source.count_after(scorer.position.last_order)

    def close(self) -> None:
        for poller in self._pollers.values():
            poller.close()
