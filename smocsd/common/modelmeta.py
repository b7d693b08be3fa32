"""A version's metadata.json (`smocsd.model/1`, docs/contract.md) as the typed ModelMeta.

Parsed once, where the file is read (modelfile.check, ModelStore.metadata), every field
checked: its type, its range, its finiteness, and that the per-channel lists match the
channels. A value of the wrong kind (a hand edit, a bit flip, another program's file)
would otherwise surface as a TypeError or a NaN score wherever it was used; here it is
one Damage naming the field, and the version fails its check like one whose model.onnx
is damaged. The file is immutable, so nothing is repaired: that version is never used.

Versions saved by earlier releases lack some fields; those are optional here, and mean
what they meant then: no `score` is "mse", no `outcome`/`result_id` is a result that was
published then, no `history` is not recorded, no `data.left_out` and no four last `eval`
keys are versions from before labels. Every other field has been written since the first
version that live scoring can score (with `alarm` and `time`).

Standard library only: the daemon checks versions and must not load numpy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from ..schemas import MODEL_FORMAT
from .records import (
    Damage,
    Findings,
    Object,
    integer,
    json_list,
    names,
    number,
    or_null,
    shown,
    text,
    uuid_text,
)
from .records import count as _count
from .records import nonnegative as _nonnegative
from .records import positive as _positive

T = TypeVar("T")

MODEL = "model.onnx"
METADATA = "metadata.json"
SCORES = ("channel-max", "mse")  # scoring.ScoreKind's values
OUTCOMES = ("promoted", "rejected")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


class MetaError(Exception):
    """metadata.json cannot be used: one line naming the file's field and what is wrong."""


# --- checks of one value


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise Damage(name, f"expected true or false, got {shown(value)}")
    return value


def _share(value: Any, name: str) -> float:
    share = number(value, name, 0.0)
    if share > 1.0:
        raise Damage(name, f"expected a share from 0 to 1, got {shown(value)}")
    return share


def _const(*allowed: str) -> Callable[[Any, str], str]:
    def check(value: Any, name: str) -> str:
        if value not in allowed:
            expected = " or ".join(json.dumps(a) for a in allowed)
            raise Damage(name, f"expected {expected}, got {shown(value)}")
        return value

    return check


def _name(value: Any, name: str) -> str:
    if not text(value, name):
        raise Damage(name, 'expected a non-empty string, got ""')
    return value


def _utc(value: Any, name: str) -> str:
    if not _UTC.match(text(value, name)):
        raise Damage(name, f"expected a UTC time YYYY-MM-DDTHH:MM:SSZ, got {shown(value)}")
    return value


def _list_of(check: Callable[[Any, str], T], min_items: int = 0) -> Callable[[Any, str], list[T]]:
    def checked(value: Any, name: str) -> list[T]:
        items = json_list(value, name)
        if len(items) < min_items:
            raise Damage(name, f"expected at least {min_items} item(s), got {shown(value)}")
        return [check(item, f"{name}[{i}]") for i, item in enumerate(items)]

    return checked


def _scale(value: Any, name: str) -> float:
    """A divisor, or a threshold (whose log the spike rule takes): zero or less would make
    scores inf or NaN."""
    scale = number(value, name)
    if scale <= 0.0:
        raise Damage(name, f"expected a number > 0, got {shown(value)}")
    return scale


def _object_of(check: Callable[[Any, str], T]) -> Callable[[Any, str], dict[str, T]]:
    def checked(value: Any, name: str) -> dict[str, T]:
        obj = Object(value, name, None, Findings())
        return {key: check(item, obj.at(key)) for key, item in obj.data.items()}

    return checked


def _keys(spec: dict[str, Callable[[Any, str], Any]]) -> Callable[[Any, str], dict[str, Any]]:
    """A hook's dict (`metrics`, `eval`): the keys the built-in job writes are checked
    when present, the others kept as the job returned them (the contract leaves a hook's
    return its own)."""

    def checked(value: Any, name: str) -> dict[str, Any]:
        obj = Object(value, name, None, Findings())
        for key, check in spec.items():
            obj.present(key, check)
        return obj.data

    return checked


_METRICS = _keys(
    {
        "train_loss": _nonnegative,
        "val_loss": _nonnegative,
        "epochs_run": _count,
        "duration_s": _nonnegative,
        "warm_started": _boolean,
    }
)
_EVAL = _keys(
    {
        "val_score_p50": _nonnegative,
        "val_score_p99": _nonnegative,
        "threshold": _nonnegative,
        "val_loss": _nonnegative,
        "val_windows_over_threshold": _share,
        "previous_version": or_null(_positive),
        "previous_val_loss": or_null(_nonnegative),
        "champion_problem": or_null(text),
        "left_out_rows": _count,
        "champion_alarm_windows": _count,
        "alarm_windows_kept": or_null(_share),
        "rejection": or_null(text),
    }
)


def _range(value: Any, name: str, whys: tuple[str, ...] | None) -> dict[str, Any]:
    known = ("first", "last", "rows") if whys is None else ("first", "last", "why", "rows")
    obj = _strict(value, name, known)
    first, last = obj.field("first", integer), obj.field("last", integer)
    if last < first:
        raise Damage(obj.at("last"), f"last row {last} is before the first, {first}")
    obj.field("rows", _count)
    if whys is not None:
        obj.field("why", _const(*whys))
    return obj.data


def _left_out(value: Any, name: str) -> dict[str, Any]:
    """data.left_out, kept as written (screen.LeaveOut.summary); its values checked."""
    obj = _strict(value, name, ("rows", "ranges", "accepted"))
    obj.field("rows", _count)
    obj.field("ranges", _list_of(lambda v, n: _range(v, n, ("alarm", "spike", "excluded"))))
    obj.field("accepted", _list_of(lambda v, n: _range(v, n, None)))
    return obj.data


def _strict(value: Any, name: str, known: tuple[str, ...] | frozenset[str]) -> Object:
    """An object with only the keys `known`: the contract's table closes each object of
    the format (a key added would make a new format name), so another key is damage."""
    findings = Findings()
    obj = Object(value, name, known, findings)
    if findings.unknown:
        raise Damage(findings.unknown[0], "not a field of this format")
    return obj


# --- the records


@dataclass(frozen=True)
class NormalizationMeta:
    """`normalization`: the model sees (x - mean) / scale per channel."""

    mean: list[float]
    scale: list[float]
    kind: str = "zscore"

    @classmethod
    def parse(cls, value: Any, name: str) -> NormalizationMeta:
        obj = _strict(value, name, names(cls))
        return cls(
            kind=obj.field("kind", _const("zscore")),
            mean=obj.field("mean", _list_of(number, 1)),
            scale=obj.field("scale", _list_of(_scale, 1)),
        )


def _k_of_n(obj: Object, above: int, of: int) -> None:
    if above > of:  # a rule that can never fire: silence, not an alarm
        raise Damage(obj.at("above"), f"{above} is more than `of`, {of}")


@dataclass(frozen=True)
class SustainedMeta:
    """`alarm.sustained`: also alarm while one channel's error is above `level` (in
    channel_scale's units) on `above` of the last `of` windows."""

    above: int
    of: int
    level: float

    @classmethod
    def parse(cls, value: Any, name: str) -> SustainedMeta:
        obj = _strict(value, name, names(cls))
        rule = cls(
            above=obj.field("above", _positive),
            of=obj.field("of", _positive),
            level=obj.field("level", _scale),
        )
        _k_of_n(obj, rule.above, rule.of)
        return rule


@dataclass(frozen=True)
class LevelMeta:
    """`alarm.level`: also alarm on a window whose mean in a channel has moved by more
    than that channel's `limit` (normalized units) from its mean over the `baseline` rows
    ending `gap` rows before the window, away from the training rows' mean."""

    gap: int
    baseline: int
    limit: list[float]

    @classmethod
    def parse(cls, value: Any, name: str) -> LevelMeta:
        obj = _strict(value, name, names(cls))
        return cls(
            gap=obj.field("gap", _count),
            baseline=obj.field("baseline", _positive),
            limit=obj.field("limit", _list_of(_scale, 1)),
        )


@dataclass(frozen=True)
class AlarmMeta:
    """`alarm`: alarm while `above` of the last `of` windows are over the threshold or
    moved (the level rule, `level`: absent in versions saved before it or without one), or
    while the sustained rule fires (absent in versions saved before it, and with "mse")."""

    above: int
    of: int
    kind: str = "k-of-n"
    sustained: SustainedMeta | None = None
    level: LevelMeta | None = None

    @classmethod
    def parse(cls, value: Any, name: str) -> AlarmMeta:
        obj = _strict(value, name, names(cls))
        alarm = cls(
            kind=obj.field("kind", _const("k-of-n")),
            above=obj.field("above", _positive),
            of=obj.field("of", _positive),
            sustained=obj.present("sustained", SustainedMeta.parse),
            level=obj.present("level", LevelMeta.parse),
        )
        _k_of_n(obj, alarm.above, alarm.of)
        return alarm

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "above": self.above, "of": self.of}
        if self.sustained is not None:
            data["sustained"] = asdict(self.sustained)
        if self.level is not None:
            data["level"] = asdict(self.level)
        return data


@dataclass(frozen=True)
class TimeMeta:
    """`time`: the time column as training saw it; no window spans more than max_gap_s."""

    interval_s: float | None
    max_gap_s: float | None
    gaps: int
    out_of_order: int
    duplicate_times: int
    rows_without_time: int

    @classmethod
    def parse(cls, value: Any, name: str) -> TimeMeta:
        obj = _strict(value, name, names(cls))
        return cls(
            interval_s=obj.field("interval_s", or_null(_nonnegative)),
            max_gap_s=obj.field("max_gap_s", or_null(_nonnegative)),
            gaps=obj.field("gaps", _count),
            out_of_order=obj.field("out_of_order", _count),
            duplicate_times=obj.field("duplicate_times", _count),
            rows_without_time=obj.field("rows_without_time", _count),
        )


@dataclass(frozen=True)
class ThresholdFit:
    """`threshold_fit` (threshold.ThresholdFit): threshold = exp(log_median + k * log_scale)."""

    method: str
    false_alarm_rate: float
    confidence: float
    log_median: float
    log_scale: float
    windows: int
    effective_windows: float
    k: float

    @classmethod
    def parse(cls, value: Any, name: str) -> ThresholdFit:
        obj = _strict(value, name, names(cls))
        return cls(
            method=obj.field("method", text),
            false_alarm_rate=obj.field("false_alarm_rate", _share),
            confidence=obj.field("confidence", _share),
            log_median=obj.field("log_median", number),
            log_scale=obj.field("log_scale", _nonnegative),
            windows=obj.field("windows", _count),
            effective_windows=obj.field("effective_windows", _nonnegative),
            k=obj.field("k", number),
        )


@dataclass(frozen=True)
class ChannelError:
    """One channel of `channel_error`."""

    val_mse: float
    share: float

    @classmethod
    def parse(cls, value: Any, name: str) -> ChannelError:
        obj = _strict(value, name, names(cls))
        return cls(obj.field("val_mse", _nonnegative), obj.field("share", _share))


@dataclass(frozen=True)
class History:
    """`history`: the losses by epoch, null where one was not finite."""

    train_loss: list[float | None]
    val_loss: list[float | None]

    @classmethod
    def parse(cls, value: Any, name: str) -> History:
        obj = _strict(value, name, names(cls))
        losses = _list_of(or_null(number))
        return cls(obj.field("train_loss", losses), obj.field("val_loss", losses))


@dataclass(frozen=True)
class DataMeta:
    """`data`: the rows trained on."""

    rows: int
    dropped_rows: int
    windows: int
    train_windows: int
    val_windows: int
    first_order: int
    last_order: int
    left_out: dict[str, Any] | None = None  # absent before labels existed

    @classmethod
    def parse(cls, value: Any, name: str) -> DataMeta:
        obj = _strict(value, name, names(cls))
        return cls(
            rows=obj.field("rows", _count),
            dropped_rows=obj.field("dropped_rows", _count),
            windows=obj.field("windows", _count),
            train_windows=obj.field("train_windows", _count),
            val_windows=obj.field("val_windows", _count),
            first_order=obj.field("first_order", integer),
            last_order=obj.field("last_order", integer),
            left_out=obj.present("left_out", _left_out),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.left_out is None:
            del data["left_out"]
        return data


@dataclass(frozen=True)
class FileEntry:
    """One file of `files`: what modelfile.check verifies it against."""

    sha256: str
    bytes: int

    @classmethod
    def parse(cls, value: Any, name: str) -> FileEntry:
        obj = _strict(value, name, names(cls))
        digest = obj.field("sha256", text)
        if not _SHA256.match(digest):
            raise Damage(obj.at("sha256"), f"expected 64 hex digits, got {shown(digest)}")
        return cls(digest, obj.field("bytes", _count))


def _files(value: Any, name: str) -> dict[str, FileEntry]:
    obj = Object(value, name, None, Findings())
    for key in obj.data:
        # A plain name: a damaged list must not make modelfile.check read outside the version.
        if not key or key in (".", "..", METADATA) or "/" in key or "\0" in key:
            raise Damage(name, f"lists {json.dumps(key)}, not a file name")
    if MODEL not in obj.data:
        raise Damage(name, f"{MODEL} is not listed")
    return {key: FileEntry.parse(entry, obj.at(key)) for key, entry in obj.data.items()}


_QUANTILES = _object_of(_object_of(_nonnegative))

# Fields of ModelMeta that earlier releases did not write: absent, they are None here and
# absent again in to_json().
_OPTIONAL = frozenset({"outcome", "result_id", "score", "channel_scale", "history"})


@dataclass(frozen=True)
class ModelMeta:
    """The whole of metadata.json; see docs/contract.md for each field."""

    format: str
    name: str
    version: int
    created_at: str
    device_id: str
    backend: str
    window_size: int
    stride: int
    channels: list[str]
    input_name: str
    output_name: str
    normalization: NormalizationMeta
    threshold: float
    threshold_fit: ThresholdFit
    score_quantiles: dict[str, dict[str, float]]
    alarm: AlarmMeta
    time: TimeMeta
    channel_error: dict[str, ChannelError]
    metrics: dict[str, Any]  # train_model's return
    eval: dict[str, Any]  # eval_model's return
    data: DataMeta
    files: dict[str, FileEntry]
    software: dict[str, str]
    outcome: str | None = None  # absent: saved before results were recorded in the store
    result_id: str | None = None
    score: str | None = None  # absent: "mse", as every version before channel-max
    channel_scale: list[float] | None = None  # with "channel-max" only
    history: History | None = None

    @classmethod
    def parse(cls, value: Any) -> ModelMeta:
        """The checked record; raises Damage naming the first wrong field, and nothing else
        on any value json.loads returns."""
        obj = _strict(value, "", names(cls))
        meta = cls(
            format=obj.field("format", _const(MODEL_FORMAT)),
            name=obj.field("name", _name),
            version=obj.field("version", _positive),
            created_at=obj.field("created_at", _utc),
            device_id=obj.field("device_id", _name),
            backend=obj.field("backend", _name),
            window_size=obj.field("window_size", _positive),
            stride=obj.field("stride", _positive),
            channels=obj.field("channels", _list_of(_name, 1)),
            input_name=obj.field("input_name", _name),
            output_name=obj.field("output_name", _name),
            normalization=obj.field("normalization", NormalizationMeta.parse),
            threshold=obj.field("threshold", _scale),
            threshold_fit=obj.field("threshold_fit", ThresholdFit.parse),
            score_quantiles=obj.field("score_quantiles", _QUANTILES),
            alarm=obj.field("alarm", AlarmMeta.parse),
            time=obj.field("time", TimeMeta.parse),
            channel_error=obj.field("channel_error", _object_of(ChannelError.parse)),
            metrics=obj.field("metrics", _METRICS),
            eval=obj.field("eval", _EVAL),
            data=obj.field("data", DataMeta.parse),
            files=obj.field("files", _files),
            software=obj.field("software", _object_of(text)),
            outcome=obj.present("outcome", _const(*OUTCOMES)),
            result_id=obj.present("result_id", uuid_text),
            score=obj.present("score", _const(*SCORES)),
            channel_scale=obj.present("channel_scale", _list_of(_scale, 1)),
            history=obj.present("history", History.parse),
        )
        meta._check_channels(obj)
        return meta

    def _check_channels(self, obj: Object) -> None:
        """The per-channel lists have one entry per channel: numpy would broadcast or
        fail on any other length, mid-scoring."""
        n = len(self.channels)
        if len(set(self.channels)) != n:
            raise Damage(obj.at("channels"), f"a channel is named twice: {shown(self.channels)}")
        per_channel = {
            "normalization.mean": self.normalization.mean,
            "normalization.scale": self.normalization.scale,
            "channel_scale": self.channel_scale,
            "alarm.level.limit": self.alarm.level.limit if self.alarm.level else None,
        }
        for key, values in per_channel.items():
            if values is not None and len(values) != n:
                raise Damage(key, f"{len(values)} values for {n} channel(s)")
        if (self.score == "channel-max") != (self.channel_scale is not None):
            raise Damage(
                obj.at("channel_scale"),
                'expected with "score": "channel-max" and only then',
            )
        if self.alarm.sustained is not None and self.score != "channel-max":
            raise Damage("alarm.sustained", 'only with "score": "channel-max"')

    @property
    def score_kind(self) -> str:
        return self.score or "mse"

    def with_files(self, files: dict[str, FileEntry]) -> ModelMeta:
        return replace(self, files=files)

    def to_json(self) -> dict[str, Any]:
        """The file's content: parse(to_json()) is this record again."""
        data: dict[str, Any] = {}
        for f in self.__dataclass_fields__.values():
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if f.name in ("data", "alarm"):
                value = value.to_json()
            elif hasattr(value, "__dataclass_fields__"):
                value = asdict(value)
            elif f.name in ("channel_error", "files"):
                value = {key: asdict(entry) for key, entry in value.items()}
            data[f.name] = value
        return data

    def dumps(self) -> str:
        """The file's text: strict JSON, so any consumer's parser reads it."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"


def load(path: Path) -> ModelMeta:
    """metadata.json at `path`, checked; raises MetaError naming what is wrong (after the
    file's name), or FileNotFoundError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise  # the callers say it their way: a missing file or an unknown version
    except OSError as e:
        raise MetaError(f"unreadable ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MetaError("not UTF-8") from None
    except (ValueError, RecursionError) as e:  # ValueError: also an int of 5000 digits
        raise MetaError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MetaError("not a JSON object")
    try:
        return ModelMeta.parse(data)
    except Damage as damage:
        raise MetaError(str(damage)) from None
