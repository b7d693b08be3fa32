"""The rows a challenger must not learn from, found before it trains.

A model retrained on whatever arrived learns a persistent fault as the new normal within
a few retrains: the challenger is trained and judged on the newest rows, which are the
fault. So before a cycle trains, the rows that arrived since the last screening are
scored by the current model with `scoring.decide` (the code of `smocsd score` and of live
scoring, so this holds with live scoring off), and what it found is recorded in the
job's state (`state["screened"]`):

- alarm: each run of windows where the alarm rule fired, widened by one window on both
  sides (the rows leading into the first window over the threshold, and those where the
  fault fades below it) and joined with the next across up to `JOIN_WINDOWS` windows'
  worth of quiet rows: a fault the model catches only in bursts is one fault, and the
  rows between its bursts would teach the next model most of it.
- spike: a window far above the threshold that never fired the rule, left out without
  a margin. "Far" is `FAR_ABOVE`: its log-score lies more than twice as far above the
  fitted median as the threshold does. Under the log-normal the threshold was fitted
  with, a normal window gets there with odds below one in 10^10, so it is a glitch or a
  fault's first breath; the k-of-n rule rightly keeps it from alarming, but trained on,
  it would widen the next threshold's tail. Windows merely over the threshold stay:
  they are the false-alarm budget's share of normal windows, and leaving them out would
  narrow every next threshold until false alarms climb.

The record outlives the model that made it: a later model that would not alarm on those
rows cannot make them trainable again, only the operator's `smocsd accept` does (or
`model.accept_after`). An entry goes once its rows are older than the newest
`training.max_rows` rows, which no cycle reads again.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import scoring
from ..common import labels as labels_mod
from ..common.labels import By, Kind, Label, Labels, for_model, ranges_of
from ..common.modelmeta import ModelMeta
from ..store import ModelStore

if TYPE_CHECKING:
    from .job import TrainingJob

# How far above the threshold a lone window is a spike: FAR_ABOVE times the threshold's
# own distance from the median, in log-score (see the module's docstring).
FAR_ABOVE = 2.0
# Alarmed runs this many window sizes apart or closer are one: measured on a persistent
# fault the model alarmed on in 13 % of its windows, joining across 1 window left 2 of 3
# of its rows trainable, across 30 windows 1 of 3.
JOIN_WINDOWS = 30


class Why(str, Enum):
    ALARM = "alarm"  # the current model's alarm rule fired (with a window's margin)
    SPIKE = "spike"  # one window far above the threshold
    EXCLUDED = "excluded"  # the operator's `smocsd exclude`


@dataclass(frozen=True)
class Span:
    """Rows first..last of the order column (inclusive), left out for `why`."""

    first: int
    last: int
    why: Why
    version: int | None = None  # the model that alarmed (None: an excluded period)
    since: float | None = None  # epoch time of its first row, when the rows have one

    def to_json(self) -> list[Any]:
        return [self.first, self.last, self.why.value, self.version, self.since]

    @classmethod
    def from_json(cls, item: list[Any]) -> Span:
        first, last, why, version, since = item
        return cls(int(first), int(last), Why(why), version, since)


@dataclass(frozen=True)
class LeaveOut:
    """What a cycle must not train on: the screening record, the operator's excluded
    periods, and the accepted ranges that make recorded rows trainable again."""

    spans: tuple[Span, ...] = ()
    accepted: tuple[tuple[int, int], ...] = ()

    def _ranges(self, *whys: Why) -> list[tuple[int, int]]:
        return [(s.first, s.last) for s in self.spans if s.why in whys]

    def mask(self, order: np.ndarray) -> np.ndarray:
        """Per row (by its order value): leave it out of every training and validation
        window. An excluded period wins over an accepted one."""
        recorded = scoring.in_ranges(order, self._ranges(Why.ALARM, Why.SPIKE))
        accepted = scoring.in_ranges(order, self.accepted)
        return (recorded & ~accepted) | scoring.in_ranges(order, self._ranges(Why.EXCLUDED))

    def alarms(self, order: np.ndarray) -> np.ndarray:
        """Per row: in a recorded alarm that no accepted or excluded range touches; a
        challenger must still alarm where the champion alarms on these (autoencoder's
        check that it cannot forget). A partly accepted alarm is out of the check whole:
        its rest is the same change."""
        unchecked = [*self.accepted, *self._ranges(Why.EXCLUDED)]
        checked = [
            (first, last)
            for first, last in self._ranges(Why.ALARM)
            if not any(a <= last and first <= b for a, b in unchecked)
        ]
        return scoring.in_ranges(order, checked)

    def summary(self, order: np.ndarray) -> dict[str, Any]:
        """For metadata.json and the result: how many of these rows were left out, and
        which ranges of them, why."""
        left = self.mask(order)
        ranges = []
        for s in sorted(self.spans, key=lambda s: s.first):
            inside = (order >= s.first) & (order <= s.last) & left
            if inside.any():
                ranges.append(
                    {
                        "first": s.first,
                        "last": s.last,
                        "why": s.why.value,
                        "rows": int(inside.sum()),
                    }
                )
        accepted = [
            {"first": a, "last": b, "rows": int(((order >= a) & (order <= b)).sum())}
            for a, b in self.accepted
            if ((order >= a) & (order <= b)).any()
        ]
        return {"rows": int(left.sum()), "ranges": ranges, "accepted": accepted}


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end] row indices (inclusive) of each run of True."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1, strict=True))


def _widen(mask: np.ndarray, before: int, after: int) -> np.ndarray:
    """`mask` with every run grown by `before` rows ahead of it and `after` behind it."""
    out = mask.copy()
    for start, end in runs(mask):
        out[max(0, start - before) : end + after + 1] = True
    return out


def _join(mask: np.ndarray, gap: int) -> np.ndarray:
    """`mask` with the gaps of at most `gap` rows between two runs filled."""
    out = mask.copy()
    found = runs(mask)
    for (_, end), (start, _) in itertools.pairwise(found):
        if start - end - 1 <= gap:
            out[end + 1 : start] = True
    return out


def _merge(spans: list[Span]) -> list[Span]:
    """Overlapping spans of the same kind as one, keeping the earlier one's model and time."""
    merged: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.why.value, s.first)):
        prev = merged[-1] if merged else None
        if prev is not None and prev.why is s.why and s.first <= prev.last + 1:
            merged[-1] = Span(prev.first, max(prev.last, s.last), s.why, prev.version, prev.since)
        else:
            merged.append(s)
    return sorted(merged, key=lambda s: s.first)


def far_above(meta: ModelMeta) -> float:
    """The spike score of a model: FAR_ABOVE times the threshold's log-distance from the
    median score of its training windows."""
    log_median = meta.threshold_fit.log_median
    exponent = log_median + FAR_ABOVE * (math.log(meta.threshold) - log_median)
    # math.exp raises past e^709: a log_median far out, finite but absurd, is no spike rule.
    return math.exp(min(exponent, 709.0))


class Screening:
    """One cycle's screening of the new rows with the current model; see the module."""

    def __init__(self, job: TrainingJob):
        self.job = job
        self.cfg = job.config
        self.source = job.db_manager
        self.log: logging.Logger = job.logger
        self.record: dict[str, Any] = dict(job.state.get("screened") or {})
        self.spans = [Span.from_json(x) for x in self.record.get("spans", [])]
        # Rows a model was trained on count as screened: the first screening after an
        # upgrade starts where that training ended.
        self.after: int | None = self.record.get("to", job.state.get("last_order"))
        self.labels = Labels(self.cfg.state_dir)
        self.messages: list[dict[str, Any]] = []  # label messages for the outbox
        self.pending_from: int | None = None  # first row of accepts no current model knows

    def run(self) -> LeaveOut:
        # This model's labels and those for every model; another model's are not its.
        in_force = for_model(self.labels.read(), self.cfg.model.name)
        newest = self.source.max_order()
        if self.after is not None and (newest is None or newest < self.after):
            self.log.warning("screening: order column went backwards: its record starts again")
            self.spans, self.after = [], None
        excluded = ranges_of(in_force, Kind.EXCLUDE)
        # Accepted, but no model trained on them is current yet: the current model goes on
        # alarming on the rows that arrive meanwhile, which are the same new normal.
        through = self.record.get("accepted_through", 0)
        pending = [x.first for x in in_force if x.kind is Kind.ACCEPT and x.id > through]
        self.pending_from = min(pending, default=None)
        champion = self._champion()
        newest_time = None
        if champion is not None and self.after is not None and newest is not None:
            newest_time = self._screen(*champion, excluded)
        self._prune()
        in_force += self._accept_lasting(in_force, newest_time)
        # What a model trained now knows: on promotion its job sets accepted_through to it.
        self.record["accept_known"] = max(
            (x.id for x in in_force if x.kind is Kind.ACCEPT), default=0
        )
        self.record.update(spans=[s.to_json() for s in self.spans])
        if self.after is not None:
            self.record["to"] = self.after
        self.job.state["screened"] = self.record
        accepted = ranges_of(in_force, Kind.ACCEPT)
        if self.pending_from is not None and self.after is not None:
            accepted.append((self.pending_from, max(self.after, *(b for _, b in accepted))))
        accepted = list(dict.fromkeys(accepted))
        return LeaveOut(
            spans=(*self.spans, *(Span(a, b, Why.EXCLUDED) for a, b in excluded)),
            accepted=tuple(accepted),
        )

    def _champion(self) -> tuple[int, ModelMeta, scoring.Model] | None:
        store = ModelStore.of(self.cfg)
        current = store.current()
        if current is None:
            return None
        problem = store.check(current)
        if problem:  # the cycle logs it once (autoencoder's champion check)
            return None
        meta = store.metadata(current)
        if meta.channels != list(self.cfg.source.channels):
            self.log.info("screening: current v%d has other channels: not screened", current)
            return None
        threads = self.cfg.training.threads
        return current, meta, scoring.Model.of(store.path(current), meta, threads)

    def _screen(
        self, version: int, meta: ModelMeta, model: scoring.Model, excluded: list
    ) -> float | None:
        """Scores the rows after `self.after` and records what the model alarmed on;
        returns the newest row's time."""
        assert self.after is not None
        w = model.window_size
        new = min(self.source.count_after(self.after), self.cfg.training.max_rows)
        if not new:
            return None
        # Before the new rows: the rows their windows' decisions read (the level rule's
        # too), the alarm rules' look-back, and a window's margin.
        readings = self.source.read_newest(new + model.span + w + model.look_back)
        order = readings.order
        d = scoring.decide(model, readings.values, readings.time, order, self.after, None, excluded)
        alarm = np.zeros(len(order), bool)
        # The margin counted in decided windows as well as in rows: a dropout or a time gap
        # between a fault's first rows and its first alarm would use up a margin of rows.
        for end in d.ends[_widen(d.alarm, w, w)]:
            alarm[max(0, end - w + 1) : end + 1] = True
        first_new = int(np.searchsorted(order, self.after, "right"))
        if any(s.why is Why.ALARM and s.last >= self.after for s in self.spans):
            alarm[first_new] = True  # the event recorded last time goes on, or its margin does
        alarm = _join(_widen(alarm, w, w), JOIN_WINDOWS * w)
        spike = np.zeros(len(order), bool)
        spikes = (d.score > far_above(meta)) & ~d.alarm
        for end in d.ends[spikes]:
            spike[max(0, end - w + 1) : end + 1] = True
        spike &= ~alarm
        if self.pending_from is not None:  # not recorded: see run()
            alarm &= order < self.pending_from
            spike &= order < self.pending_from
        found = []
        for why, mask in ((Why.ALARM, alarm), (Why.SPIKE, spike)):
            for start, end in runs(mask):
                since = float(readings.time[start]) if np.isfinite(readings.time[start]) else None
                found.append(Span(int(order[start]), int(order[end]), why, version, since))
        alarmed = int(d.alarm.sum())
        if alarmed or spike.any():
            self.log.warning(
                "screening with v%d: %d of %d new windows alarmed, %d spiked: their rows "
                "are left out of training",
                version,
                alarmed,
                len(d.ends),
                int(spikes.sum()),
            )
        self.spans = _merge([*self.spans, *found])
        self.after = int(order[-1])
        last_time = readings.time[-1]
        return float(last_time) if np.isfinite(last_time) else None

    def _prune(self) -> None:
        """Spans older than the newest max_rows rows go: no cycle reads those rows again."""
        while self.spans:
            oldest = min(self.spans, key=lambda s: s.last)
            if self.source.count_after(oldest.last) < self.cfg.training.max_rows:
                return
            self.spans.remove(oldest)

    def _accept_lasting(self, in_force: list[Label], newest_time: float | None) -> list[Label]:
        """model.accept_after: an alarm still going on after that long is accepted as the
        new normal, with a label and its message that say so."""
        limit = self.cfg.model.accept_after
        if limit is None or newest_time is None or self.after is None:
            return []
        added = []
        accepted = ranges_of(in_force, Kind.ACCEPT)
        for s in self.spans:
            if s.why is not Why.ALARM or s.last < self.after or s.since is None:
                continue
            if scoring.in_ranges(np.array([s.first, s.last]), accepted).all():
                continue
            lasted = newest_time - s.since
            if lasted < limit:
                continue
            label = self.labels.add(
                Kind.ACCEPT,
                s.first,
                s.last,
                f"alarmed for {lasted / 3600:.1f} h without a break, longer than "
                f"model.accept_after ({limit / 3600:g} h): accepted as the new normal",
                By.ACCEPT_AFTER,
                model=self.cfg.model.name,  # one asset's lasting fault is its own new normal
            )
            self.log.warning("accepted as the new normal: %s", label.describe())
            self.messages.append(
                labels_mod.message(label, "added", self.cfg.daemon.device_id, self.cfg.model.name)
            )
            added.append(label)
        return added


def screen(job: TrainingJob) -> tuple[LeaveOut, list[dict[str, Any]]]:
    """(what to leave out, label messages to publish); job.state["screened"] is updated."""
    started = time.monotonic()
    screening = Screening(job)
    leave_out = screening.run()
    job.logger.debug("screening took %.3fs", time.monotonic() - started)
    return leave_out, screening.messages
