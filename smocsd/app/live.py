"""Live scoring: every new row scored by the `current` model as it lands, and alarm events.

Runs in the daemon (training stays in its child), with plain onnxruntime and the model's
own threshold and alarm rule from its metadata.json. An event opens when the rule fires
and closes after `scoring.close_after` windows below it, so one long anomaly is one
event; each goes out as an open and a closed message through the outbox. Where scoring
stands (the last scored row, the last windows' decisions, an open event) is saved in
state.json after every step, so no window is scored twice or skipped across a restart.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import scoring
from ..common.config import Config
from ..common.labels import Kind, LabelError, Labels, ranges_of
from ..common.state import AlarmEvent, ScoringPosition, State, utcnow
from ..data.sources import Moved, NoDatabase, Readings, Source, open_source
from ..delivery.outbox import Outbox
from ..schemas import ALARM_SCHEMA
from ..scoring import Model, shares
from ..store import ModelStore

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
    recent: list[bool] | None,
    excluded: Sequence[tuple[int, int]] = (),
) -> tuple[list[ScoredRow], np.ndarray, list[bool]]:
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
    recent: list[bool] = field(default_factory=list)
    event: Event | None = None

    @classmethod
    def from_state(cls, saved: ScoringPosition | None) -> Position:
        """From the record state.py has checked."""
        if saved is None:
            return cls()
        return cls(
            last_order=saved.last_order,
            version=saved.version,
            recent=list(saved.recent),
            event=None if saved.event is None else Event(**asdict(saved.event)),
        )


class LiveScorer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store = ModelStore.of(cfg)
        self.state = State(cfg.state_dir)
        self.position = Position.from_state(
            self.state.read().scoring_of(cfg.model.name, cfg.model.name)
        )
        self.source: Source | None = None
        self.missing = False  # no database at the source, said once
        self.renewed = False  # the database is not the one `position` is in
        self.model: Model | None = None
        self.version: int | None = None
        self.refused: int | None = None  # a current version that failed to load, said once
        self.labels = Labels(cfg.state_dir)
        self._labels_seen: tuple[tuple, list[tuple[int, int]]] | None = None  # (file, ranges)

    def excluded(self) -> list[tuple[int, int]]:
        """The operator's excluded periods (read again when labels.json changes); an
        unreadable file is said once and excludes nothing until it is fixed."""
        try:
            st = self.labels.path.stat()
        except FileNotFoundError:
            return []
        # Every write renames a new file into place: a new inode, even within one mtime tick.
        mtime = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._labels_seen is None or self._labels_seen[0] != mtime:
            try:
                ranges = ranges_of(self.labels.read(), Kind.EXCLUDE)
            except LabelError as exc:
                log.error("scoring: excluded periods not applied: %s", exc)
                ranges = []
            self._labels_seen = (mtime, ranges)
        return self._labels_seen[1]

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None

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
            log.error("scoring: keeping v%s: %s", self.version, problem)
            self.refused = current
            return self.model
        log.info("scoring with v%d from the next window on", current)
        self.model, self.version, self.refused = model, current, None
        return model

    def _newest(self, source: Source) -> int | None:
        """The newest order value (0: an empty table) of the database at the source now,
        None while there is none. The ingest may delete, replace or recreate the file under
        us: each is said once, and a database that is not the one scored so far is scored
        from its first row (`renewed`)."""
        scored = self.position.last_order is not None
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
        return newest

    def step(self, outbox: Outbox) -> tuple[list[ScoredRow], int]:
        """Scores the rows that landed since the last step: (their decisions, how many
        alarm messages it queued)."""
        model = self._current()
        if model is None:
            return [], 0
        if self.source is None:
            self.source = open_source(self.cfg.source)
        pos = self.position
        newest = self._newest(self.source)
        if newest is None:
            return [], 0
        if pos.last_order is None:  # scoring starts with the rows that land from now on
            pos.last_order = newest
            self._save()
            return [], 0
        if newest < pos.last_order and not self.renewed:
            log.warning(
                "scoring: order column went backwards (newest %s, last scored %s): the table "
                "was emptied or recreated; scoring it from its first row",
                newest,
                pos.last_order,
            )
            self.renewed = True
        if self.renewed:  # its rows are all new: an anomaly already in it is alarmed on
            first = self.source.min_order()
            pos.last_order, pos.recent = 0 if first is None else first - 1, []
            self._save()
            self.renewed = False
        if newest == pos.last_order:  # nothing new: the one query of an idle poll
            return [], 0
        new = self.source.count_after(pos.last_order)
        if not new:
            return [], 0
        cap = self.cfg.training.max_rows
        if new > cap:  # after a long stop: memory is bounded, `smocsd score` has the rest
            log.warning("scoring: %d rows waiting, scoring the newest %d", new, cap)
            new, pos.recent = cap, []
        readings = self.source.read_newest(new + model.window_size - 1)
        # Decided on a copy, kept only once every message is in the outbox: a put that
        # fails (a full disk) leaves the position as it was, and the retry opens the same
        # event again instead of losing its "open" message.
        after = copy.deepcopy(pos)
        rows, errors, after.recent = decide(
            model, readings, after.last_order, after.recent, self.excluded()
        )
        messages = self._events(after, model, rows, errors)
        for message in messages:
            outbox.put(message)
        after.last_order = int(readings.order[-1])
        after.version = self.version
        self.position = after
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
                    log.warning("alarm opened at order %d, score %.4g", row.order, row.score)
            elif event is not None:
                event.quiet += 1
                if event.quiet >= self.cfg.scoring.close_after:
                    messages.append(event.message(self.cfg, "closed"))
                    log.info("alarm closed at order %d", event.last["order"])
                    pos.event = None
        return messages

    def _save(self) -> None:
        pos = self.position
        self.state.update(
            model=self.cfg.model.name,
            scoring=ScoringPosition(pos.last_order, pos.version, pos.recent, pos.event, utcnow()),
        )
