"""state_dir/state.json: what smocsd remembers between cycles and shows in `status`.

The file is read into a typed StateFile, every field checked here, once: a value of the
wrong kind (a hand edit, a bit flip, another release's key) would otherwise fail every
cycle or stop the daemon at start, until someone edited the file. A damaged field is
named once (file and dotted field), reset to its default (or the smallest record that
cannot stand without it is), the rest kept; the next write saves the repaired record.
Each record's docstring says what a reset costs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .files import locked, remove_temp_files, write_atomic
from .records import Damage, Findings
from .records import Object as _Object
from .records import count as _count
from .records import integer as _integer
from .records import json_list as _list
from .records import names as _names
from .records import nonnegative as _score
from .records import number as _number
from .records import or_null as _or_null
from .records import positive as _version
from .records import shown as _shown
from .records import text as _text
from .records import uuid_text as _uuid

log = logging.getLogger(__name__)

T = TypeVar("T")

# 9999-12-31T23:59:59Z: time.gmtime and datetime refuse a later epoch time.
LATEST_EPOCH = 253402300799.0
WHYS = ("alarm", "spike")  # screen.Why's values a screening record holds


# The one format of every time smocsd writes for people or files (state.json, status,
# messages, metadata.json, labels): UTC, ISO 8601, whole seconds, "Z". A local time
# beside UTC ones, or a second format, makes an operator misread which came first across
# gateways in different zones.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc(epoch: float) -> str:
    """An epoch time in TIME_FORMAT."""
    return time.strftime(TIME_FORMAT, time.gmtime(epoch))


def utcnow() -> str:
    return utc(time.time())


# --- checking the file's values


def _order(value: Any, name: str) -> int:
    return _integer(value, name)


def _epoch(value: Any, name: str) -> float:
    number = _number(value, name)
    if not 0.0 <= number <= LATEST_EPOCH:
        raise Damage(name, f"expected an epoch time in 1970..9999, got {_shown(value)}")
    return number


def _time(value: Any, name: str) -> str:
    """An ISO 8601 time, in TIME_FORMAT. One without an offset is a local time: what
    releases up to 0.1.0 wrote as `next_check`, read as such so that status shows it in
    the one format until the daemon next writes it."""
    text = _text(value, name)
    try:
        return datetime.fromisoformat(text).astimezone(timezone.utc).strftime(TIME_FORMAT)
    except (ValueError, OverflowError):  # not a time, or one in UTC before year 1 or after 9999
        raise Damage(name, f"expected an ISO 8601 time, got {_shown(value)}") from None


def _booleans(value: Any, name: str) -> list[bool]:
    if not isinstance(value, list) or not all(isinstance(x, bool) for x in value):
        raise Damage(name, f"expected a list of booleans, got {_shown(value)}")
    return value


def _index_lists(value: Any, name: str) -> list[list[int]]:
    def index(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31

    if not isinstance(value, list) or not all(
        isinstance(v, list) and all(index(x) for x in v) for v in value
    ):
        raise Damage(name, f"expected a list of lists of channel indexes, got {_shown(value)}")
    return value


def _why(value: Any, name: str) -> str:
    if value not in WHYS:
        raise Damage(name, f'expected "alarm" or "spike", got {_shown(value)}')
    return value


# --- the records


@dataclass
class CycleRecord:
    """`last_cycle`: how the last training cycle ended, for `status` and the metrics file.

    Reset whole when damaged: the next cycle writes it again; until then `status` says
    "never" and the metrics file knows no last cycle.
    """

    at: str  # utcnow()
    outcome: str  # result.Outcome's value
    version: int | None = None
    reason: str | None = None
    error: str | None = None

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> CycleRecord:
        obj = _Object(value, name, _names(cls), findings)
        return cls(
            at=obj.field("at", _text),
            outcome=obj.field("outcome", _text),
            version=obj.optional("version", _version),
            reason=obj.optional("reason", _text),
            error=obj.optional("error", _text),
        )

    def to_json(self) -> dict[str, Any]:
        # `version` is always written, null or not; `reason` and `error` only when there is one
        return {k: v for k, v in asdict(self).items() if v is not None or k == "version"}


def _where(value: Any, name: str, findings: Findings) -> dict[str, Any]:
    """An event's `start` or `last`: {"order": ORDER, "time": epoch seconds or null}."""
    obj = _Object(value, name, ("order", "time"), findings)
    return {"order": obj.field("order", _order), "time": obj.optional("time", _number)}


def _errors(value: Any, name: str, findings: Findings) -> dict[str, float]:
    obj = _Object(value, name, None, findings)
    return {key: _number(obj.data[key], obj.at(key), 0.0) for key in obj.data}


@dataclass
class AlarmEvent:
    """`scoring.event`: live scoring's open alarm event (live.Event words its messages).

    Reset whole when a field is damaged, as every message of the event carries them all:
    that event's `closed` message is then never sent, and an alarm that goes on opens a
    new event. Nothing else is lost: alarms are decided from the readings, not from here.
    """

    event_id: str
    version: int
    start: dict[str, Any]  # {"order": ORDER, "time": epoch seconds or null}
    last: dict[str, Any]
    peak_score: float
    threshold: float
    errors: dict[str, float]  # each channel's error, summed over the event's windows
    quiet: int = 0  # windows below the rule since its last alarm window

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> AlarmEvent:
        obj = _Object(value, name, _names(cls), findings)
        return cls(
            event_id=obj.field("event_id", _uuid),
            version=obj.field("version", _version),
            start=obj.field("start", lambda v, n: _where(v, n, findings)),
            last=obj.field("last", lambda v, n: _where(v, n, findings)),
            peak_score=obj.field("peak_score", _score),
            threshold=obj.field("threshold", _score),
            errors=obj.field("errors", lambda v, n: _errors(v, n, findings)),
            quiet=obj.optional("quiet", _count) or 0,
        )


@dataclass
class ScoringPosition:
    """`scoring`: where live scoring stands (live.Position), saved after every step.

    Each field is reset alone. `last_order` to null: scoring starts again at the newest
    row, and the rows that landed since the last save are scored by `smocsd score`, not
    live (the same as scoring switched on now); `recent` and `recent_high` to []: the
    alarm rule's and the sustained rule's look-back of a few windows start empty, so an
    alarm under way may fire those windows later;
    `event`: see AlarmEvent; `version` and `at` are for `status` only.
    """

    last_order: int | None = None  # the last row scored; null: start at the newest row
    version: int | None = None
    recent: list[bool] = field(default_factory=list)  # the alarm rule's look-back
    # The sustained rule's look-back: each window's channels above its level.
    recent_high: list[list[int]] = field(default_factory=list)
    event: AlarmEvent | None = None
    at: str | None = None  # when it was saved (utcnow())

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> ScoringPosition:
        obj = _Object(value, name, _names(cls), findings)
        return cls(
            last_order=findings.keep(lambda: obj.optional("last_order", _order), None),
            version=findings.keep(lambda: obj.optional("version", _version), None),
            recent=findings.keep(lambda: obj.optional("recent", _booleans) or [], []),
            recent_high=findings.keep(lambda: obj.optional("recent_high", _index_lists) or [], []),
            event=findings.keep(
                lambda: obj.optional("event", lambda v, n: AlarmEvent.parse(v, n, findings)),
                None,
                f"{obj.at('event')} reset",
            ),
            at=findings.keep(lambda: obj.optional("at", _text), None),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "last_order": self.last_order,
            "version": self.version,
            "recent": self.recent,
            # Only while the sustained rule looks back on a channel: the file of a model
            # without that rule, or one quiet for a while, stays as earlier releases wrote it.
            **({"recent_high": self.recent_high} if any(self.recent_high) else {}),
            "event": None if self.event is None else asdict(self.event),
            "at": self.at,
        }


@dataclass
class RecordedSpan:
    """A range of rows screening left out of training: [first, last, why, version, since]
    in the file (screen.Span)."""

    first: int
    last: int
    why: str  # one of WHYS
    version: int | None = None  # the model that alarmed
    since: float | None = None  # epoch time of its first row

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> RecordedSpan:
        """Raises Damage when its rows are unknown: it is dropped then. A damaged `why`
        becomes "spike": its rows stay out of training, and no challenger is held to alarm
        on them; a damaged `version` or `since` null: that range is never accepted by
        model.accept_after, which only an operator's `smocsd accept` then does."""
        if not isinstance(value, list) or len(value) != 5:
            raise Damage(name, f"expected [first, last, why, version, since], got {_shown(value)}")
        first = _order(value[0], f"{name}[0]")
        last = _order(value[1], f"{name}[1]")
        if last < first:
            raise Damage(f"{name}[1]", f"last row {last} is before the first, {first}")

        def item(i: int, check: Callable[[Any, str], Any], default: Any, what: str) -> Any:
            return findings.keep(lambda: check(value[i], f"{name}[{i}]"), default, what)

        return cls(
            first,
            last,
            item(2, _why, "spike", 'set to "spike"'),
            item(3, _or_null(_count), None, "set to null"),
            item(4, _or_null(_number), None, "set to null"),
        )

    def to_json(self) -> list[Any]:
        return [self.first, self.last, self.why, self.version, self.since]


@dataclass
class ScreeningRecord:
    """`jobs.<model.name>.screened`: what screening has seen and left out (screen.py).

    A damaged range is repaired or dropped (RecordedSpan); a dropped one's rows may be
    trained on, as before screening recorded them. `to` to absent: the next screening
    starts after the last trained row and scores again what it had scored since (at most
    training.max_rows rows); `accept_known` to 0: every screening sets it before a
    promotion reads it; `accepted_through` to 0, as the contract reads its absence: the
    accept labels count as pending until the next promotion, and the current model's
    alarms on rows after them go unrecorded until then.
    """

    to: int | None = None  # the last row screened
    spans: list[RecordedSpan] = field(default_factory=list)
    accepted_through: int = 0
    accept_known: int = 0

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> ScreeningRecord:
        obj = _Object(value, name, _names(cls), findings)
        spans = []
        for i, item in enumerate(findings.keep(lambda: obj.optional("spans", _list) or [], [])):
            try:
                spans.append(RecordedSpan.parse(item, f"{obj.at('spans')}[{i}]", findings))
            except Damage as damage:
                findings.note(damage, "dropped")
        return cls(
            to=findings.keep(lambda: obj.optional("to", _order), None),
            spans=spans,
            accepted_through=findings.keep(
                lambda: obj.optional("accepted_through", _count) or 0, 0
            ),
            accept_known=findings.keep(lambda: obj.optional("accept_known", _count) or 0, 0),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "spans": [s.to_json() for s in self.spans],
            "accepted_through": self.accepted_through,
            "accept_known": self.accept_known,
        }
        if self.to is not None:
            data["to"] = self.to
        return data


@dataclass
class JobEntry:
    """`jobs.<model.name>`: a job's `state` dict (TrainingJob.state), smocsd's keys typed.

    Each of smocsd's keys is reset alone, to absent: `last_order`: the built-in job's
    gate starts over as before a first training (it trains at the next check, on the
    newest rows); `trained_at`: min_interval counts as passed; `accept_tried`: the newest
    accept label makes the gate train at once one more time; `screened`: see
    ScreeningRecord. The job's own keys are kept as it saved them: they are its to check.
    """

    last_order: int | None = None  # the last row trained on
    trained_at: float | None = None  # epoch time of the last training
    accept_tried: int | None = None  # the highest accept label id the gate trained at once for
    screened: ScreeningRecord | None = None
    own: dict[str, Any] = field(default_factory=dict)  # the job's own keys

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> JobEntry:
        obj = _Object(value, name, None, findings)
        return cls(
            last_order=findings.keep(lambda: obj.optional("last_order", _order), None),
            trained_at=findings.keep(lambda: obj.optional("trained_at", _epoch), None),
            accept_tried=findings.keep(lambda: obj.optional("accept_tried", _count), None),
            screened=findings.keep(
                lambda: obj.optional(
                    "screened", lambda v, n: ScreeningRecord.parse(v, n, findings)
                ),
                None,
            ),
            own={k: v for k, v in obj.data.items() if k not in _JOB_KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        """The dict the job is given and the file holds; an absent key stays absent."""
        typed = {
            "last_order": self.last_order,
            "trained_at": self.trained_at,
            "accept_tried": self.accept_tried,
            "screened": None if self.screened is None else self.screened.to_json(),
        }
        return {**self.own, **{k: v for k, v in typed.items() if v is not None}}


_JOB_KEYS = _names(JobEntry) - {"own"}


@dataclass
class ModelRecord:
    """`models.<name>`: one model's last training cycle and live-scoring position (see
    CycleRecord and ScoringPosition for what a reset costs)."""

    last_cycle: CycleRecord | None = None
    scoring: ScoringPosition | None = None

    @classmethod
    def parse(cls, value: Any, name: str, findings: Findings) -> ModelRecord:
        obj = _Object(value, name, _names(cls), findings)
        return cls(
            last_cycle=findings.keep(
                lambda: obj.optional("last_cycle", lambda v, n: CycleRecord.parse(v, n, findings)),
                None,
                f"{obj.at('last_cycle')} reset",
            ),
            scoring=findings.keep(
                lambda: obj.optional("scoring", lambda v, n: ScoringPosition.parse(v, n, findings)),
                None,
            ),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.last_cycle is not None:
            data["last_cycle"] = self.last_cycle.to_json()
        if self.scoring is not None:
            data["scoring"] = self.scoring.to_json()
        return data


@dataclass
class StateFile:
    """The whole of state.json. `next_check` is for `status` only: reset, it says "not
    scheduled" until the daemon next waits. A damaged `jobs` is reset whole, a damaged
    entry in it alone: that model's job starts as new (JobEntry)."""

    last_cycle: CycleRecord | None = None  # the last cycle of any model
    next_check: str | None = None  # TIME_FORMAT
    # Where the one model of a release before [models] tables stood: the scoring position
    # of the model named like the top-level model.name, until it saves its own.
    scoring: ScoringPosition | None = None
    jobs: dict[str, JobEntry] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> tuple[StateFile, Findings]:
        """The checked record and what was wrong; never raises on any JSON object."""
        findings = Findings()
        obj = _Object(data, "", _names(cls), findings)

        def per_model(record: Any) -> Callable[[Any, str], dict[str, Any]]:
            """A {model name: record} object; a damaged record alone is reset."""

            def parse(value: Any, name: str) -> dict[str, Any]:
                entries = _Object(value, name, None, findings)
                parsed = {}
                for model, entry in entries.data.items():
                    try:
                        parsed[model] = record.parse(entry, entries.at(model), findings)
                    except Damage as damage:
                        findings.note(damage, "reset")
                return parsed

            return parse

        state = cls(
            last_cycle=findings.keep(
                lambda: obj.optional("last_cycle", lambda v, n: CycleRecord.parse(v, n, findings)),
                None,
                "last_cycle reset",
            ),
            next_check=findings.keep(lambda: obj.optional("next_check", _time), None),
            scoring=findings.keep(
                lambda: obj.optional("scoring", lambda v, n: ScoringPosition.parse(v, n, findings)),
                None,
            ),
            jobs=findings.keep(lambda: obj.optional("jobs", per_model(JobEntry)) or {}, {}),
            models=findings.keep(lambda: obj.optional("models", per_model(ModelRecord)) or {}, {}),
        )
        return state, findings

    def scoring_of(self, model: str, legacy_owner: str) -> ScoringPosition | None:
        """`model`'s live-scoring position; the top-level record of an older release is
        the position of `legacy_owner` (the top-level model.name) until it saves its own."""
        record = self.models.get(model)
        if record is not None and record.scoring is not None:
            return record.scoring
        return self.scoring if model == legacy_owner else None

    def last_cycle_of(self, model: str, legacy_owner: str) -> CycleRecord | None:
        """`model`'s last training cycle, as scoring_of finds its position."""
        record = self.models.get(model)
        if record is not None and record.last_cycle is not None:
            return record.last_cycle
        return self.legacy_last_cycle if model == legacy_owner else None

    @property
    def legacy_last_cycle(self) -> CycleRecord | None:
        """The top-level last cycle as a release before [models] tables left it: the one
        model's. Every cycle of this release also writes its model's own record, so with
        any such record the top-level one is no longer an older release's. (Scoring
        positions alone under models.<name> do not say so: this release's first start
        saves them.)"""
        return None if any(r.last_cycle for r in self.models.values()) else self.last_cycle

    def spans(self, model: str) -> list[RecordedSpan]:
        """The row ranges screening left out of `model`'s training."""
        entry = self.jobs.get(model)
        return [] if entry is None or entry.screened is None else entry.screened.spans

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.last_cycle is not None:
            data["last_cycle"] = self.last_cycle.to_json()
        if self.next_check is not None:
            data["next_check"] = self.next_check
        if self.scoring is not None:
            data["scoring"] = self.scoring.to_json()
        if self.jobs:
            data["jobs"] = {model: entry.to_json() for model, entry in self.jobs.items()}
        if self.models:
            data["models"] = {name: record.to_json() for name, record in self.models.items()}
        return data


# What the last read of each file found wrong: a finding is said when it first appears,
# not again at every read until the next write repairs it (live scoring reads and writes
# at every step).
_said: dict[Path, set[str]] = {}


class State:
    """The daemon and manual commands share the file: writes are read-modify-write under
    state.lock, each an atomic replace, so a crash or a full disk leaves the old file."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "state.json"

    def read(self) -> StateFile:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return StateFile()
        except (ValueError, UnicodeDecodeError):
            log.error("%s: unreadable, starting from empty state", self.path)
            return StateFile()
        if not isinstance(data, dict):
            log.error("%s: not a JSON object, starting from empty state", self.path)
            return StateFile()
        state, findings = StateFile.parse(data)
        said = _said.get(self.path, set())
        for line in findings.damaged:
            if line not in said:
                log.error("%s: %s", self.path, line)
        lines = set(findings.damaged)
        if findings.unknown:
            line = f"unknown keys ignored: {', '.join(findings.unknown)}"
            if line not in said:
                log.warning("%s: %s", self.path, line)
            lines.add(line)
        _said[self.path] = lines
        return state

    def _locked(self) -> contextlib.AbstractContextManager[bool]:
        return locked(self.path.with_name("state.lock"))

    def update(
        self,
        *,
        model: str | None = None,
        job: dict[str, Any] | None = None,
        last_cycle: CycleRecord | None = None,
        next_check: str | None = None,
        scoring: ScoringPosition | None = None,
        skipped: dict[str, CycleRecord] | None = None,
        scorings: dict[str, ScoringPosition] | None = None,
    ) -> None:
        """Sets what is given for `model` (its job's state, last cycle and scoring
        position) and the daemon's `next_check`, leaving the rest and the other models'
        entries as they are; what the read found damaged is written repaired, its unknown
        keys not at all. A model's last cycle is also the file's `last_cycle`. `skipped`
        (the cycles the daemon's look at the gates skipped) and `scorings` (the positions
        of a table's partitions after a poll) give many models' records in one write: one
        a model would be hundreds of writes a minute to a gateway's SD card."""
        if model is None and (job or last_cycle or scoring):
            raise ValueError("a model's record needs its name")
        with self._locked():
            state = self.read()
            state.last_cycle = last_cycle or state.last_cycle
            state.next_check = next_check or state.next_check
            if model is not None and (last_cycle or scoring):
                record = state.models.setdefault(model, ModelRecord())
                record.last_cycle = last_cycle or record.last_cycle
                record.scoring = scoring or record.scoring
            for name, cycle in (skipped or {}).items():
                state.models.setdefault(name, ModelRecord()).last_cycle = cycle
                state.last_cycle = cycle
            for name, position in (scorings or {}).items():
                state.models.setdefault(name, ModelRecord()).scoring = position
            data = state.to_json()
            if job is not None:
                # As the job left it: its own keys are its to check; smocsd's are checked
                # at the next read.
                data.setdefault("jobs", {})[model] = job
            write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode())

    def remove_leftovers(self) -> list[str]:
        """Temp files of writes a crash interrupted; under the lock, so never a live one."""
        with self._locked():
            return remove_temp_files(self.path)
