"""The TOML configuration, loaded into frozen dataclasses.

Every problem is reported as one line naming the file and the key, all at once,
so an operator fixes a bad file in one edit instead of one restart per typo.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pwd
import re
import shlex
import socket
import stat
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger("smocsd")

DEFAULT_PATH = Path("/etc/smocsd/smocsd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/smocsd")


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --- value parsers: each takes the raw TOML value and returns it converted, or
# raises ValueError with a message that the loader prefixes with the key. Each is a
# Parser that also says in words what it accepts, for the generated documents.


def _toml(value: Any) -> str:
    """A parsed value as a TOML literal: a default as the documents write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    return repr(value)


@dataclass(frozen=True)
class Parser:
    """A key's parser with what it accepts in words, so that the documents generated from
    it (packaging/config_docs.py) state exactly the ranges and choices it checks."""

    check: Callable[[Any], Any]  # the raw TOML value -> the value, or ValueError
    accepted: str  # Markdown: "an integer ≥ 2"
    show: Callable[[Any], str] = _toml  # a parsed value back as TOML

    def __call__(self, value: Any) -> Any:
        return self.check(value)


def _accepts(
    accepted: str, show: Callable[[Any], str] = _toml
) -> Callable[[Callable[[Any], Any]], Parser]:
    """Makes a parser function a Parser accepting what `accepted` says."""
    return lambda check: Parser(check, accepted, show)


def _type_name(value: Any) -> str:
    return type(value).__name__


@_accepts("a string")
def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value


@_accepts("not empty")
def _nonempty_str(value: Any) -> str:
    if not _str(value).strip():
        raise ValueError("must not be empty")
    return value


@_accepts("`true` or `false`")
def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


# TOML integers are unbounded in Python; every one must fit a signed 64-bit integer,
# because SQLite's LIMIT and PostgreSQL's int8 (and numpy's int64) take no more.
_INT64_MAX = 2**63 - 1


def _int(minimum: int, maximum: int = _INT64_MAX) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_type_name(value)}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            limit = " (the largest signed 64-bit integer)" if maximum == _INT64_MAX else ""
            raise ValueError(f"must be <= {maximum}{limit}, got {value}")
        return value

    if maximum == _INT64_MAX:
        return Parser(parse, f"an integer ≥ {minimum}")
    return Parser(parse, f"an integer in [{minimum}, {maximum}]")


def _float(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Parser:
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {_type_name(value)}")
        value = float(value)
        if math.isnan(value):
            raise ValueError("must be a number, got nan")
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            raise ValueError(f"must be in {left}{low:g}, {high:g}{right}, got {value:g}")
        return value

    return Parser(parse, f"a number in {left}{low:g}, {high:g}{right}")


def _choice(*options: str) -> Parser:
    def parse(value: Any) -> str:
        if _str(value) not in options:
            raise ValueError(f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value

    return Parser(parse, "one of " + ", ".join(f'`"{option}"`' for option in options))


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
# No interval a gateway needs is longer than a year; far beyond, time.sleep() and
# datetime arithmetic on the deadline overflow.
MAX_DURATION = 366 * 86400.0
# SQLite's busy timeout and PostgreSQL's statement_timeout are C ints of milliseconds:
# beyond 2**31 - 1 ms (24.8 days) SQLite silently waits not at all, PostgreSQL refuses.
_MAX_DB_TIMEOUT = 24 * 86400.0
# librdkafka's request.timeout.ms takes at most 15 minutes; MQTT's keepalive (twice the
# timeout) a 16-bit count of seconds. Longer would stall the daemon's tick anyway. Not
# bounded by the unit's WatchdogSec (2 min): an attempt feeds the watchdog while it waits
# (smocsd/delivery/publish.py, _SLICE).
_MAX_SEND_TIMEOUT = 15 * 60.0


def _duration_text(seconds: float) -> str:
    """Seconds as the largest whole unit: 86400.0 -> '1d'."""
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_duration(value: Any, maximum: float = MAX_DURATION) -> float:
    """'90s', '10m', '24h', '1d', '250ms' or plain seconds -> seconds, finite and at most
    `maximum`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '90s', '10m' or '24h'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(_str(value))
        if not match:
            raise ValueError(f"expected a duration like '90s', '10m' or '24h', got {value!r}")
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if math.isnan(seconds):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if seconds > maximum:
        raise ValueError(f"must be at most {_duration_text(maximum)}, got {value!r}")
    return seconds


def _show_duration(seconds: float) -> str:
    return f'"{_duration_text(seconds)}"'


_duration = Parser(parse_duration, "a duration ≥ 0", _show_duration)


def _positive_duration(maximum: float = MAX_DURATION) -> Parser:
    def parse(value: Any) -> float:
        seconds = parse_duration(value, maximum)
        if seconds <= 0:
            raise ValueError(f"must be longer than zero, got {value!r}")
        return seconds

    limit = "" if maximum == MAX_DURATION else f", ≤ {_show_duration(maximum)}"
    return Parser(parse, f"a duration > 0{limit}", _show_duration)


@_accepts(
    '`"auto"` (three median sampling intervals) or a duration > 0',
    lambda gap: '"auto"' if gap is None else _show_duration(gap),
)
def _max_gap(value: Any) -> float | None:
    """'auto' (None: three median sampling intervals) or a duration."""
    return None if value == "auto" else _positive_duration()(value)


# training.networks = "auto": FEW_NETWORKS networks for a machine of at most FEW_CHANNELS
# channels, one above. bench/detect.py's real plants: at 3 to 5 channels three networks
# found one-channel faults earlier at as few false alarms, and alarmed on fewer normal rows
# of SKAB's drifting pump; with all its 8 channels the seeds' mean BA there fell (0.807 to
# 0.795) as its FAR rose.
FEW_CHANNELS = 5
FEW_NETWORKS = 3


@_accepts(
    f'`"auto"` ({FEW_NETWORKS} for up to {FEW_CHANNELS} channels, else 1) or an integer ≥ 1',
    lambda n: '"auto"' if n is None else _toml(n),
)
def _networks(value: Any) -> int | None:
    """'auto' (None: by the number of channels) or a count."""
    if value == "auto":
        return None
    if isinstance(value, str):
        raise ValueError(f'expected "auto" or an integer, got {value!r}')
    return _int(1)(value)


@_accepts(
    '`"off"` or a duration > 0', lambda after: '"off"' if after is None else _show_duration(after)
)
def _off_or_duration(value: Any) -> float | None:
    """'off' (None) or a duration longer than zero."""
    return None if value == "off" else _positive_duration()(value)


@_accepts("a path")
def _path(value: Any) -> Path:
    return Path(_nonempty_str(value))


# fullmatch, not match with ^...$: "$" also matches before a trailing newline.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@_accepts("a plain identifier, `[A-Za-z_][A-Za-z0-9_]*`")
def _identifier(value: Any) -> str:
    if not _IDENT.fullmatch(_str(value)):
        raise ValueError(f"{value!r} is not a plain SQL identifier (letters, digits, _)")
    return value


@_accepts(
    "a column name exactly as the table has it: not empty, no surrounding whitespace, "
    "no control character"
)
def _column(value: Any) -> str:
    """A column named exactly as the table has it: plant historians use spaces, mixed
    case and non-ASCII letters, and sources.py quotes every name.

    Refused are only names no table has on purpose: empty, padded with whitespace (a
    typo), or holding control characters (PostgreSQL cannot store NUL, and the error
    line naming the column must stay one line).
    """
    name = _str(value)
    if not name:
        raise ValueError("must not be empty")
    if name != name.strip():
        raise ValueError(f"{name!r} has leading or trailing whitespace")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise ValueError(f"{name!r} contains a control character")
    return name


@_accepts("`name` or `schema.name`, each `[A-Za-z_][A-Za-z0-9_]*`")
def _table_name(value: Any) -> str:
    """A table, optionally schema-qualified (PostgreSQL).

    Kept to plain identifiers so that the one '.' always separates schema and table.
    """
    for part in _str(value).split("."):
        _identifier(part)
    if value.count(".") > 1:
        raise ValueError(f"{value!r}: at most one schema qualifier")
    return value


def _list_of(item: Parser, *, nonempty: bool = True, unique: bool = False) -> Parser:
    def parse(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {_type_name(value)}")
        if nonempty and not value:
            raise ValueError("must not be empty")
        items = []
        for i, element in enumerate(value):
            try:
                items.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {i + 1}: {exc}") from None
        if unique and len(set(items)) != len(items):
            raise ValueError("must not contain duplicates")
        return tuple(items)

    accepted = "a non-empty list" if nonempty else "a list"
    accepted += " without duplicates" if unique else ""
    accepted += f", each {item.accepted}" + ("" if nonempty else "; may be empty")
    return Parser(parse, accepted)


def _control_free(value: Any) -> str:
    """A name that also goes into log lines: a newline there forges a line, NUL ends the
    C strings of librdkafka and the brokers."""
    if any(unicodedata.category(ch) == "Cc" for ch in _str(value)):
        raise ValueError(f"{value!r} contains a control character")
    return value


@_accepts(
    "not empty; no `/`, `#`, `+` or control character (one MQTT topic level; the Kafka key "
    "splits at its `/`)"
)
def _device_id(value: Any) -> str:
    """The gateway's name in the MQTT topic, the Kafka key, client ids and log lines.

    Refused besides control characters: the MQTT wildcards '#' and '+' (a broker drops a
    PUBLISH whose topic holds them), and '/': the id is one level of the MQTT topic, which
    subscribers match with '+', and the Kafka key '<device_id>/<model>' splits at its
    only '/'.
    """
    _control_free(_nonempty_str(value))
    bad = sorted(set(value) & set("#+/"))
    if bad:
        raise ValueError(f"{value!r} contains {', '.join(map(repr, bad))}")
    return value


# The placeholders of the publish.mqtt topics, filled in per message (publish.py): the
# device_id and the model's name; any other brace is a typo of one.
DEVICE_ID_PLACEHOLDER = "{device_id}"
MODEL_PLACEHOLDER = "{model}"
_MQTT_PLACEHOLDER = re.compile("|".join(map(re.escape, (DEVICE_ID_PLACEHOLDER, MODEL_PLACEHOLDER))))
MQTT_TOPIC_MAX_BYTES = 65535  # MQTT's length prefix is 16 bits, of UTF-8


def fill_mqtt_topic(pattern: str, device_id: str, model: str) -> str:
    """A publish.mqtt topic with its placeholders filled in, in one pass: a brace in the
    device_id or the model's name is text, never a placeholder."""
    values = {DEVICE_ID_PLACEHOLDER: device_id, MODEL_PLACEHOLDER: model}
    return _MQTT_PLACEHOLDER.sub(lambda m: values[m.group()], pattern)


@_accepts(
    f"not empty; no `#`, `+`, control character or leading `$`; `{DEVICE_ID_PLACEHOLDER}` and "
    f"`{MODEL_PLACEHOLDER}` (the model's name, one topic level) are the only placeholders; at "
    f"most {MQTT_TOPIC_MAX_BYTES} UTF-8 bytes filled in with the longest model name configured "
    "(a partitioned one's with a 64-character value)"
)
def _mqtt_topic(value: Any) -> str:
    """A topic to publish to: no wildcards, not a '$' topic (reserved for the broker's own,
    like $SYS), no control characters (the spec forbids NUL, brokers may drop U+0001-
    U+009F); its length is checked once the placeholders are substituted (_check_publish)."""
    _control_free(_nonempty_str(value))
    bad = sorted(set(value) & set("#+"))
    if bad:
        raise ValueError(f"{value!r} contains the MQTT wildcard {', '.join(map(repr, bad))}")
    if value.startswith("$"):
        raise ValueError(f"{value!r} starts with '$', reserved for the broker's own topics")
    if set(_MQTT_PLACEHOLDER.sub("", value)) & set("{}"):
        raise ValueError(
            f"{value!r}: {DEVICE_ID_PLACEHOLDER} and {MODEL_PLACEHOLDER} are the only placeholders"
        )
    return value


_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


@_accepts("1 to 249 of `A-Z a-z 0-9 . _ -`, not `.` or `..`")
def _kafka_topic(value: Any) -> str:
    """A topic name as Kafka accepts it: 1-249 of [A-Za-z0-9._-], not '.' or '..'."""
    if not _KAFKA_TOPIC.fullmatch(_str(value)) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not a Kafka topic name (1 to 249 ASCII letters, digits, '.', '_' "
            "or '-', not '.' or '..')"
        )
    return value


_JOB = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@_accepts('`"autoencoder"` or `"package.module:ClassName"`')
def _job(value: Any) -> str:
    if _str(value) != "autoencoder" and not _JOB.fullmatch(value):
        raise ValueError(f"expected 'autoencoder' or 'package.module:ClassName', got {value!r}")
    return value


@dataclass(frozen=True)
class KeyDoc:
    """A key's documentation, kept beside its default and parser: packaging/config_docs.py
    writes the README's and the contract's key tables, the man page's key list and the
    conffile's keys from these, so that no document can drift from what the loader does.

    Markdown, one line each: `code` and links. The links of `text` resolve in the README,
    those of `rule` and `more` in docs/contract.md; the man page and the conffile keep a
    link's label, or drop a parenthesis that holds only a link.
    """

    text: str  # what the key does
    rule: str = ""  # what the value must be besides what its parser states
    unset: str = ""  # with no default (None or ""): what holds then
    example: str = ""  # with no default: a TOML value the conffile shows commented out
    more: str = ""  # the longer story: the man page, the contract and the conffile


def _opt(default: Any, parse: Parser, doc: KeyDoc) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


# --- the sections


@dataclass(frozen=True)
class DaemonConfig:
    device_id: str = _opt(
        "",
        _device_id,
        KeyDoc(
            "the gateway's name in results, Kafka keys, MQTT topics and client ids",
            unset="the host name",
            example='"gw-01"',
        ),
    )
    state_dir: Path = _opt(
        None,
        _path,
        KeyDoc(
            "models, outbox and state; `run` and `train-once` create its last component only "
            "(a missing parent: exit 78 naming the key)",
            rule="made absolute; a directory, or one whose parent exists "
            "([Command line](#command-line))",
            unset="`$STATE_DIRECTORY` (its first directory), else `/var/lib/smocsd`",
            example='"/var/lib/smocsd"',
        ),
    )
    check_interval: float = _opt(
        60.0, _positive_duration(), KeyDoc("timer period; each wait varies by ±10 % (jitter)")
    )
    log_level: str = _opt(
        "info",
        _choice("debug", "info", "warning", "error"),
        KeyDoc("the least severe level logged"),
    )
    # Each training process holds an interpreter, numpy, ONNX Runtime and its rows: on a
    # 1 GiB Raspberry Pi, two at once can be what wakes the OOM killer.
    training_processes: int = _opt(
        1,
        _int(1, 64),
        KeyDoc(
            "training processes at once, each another model's; `train-once` takes one too. "
            "More only where the gateway's cores and memory allow "
            "([Many machines](#many-machines))"
        ),
    )


@dataclass(frozen=True)
class SourceConfig:
    kind: str = _opt(
        "sqlite",
        _choice("sqlite", "postgres"),
        KeyDoc("where the readings are: a SQLite file or a PostgreSQL table"),
    )
    path: Path | None = _opt(
        None,
        _path,
        KeyDoc(
            "the SQLite database file, opened read-only; a relative path is relative to "
            "`state_dir`",
            rule="SQLite only",
            unset="`<state_dir>/readings.db`",
            example='"/var/lib/smocsd/readings.db"',
        ),
    )
    dsn: str | None = _opt(
        None,
        _str,
        KeyDoc(
            "the PostgreSQL connection string; the `PG*` variables also apply either way; a "
            "password in it draws a warning: give it by `password_file`",
            rule="PostgreSQL only: a libpq connection string (URI or `key=value`); the "
            "warning names the key, never the password",
            unset="libpq's defaults",
            example='"postgresql://smocsd@localhost/plant"',
        ),
    )
    password_file: Path | None = _opt(
        None,
        _path,
        KeyDoc(
            "a file holding the PostgreSQL password",
            rule="PostgreSQL only",
            unset="the systemd credential `pg-password` "
            "(`$CREDENTIALS_DIRECTORY/pg-password`), if present",
            example='"/etc/smocsd/pg.pass"',
        ),
    )
    table: str = _opt(
        "readings",
        _table_name,
        KeyDoc("the table of readings; may be schema-qualified (`plant.readings`)"),
    )
    time_column: str = _opt(
        "ts",
        _column,
        KeyDoc(
            "the time of each row: epoch seconds (above 1e11: milliseconds), ISO 8601 text, "
            "or a PostgreSQL `timestamp`/`timestamptz`/`date`; naive times are UTC"
        ),
    )
    order_column: str | None = _opt(
        None,
        _column,
        KeyDoc(
            "a monotonically increasing integer column: the order rows are read in; a row "
            "holding text or a blob (SQLite) or NULL (PostgreSQL) there is left out, with "
            "a warning",
            rule="required for PostgreSQL",
            unset="`rowid` (SQLite)",
            example='"id"',
        ),
    )
    channels: tuple[str, ...] = _opt(
        ("temperature", "vibration", "current"),
        _list_of(_column, unique=True),
        KeyDoc(
            'numeric columns, one model input each; any names, e.g. `"Flow Rate (m³/h)"`',
            rule="not `time_column` or `order_column`",
        ),
    )
    partition_column: str | None = _opt(
        None,
        _column,
        KeyDoc(
            "a column naming each row's asset (pump, motor, line): one model per distinct "
            "value, named `<model.name>@<value>`, trained, scored and versioned on its own "
            "rows only ([Many machines](#many-machines))",
            rule="not `time_column`, `order_column` or a channel; a value names a model only "
            "if it is an integer ≥ 0 or 1 to 64 of `A-Z a-z 0-9 . _ -` starting with a letter "
            "or digit ([Partition values](#partition-values))",
            unset="one model of all the table's rows",
            example='"asset"',
        ),
    )
    # Not a key: the partition value whose rows this model reads (Config.for_partition).
    partition: str | None = field(default=None, metadata={"derived": True})
    busy_timeout: float = _opt(
        10.0,
        _positive_duration(_MAX_DB_TIMEOUT),
        KeyDoc("SQLite: how long to wait for the writer's lock"),
    )
    statement_timeout: float = _opt(
        60.0, _positive_duration(_MAX_DB_TIMEOUT), KeyDoc("PostgreSQL: bound on one statement")
    )
    connect_timeout: float = _opt(
        10.0, _positive_duration(), KeyDoc("PostgreSQL: bound on connecting")
    )


@dataclass(frozen=True)
class TrainingConfig:
    job: str = _opt(
        "autoencoder",
        _job,
        KeyDoc(
            "the training job: the built-in autoencoder, or a user `TrainingJob`",
            rule="a `smocsd.TrainingJob` subclass importable by the daemon's Python",
        ),
    )
    backend: str = _opt(
        "auto",
        _choice("auto", "ort", "numpy"),
        KeyDoc(
            "the trainer: `ort` (ONNX Runtime's training API), `numpy`, or `auto`: ort "
            "where onnxruntime-training is installed, else numpy (`smocsd status` says which)"
        ),
    )
    window_size: int = _opt(
        10,
        _int(2),
        KeyDoc(
            "rows per sliding window, chosen by `bench/detect.py` ([why 10](#detection-quality))"
        ),
    )
    stride: int = _opt(1, _int(1), KeyDoc("rows between the starts of training windows"))
    max_gap: float | None = _opt(
        None,
        _max_gap,
        KeyDoc(
            "no window spans a longer step of the time column; `auto`: three median sampling "
            "intervals"
        ),
    )
    min_training_samples: int = _opt(
        10000,
        _int(1),
        KeyDoc(
            "rows needed before the first training (also with `--force`)",
            rule="at least 4 times `window_size`, ≤ `max_rows`",
        ),
    )
    min_new_samples: int = _opt(
        1000, _int(1), KeyDoc("new rows since the last successful training before retraining")
    )
    min_interval: float = _opt(600.0, _duration, KeyDoc("never train more often than this"))
    # Reading max_rows rows or building the graph is one silent step.
    stall_timeout: float = _opt(
        300.0,
        _positive_duration(),
        KeyDoc(
            "a training process that reports no progress this long (no batch, no step) is "
            "killed and the cycle fails"
        ),
    )
    max_rows: int = _opt(
        200000, _int(2), KeyDoc("newest rows used (bounds memory)", rule="> `window_size`")
    )
    learning_rate: float = _opt(
        0.001, _float(0.0, 1.0, low_open=True), KeyDoc("AdamW's learning rate")
    )
    batch_size: int = _opt(32, _int(1), KeyDoc("windows per training step"))
    epochs: int = _opt(
        50, _int(1), KeyDoc("at most this many passes over the training windows, for each network")
    )
    patience: int = _opt(
        5,
        _int(1),
        KeyDoc("early stopping: epochs without a better validation loss; the best epoch is kept"),
    )
    validation_fraction: float = _opt(
        0.2,
        _float(0.0, 1.0, low_open=True, high_open=True),
        KeyDoc("the newest windows validate, never shuffled into training"),
    )
    hidden: tuple[int, ...] = _opt(
        (32,), _list_of(_int(1)), KeyDoc("encoder layer sizes; the decoder mirrors them")
    )
    # One network's seed moved the Tennessee Eastman mean detection rate by 4 points.
    networks: int | None = _opt(
        None,
        _networks,
        KeyDoc(
            "networks trained apart (from seeds `seed`, `seed` + 1, ...) and saved as one "
            "model that scores a window by their mean reconstruction, each taking as long to "
            f"train; `auto`: {FEW_NETWORKS} for a machine of up to {FEW_CHANNELS} channels, 1 "
            "above ([why](#detection-quality))",
            more="Their errors on normal rows average out where one network's depend on its "
            "seed. On the real plants of 3 to 5 channels three networks found the faults "
            "that move one channel of a quiet plant earlier, at as few false alarms, and "
            "alarmed on fewer normal rows of a drifting one; with more channels they found "
            "more on the quiet plant and alarmed on more of the drifting one's normal rows "
            "([measured](../README.md#detection-quality)).",
        ),
    )
    threads: int = _opt(
        1, _int(1, 256), KeyDoc("ONNX Runtime's intra-op threads (and numpy's BLAS)")
    )
    seed: int = _opt(
        0, _int(0), KeyDoc("weight initialization and shuffling (of the first network)")
    )

    def networks_for(self, channels: int) -> int:
        """`networks`, with "auto" resolved for a machine of `channels` channels."""
        if self.networks is not None:
            return self.networks
        return FEW_NETWORKS if channels <= FEW_CHANNELS else 1


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt(
        "autoencoder",
        _identifier,
        KeyDoc("the directory under `models/` and part of the Kafka key"),
    )
    keep_versions: int = _opt(
        5, _int(1), KeyDoc("versions kept; the one `current` points to is never deleted")
    )
    promote: str = _opt(
        "if-better",
        _choice("always", "if-better"),
        KeyDoc(
            'whether a new version replaces current: `"always"`, or `"if-better"`: not worse '
            "than current on the same validation windows. Either way it must keep current's "
            "alarms ([why](#faults-repairs-and-maintenance-the-operators-say))",
            more="It must still alarm on 98 % of the windows current alarms on among the rows "
            "current alarmed on before; a recorded alarm that an accepted or excluded range "
            "touches, or where current alarms on fewer than 30 windows' worth of windows or a "
            "tenth of them, is not checked.",
        ),
    )
    # smocsd.scoring.ScoreKind; "mse" divides a fault in one channel of c by c.
    score: str = _opt(
        "channel-max",
        _choice("channel-max", "mse"),
        KeyDoc(
            'how a new version scores a window: `"channel-max"`, the largest of the '
            "channels' errors each over its own normal error, so that a fault in one channel "
            'of many is not divided by their number; `"mse"`, the mean squared error over all '
            "the window's elements ([why](#detection-quality))",
            rule="versions saved before keep theirs (metadata.json `score`): every one saved "
            'before `"channel-max"` scores by `"mse"`',
        ),
    )
    false_alarm_rate: float = _opt(
        0.0001,
        _float(0.0, 0.5, low_open=True, high_open=True),
        KeyDoc(
            "the threshold's budget: at most this share of normal windows above it, with 95 % "
            "confidence, on data like the training rows ([how](#detection-quality))",
            more="On a machine of one to five channels where a missed fault costs more than a "
            "false alarm, `0.001`: on the real plants of few channels it found more of their "
            "faults, at more false alarms "
            "([measured](../README.md#detection-quality)).",
        ),
    )
    alarm_above: int = _opt(
        2,
        _int(1),
        KeyDoc(
            "an alarm needs `alarm_above` of the last `alarm_of` windows above the threshold",
            rule="≤ `alarm_of`",
        ),
    )
    alarm_of: int = _opt(3, _int(1), KeyDoc("see `alarm_above`"))
    # smocsd.scoring.SustainedRule: a small shift that lasts stays under the threshold of
    # one window; chosen on the real plants in bench/detect.py.
    sustained_above: int = _opt(
        20,
        _int(0),
        KeyDoc(
            "also an alarm while one channel's error is above `sustained_level` times its "
            "normal error on `sustained_above` of the last `sustained_of` windows: a small "
            "shift that lasts ([why](#detection-quality)); 0 turns it off",
            rule='≤ `sustained_of`; with `score = "channel-max"` only (an `"mse"` model has '
            "no channel errors in those units)",
        ),
    )
    sustained_of: int = _opt(30, _int(1), KeyDoc("see `sustained_above`"))
    sustained_level: float = _opt(
        1.25,
        _float(0.0, 1000.0, low_open=True),
        KeyDoc(
            "see `sustained_above`; a channel's normal error (metadata.json `channel_scale`) is 1"
        ),
    )
    # smocsd.scoring.LevelRule: the network reconstructs a step that lasts in one channel
    # of a few; chosen on the real plants in bench/detect.py.
    level_limit: float = _opt(
        2.0,
        _float(0.0, 1000.0),
        KeyDoc(
            "a window also counts as over the threshold when a channel's mean over it has "
            "moved away from normal, from its mean over the `level_baseline` rows that end "
            "`level_gap` rows before the window, by more than `level_limit` times the 99th "
            "percentile of such moves in the training rows: a step or a slow leak that lasts "
            "([why](#detection-quality)); 0 turns it off",
            more="A channel coming back towards its training mean is not an alarm. Each "
            "decision reads `level_baseline + level_gap` rows before the window.",
        ),
    )
    level_gap: int = _opt(100, _int(0, 100_000), KeyDoc("rows; see `level_limit`"))
    level_baseline: int = _opt(50, _int(1, 100_000), KeyDoc("rows; see `level_limit`"))
    accept_after: float | None = _opt(
        None,
        _off_or_duration,
        KeyDoc(
            'a recorded alarm that has lasted this long (`"2d"`) by the time column, and still '
            "goes on, is accepted as the new normal when a cycle trains (a label by "
            '`accept_after`, published); `"off"`: alarmed rows stay out of training until '
            "`smocsd accept` takes them "
            "([how](#faults-repairs-and-maintenance-the-operators-say))",
            rule="a recorded alarm range reaching the newest row whose first row is older "
            "than this by the time column is accepted ([below](#left-out-of-training))",
        ),
    )


@dataclass(frozen=True)
class ScoringConfig:
    """Live scoring of every new row by the current model, in the daemon (smocsd/app/live.py)."""

    # On by default: alarms are what the daemon is for. Turned on, it starts at the newest
    # row, so an upgrade that turns it on raises no alarm on rows already stored.
    enabled: bool = _opt(
        True,
        _bool,
        KeyDoc(
            "live scoring of every new row by the current model, in the daemon "
            "([Live scoring](#live-scoring))"
        ),
    )
    poll_interval: float = _opt(
        0.5, _positive_duration(), KeyDoc("how often new rows are looked for")
    )
    close_after: int = _opt(
        10,
        _int(1, 1_000_000),
        KeyDoc(
            "windows on which no alarm rule fires before an alarm event closes: one long "
            "anomaly with a quiet moment inside stays one event"
        ),
    )


@_accepts('an absolute path ending in `.prom`, or `""` (none)')
def _textfile(value: Any) -> Path | None:
    """node_exporter's textfile collector reads only `*.prom` files of its directory, and
    the daemon's working directory is no place to guess: absolute, or "" (off)."""
    if _str(value) == "":
        return None
    _control_free(value)
    path = Path(value)
    if not path.is_absolute() or not path.name.endswith(".prom") or path.name == ".prom":
        raise ValueError(
            f"expected an absolute path ending in .prom (node_exporter's textfile collector "
            f"reads only *.prom files), got {value!r}"
        )
    return path


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics in a text file for node_exporter's textfile collector
    (smocsd/app/metrics.py); None: not written."""

    textfile: Path | None = _opt(
        None,
        _textfile,
        KeyDoc(
            "Prometheus metrics for node_exporter's textfile collector, replaced whole after "
            "every check ([Monitor](#operating-smocsd))",
            rule="([Metrics](#metrics))",
            unset="no file",
            example='"/var/lib/prometheus/node-exporter/smocsd.prom"',
            more="With Debian's prometheus-node-exporter: "
            "`/var/lib/prometheus/node-exporter/smocsd.prom` and the drop-in "
            "`examples/metrics.conf`.",
        ),
    )


_SECURITY = "a `SASL_*` `security_protocol`"


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = _opt(
        "localhost:9092",
        _nonempty_str,
        KeyDoc("the brokers; a non-empty `$KAFKA_BROKER_URL` overrides it"),
    )
    topic: str = _opt("training-results", _kafka_topic, KeyDoc("training results"))
    alarm_topic: str = _opt("anomaly-alarms", _kafka_topic, KeyDoc("alarm events of live scoring"))
    label_topic: str = _opt(
        "smocsd-labels",
        _kafka_topic,
        KeyDoc(
            "label messages, for the fleet: what `smocsd accept`, `smocsd exclude`, "
            "`smocsd labels remove` and `model.accept_after` did"
        ),
    )
    security_protocol: str | None = _opt(
        None,
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        KeyDoc(
            "how the brokers are reached", unset="librdkafka's `PLAINTEXT`", example='"SASL_SSL"'
        ),
    )
    sasl_mechanism: str | None = _opt(
        None,
        _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        KeyDoc(
            "how the SASL user logs in",
            rule=f"needs {_SECURITY}",
            unset="none",
            example='"SCRAM-SHA-512"',
        ),
    )
    sasl_username: str | None = _opt(
        None,
        _nonempty_str,
        KeyDoc(
            "the SASL user", rule=f"required with {_SECURITY}", unset="none", example='"smocsd"'
        ),
    )
    sasl_password_file: Path | None = _opt(
        None,
        _path,
        KeyDoc(
            "a file holding the SASL password",
            unset="the systemd credential `kafka-password` "
            "(`$CREDENTIALS_DIRECTORY/kafka-password`), if present",
            example='"/etc/smocsd/kafka.pass"',
        ),
    )
    ssl_ca_location: Path | None = _opt(
        None,
        _path,
        KeyDoc("CA certificates for TLS", unset="the system's CAs", example='"/etc/smocsd/ca.pem"'),
    )
    timeout: float = _opt(
        10.0, _positive_duration(_MAX_SEND_TIMEOUT), KeyDoc("bound on one delivery attempt")
    )


@dataclass(frozen=True)
class MqttConfig:
    host: str = _opt("localhost", _nonempty_str, KeyDoc("the broker"))
    port: int = _opt(1883, _int(1, 65535), KeyDoc("the broker's port"))
    topic: str = _opt(
        "smocsd/{device_id}/training-results", _mqtt_topic, KeyDoc("training results")
    )
    alarm_topic: str = _opt(
        "smocsd/{device_id}/alarms", _mqtt_topic, KeyDoc("alarm events of live scoring")
    )
    label_topic: str = _opt("smocsd/{device_id}/labels", _mqtt_topic, KeyDoc("label messages"))
    qos: int = _opt(1, _int(0, 2), KeyDoc("with 1 or 2 the broker's acknowledgement is awaited"))
    tls: bool = _opt(False, _bool, KeyDoc("TLS, verified against `ca_file` or the system's CAs"))
    ca_file: Path | None = _opt(
        None,
        _path,
        KeyDoc(
            "CA certificates for TLS",
            rule="needs `tls = true`",
            unset="the system's CAs",
            example='"/etc/smocsd/ca.pem"',
        ),
    )
    username: str | None = _opt(
        None,
        _nonempty_str,
        KeyDoc("the user to log in as", unset="no authentication", example='"smocsd"'),
    )
    password_file: Path | None = _opt(
        None,
        _path,
        KeyDoc(
            "a file holding the password",
            rule="needs `username`",
            unset="the systemd credential `mqtt-password` "
            "(`$CREDENTIALS_DIRECTORY/mqtt-password`), if present",
            example='"/etc/smocsd/mqtt.pass"',
        ),
    )
    timeout: float = _opt(
        10.0, _positive_duration(_MAX_SEND_TIMEOUT), KeyDoc("bound on one delivery attempt")
    )


@dataclass(frozen=True)
class PublishConfig:
    order: tuple[str, ...] = _opt(
        ("kafka", "mqtt"),
        _list_of(_choice("kafka", "mqtt"), nonempty=False, unique=True),
        KeyDoc(
            "tried in this order; the outbox keeps what none took, and `[]` keeps every "
            "result in it"
        ),
    )
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox_max: int = _opt(
        10000,
        _int(1),
        KeyDoc("beyond this many waiting results the oldest are dropped, with an error in the log"),
    )


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    source: SourceConfig
    training: TrainingConfig
    model: ModelConfig
    scoring: ScoringConfig
    publish: PublishConfig
    job_options: dict[str, Any]  # the free-form [job] table, handed to a user TrainingJob
    path: Path | None = None
    warnings: tuple[str, ...] = ()  # deprecated keys: logged, never fatal
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    # The [models.<name>] tables, each a whole Config with its overrides applied; empty:
    # the top level alone is the one model.
    models: tuple[Config, ...] = ()

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    def definitions(self) -> tuple[Config, ...]:
        """The configured models: the [models.<name>] tables, else the top level. One that
        is partitioned stands for one model per value (for_partition)."""
        return self.models or (self,)

    @property
    def partitioned(self) -> bool:
        return self.source.partition_column is not None and self.source.partition is None

    def for_partition(self, value: str) -> Config:
        """The model of one partition value: `<model.name>@<value>`, reading its rows only."""
        return replace(
            self,
            source=replace(self.source, partition=value),
            model=replace(self.model, name=f"{self.model.name}@{value}"),
        )


# A partition value names a directory (models/<name>@<value>), one MQTT topic level and
# half of the Kafka key: no '/', no MQTT wildcard, no control character, no leading '.'
# (".", ".." and hidden directories), and short enough for any file system.
PARTITION_VALUE_MAX = 64  # characters, all ASCII
_PARTITION_VALUE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{PARTITION_VALUE_MAX - 1}}}")
PARTITION_SEPARATOR = "@"


def partition_value(raw: Any) -> str:
    """A partition column's value as the model name's suffix, or ValueError saying why it
    cannot name a model: integers as written, text as it is if it passes the rule (so a
    negative integer, "-1", cannot: a stored model's directory must give its value back)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    elif isinstance(raw, str):
        text = raw
    else:
        raise ValueError(f"{raw!r}: a {_type_name(raw)}, not an integer or text")
    if not _PARTITION_VALUE.fullmatch(text):
        raise ValueError(
            f"{text!r}: not 1 to 64 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return text


def _longest_name(definition: Config) -> str:
    """The longest name a model of `definition` can have (ASCII: as many bytes)."""
    if definition.partitioned:
        return f"{definition.model.name}{PARTITION_SEPARATOR}{'x' * PARTITION_VALUE_MAX}"
    return definition.model.name


_SECTIONS = {
    "daemon": DaemonConfig,
    "source": SourceConfig,
    "training": TrainingConfig,
    "model": ModelConfig,
    "scoring": ScoringConfig,
    "publish": PublishConfig,
    "metrics": MetricsConfig,
}


def keys() -> dict[str, Field]:
    """Every key ("publish.kafka.topic") with its field, in the order a TOML file must give
    them: the sections in order, each table's own keys before its nested tables'."""
    found: dict[str, Field] = {}

    def walk(cls: type, prefix: str) -> None:
        leaves = [f for f in fields(cls) if "parse" in f.metadata]
        found.update((f"{prefix}.{f.name}", f) for f in leaves)
        for f in fields(cls):
            if f.default_factory is not MISSING:
                walk(type(f.default_factory()), f"{prefix}.{f.name}")

    for name, cls in _SECTIONS.items():
        walk(cls, name)
    return found


# Keys of earlier releases that an upgraded gateway's edited file may still hold: a
# warning, not an error, so a package upgrade never stops the service with exit 78.
DEPRECATED = {
    "model.threshold_percentile": "ignored: the threshold is now fitted to "
    "model.false_alarm_rate (see the README's 'Detection quality'); remove the key",
}


def _load_section(
    cls: type, table: Any, prefix: str, problems: list[str], warnings: list[str]
) -> Any:
    """Builds `cls` from a TOML table, collecting one problem per bad or unknown key and
    one warning per deprecated key."""
    return cls(**_section_values(cls, table, prefix, problems, warnings))


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_name(key: str) -> str:
    """A TOML key as a problem line names it: bare if TOML allows, else quoted as TOML
    writes it, so that the line stays one line whatever the file's key holds."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _section_values(
    cls: type, table: Any, prefix: str, problems: list[str], warnings: list[str]
) -> dict[str, Any]:
    """The keys a TOML table gives for `cls`, parsed (see _load_section)."""
    if not isinstance(table, dict):
        problems.append(f"{prefix}: expected a table, got {_type_name(table)}")
        return {}
    known = {f.name: f for f in fields(cls) if "derived" not in f.metadata}
    kwargs = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None and f"{prefix}.{key}" in DEPRECATED:
            warnings.append(f"{prefix}.{key}: {DEPRECATED[f'{prefix}.{key}']}")
        elif f is None:
            problems.append(f"{prefix}.{_key_name(key)}: unknown key")
        elif f.default_factory is not MISSING:  # a nested table
            nested = type(f.default_factory())
            kwargs[key] = _load_section(nested, value, f"{prefix}.{key}", problems, warnings)
        else:
            try:
                kwargs[key] = f.metadata["parse"](value)
            except ValueError as exc:
                problems.append(f"{prefix}.{key}: {exc}")
    return kwargs


# A warning, not an error: the gateway connects all the same, and an upgrade must not stop
# it with exit 78. The password itself is never printed.
DSN_PASSWORD = (
    "source.dsn: holds a password, which anyone who can read this file can read: "
    "move it to the file source.password_file names (or the systemd credential pg-password)"
)


def _dsn_has_password(dsn: str) -> bool:
    """Whether a libpq connection string holds a non-empty password, by libpq's own parser:
    a URI's user:password@ or ?password=, or password= among key=value pairs, quoted or not.

    Raises ValueError when libpq cannot parse it.
    """
    from psycopg import ProgrammingError  # libpq: loaded only for a configured DSN
    from psycopg.conninfo import conninfo_to_dict

    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except ProgrammingError:
        # libpq's message quotes the text next to the fault, which may be the password.
        raise ValueError("not a libpq connection string (a URI or key=value pairs)") from None


def _check(cfg: Config, problems: list[str]) -> None:
    """Checks that span several keys: each model's, then the publishing ones."""
    for model in cfg.definitions():
        found: list[str] = []
        _check_model(model, found)
        prefix = f"models.{model.model.name}." if cfg.models else ""
        problems += [prefix + problem for problem in found]
    _check_publish(cfg, problems)


def _check_model(cfg: Config, problems: list[str]) -> None:
    """The checks of one model's [source], [training] and [model] keys."""
    t, s = cfg.training, cfg.source
    if t.max_rows < t.window_size + 1:
        problems.append(f"training.max_rows: must exceed window_size ({t.window_size})")
    if t.min_training_samples > t.max_rows:
        problems.append(
            f"training.min_training_samples: {t.min_training_samples} exceeds "
            f"training.max_rows ({t.max_rows}), so training could never start"
        )
    if t.min_training_samples < 4 * t.window_size:
        # Fewer rows leave no training window beside the validation ones.
        problems.append(
            f"training.min_training_samples: must be at least 4 x window_size ({4 * t.window_size})"
        )
    if cfg.model.alarm_above > cfg.model.alarm_of:
        problems.append(
            f"model.alarm_above: {cfg.model.alarm_above} windows can never be above the "
            f"threshold among the last alarm_of = {cfg.model.alarm_of}"
        )
    if cfg.model.sustained_above > cfg.model.sustained_of:
        problems.append(
            f"model.sustained_above: {cfg.model.sustained_above} windows can never be above "
            f"the level among the last sustained_of = {cfg.model.sustained_of}"
        )
    if s.kind == "postgres":
        if s.path is not None:
            problems.append("source.path: only for kind = 'sqlite'")
        if s.order_column is None:
            problems.append("source.order_column: required for kind = 'postgres'")
    elif s.dsn is not None or s.password_file is not None:
        key = "dsn" if s.dsn is not None else "password_file"
        problems.append(f"source.{key}: only for kind = 'postgres'")
    if s.time_column in s.channels or (s.order_column or "rowid") in s.channels:
        problems.append("source.channels: must not include time_column or order_column")
    if s.partition_column in (*s.channels, s.time_column, s.order_column or "rowid"):
        problems.append(
            "source.partition_column: must not be time_column, order_column or a channel"
        )


def _check_publish(cfg: Config, problems: list[str]) -> None:
    k = cfg.publish.kafka
    if k.sasl_mechanism and not (k.security_protocol or "").startswith("SASL"):
        problems.append("publish.kafka.sasl_mechanism: needs security_protocol SASL_PLAINTEXT/SSL")
    if (k.security_protocol or "").startswith("SASL") and not k.sasl_username:
        problems.append("publish.kafka.sasl_username: required with a SASL security_protocol")
    m = cfg.publish.mqtt
    if m.ca_file and not m.tls:
        problems.append("publish.mqtt.ca_file: set tls = true to use it")
    if m.password_file and not m.username:
        problems.append("publish.mqtt.password_file: needs username")
    # Conservative for {model}: the longest name any configured model can have (a partition
    # value of 64 characters). A stored message naming a longer model (of an earlier
    # config) is refused by paho at publish time, that message alone (publish.py).
    longest = max((_longest_name(d) for d in cfg.definitions()), key=len)
    for key, topic in (
        ("topic", m.topic),
        ("alarm_topic", m.alarm_topic),
        ("label_topic", m.label_topic),
    ):
        size = len(fill_mqtt_topic(topic, cfg.daemon.device_id, longest).encode())
        if size > MQTT_TOPIC_MAX_BYTES:
            filled = "device_id"
            if MODEL_PLACEHOLDER in topic:
                filled += f" and the longest model name ({len(longest)} bytes)"
            problems.append(
                f"publish.mqtt.{key}: {size} bytes with {filled} filled in, "
                f"MQTT allows {MQTT_TOPIC_MAX_BYTES}"
            )


# The sections a [models.<name>] table may override, key by key.
MODEL_SECTIONS = ("source", "training", "model", "scoring")
# The [source] keys of one kind only (_check_model refuses them with the other).
_KIND_ONLY = {"sqlite": ("path",), "postgres": ("dsn", "password_file")}


def _model_tables(value: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """The [models.<name>] tables, each name a plain identifier (it names a directory)."""
    if not isinstance(value, dict):
        problems.append(
            f"models: expected a table of [models.<name>] tables, got {_type_name(value)}"
        )
        return {}
    tables = {}
    for name, table in value.items():
        if not _IDENT.fullmatch(name):
            problems.append(
                f"models.{_key_name(name)}: a model's name is a plain identifier "
                "(letters, digits, _; not starting with a digit)"
            )
            continue
        if not isinstance(table, dict):
            problems.append(f"models.{name}: expected a table, got {_type_name(table)}")
            continue
        tables[name] = table
    return tables


def _model(
    top: Config,
    top_source: SourceConfig,
    name: str,
    table: dict[str, Any],
    problems: list[str],
    warnings: list[str],
) -> Config:
    """The model of one [models.<name>] table: the top level with the keys it names
    replaced; `model.name` is the table's name. `top_source`: the top level's [source] as
    parsed, before _finish_source (a relative SQLite path resolves once, a model changing
    kind to "postgres" has none)."""
    prefix = f"models.{name}"
    sections: dict[str, Any] = {}
    for section, value in table.items():
        if section not in MODEL_SECTIONS:
            allowed = ", ".join(f"[{prefix}.{s}]" for s in MODEL_SECTIONS)
            problems.append(
                f"{prefix}.{_key_name(section)}: unknown key (a model overrides {allowed})"
            )
            continue
        if section == "model" and isinstance(value, dict) and "name" in value:
            # Refused whatever its value: one line, not a second one for a bad identifier.
            problems.append(f"{prefix}.model.name: the table's name, {name!r}, names the model")
            value = {key: v for key, v in value.items() if key != "name"}
        sections[section] = _section_values(
            _SECTIONS[section], value, f"{prefix}.{section}", problems, warnings
        )
    # A model that changes kind does not inherit the top level's keys of the other kind
    # (a SQLite path, a DSN), which no model table could unset.
    own = sections.get("source", {})
    source = top_source
    if own.get("kind", source.kind) != source.kind:
        source = replace(source, **dict.fromkeys(_KIND_ONLY[source.kind]))
    source = _finish_source(
        replace(source, **own),
        top.daemon,
        f"{prefix}.",
        problems if "dsn" in own else [],
        warnings if "dsn" in own else [],
    )
    return replace(
        top,
        source=source,
        training=replace(top.training, **sections.get("training", {})),
        model=replace(top.model, **sections.get("model", {}), name=name),
        scoring=replace(top.scoring, **sections.get("scoring", {})),
        models=(),
    )


def _finish_source(
    source: SourceConfig,
    daemon: DaemonConfig,
    prefix: str,
    problems: list[str],
    warnings: list[str],
) -> SourceConfig:
    """The source's password warning, and its SQLite path made absolute under state_dir."""
    if source.dsn:
        try:
            if _dsn_has_password(source.dsn):
                warnings.append(prefix + DSN_PASSWORD)
        except ValueError as exc:
            problems.append(f"{prefix}source.dsn: {exc}")
    if source.kind == "sqlite":
        source = replace(source, path=daemon.state_dir / (source.path or "readings.db"))
    return source


def _defaults(env: dict[str, str]) -> tuple[str, Path]:
    # systemd may pass several colon-separated directories; the first is ours.
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    return socket.gethostname(), Path(state) if state else DEFAULT_STATE_DIR


def parse(text: str, *, path: Path | None = None, env: dict[str, str] | None = None) -> Config:
    """TOML text -> Config, or ConfigError listing every problem."""
    env = dict(os.environ) if env is None else env
    where = f"{path}: " if path else ""
    try:
        doc = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4300 digits
        raise ConfigError([f"{where}invalid TOML: {exc}"]) from None
    problems: list[str] = []
    warnings: list[str] = []
    sections = {
        name: _load_section(cls, doc.get(name, {}), name, problems, warnings)
        for name, cls in _SECTIONS.items()
    }
    models = _model_tables(doc.get("models", {}), problems)
    job_options = doc.get("job", {})
    if not isinstance(job_options, dict):
        problems.append(f"job: expected a table, got {_type_name(job_options)}")
        job_options = {}
    problems += [
        f"{_key_name(key)}: unknown section"
        for key in doc
        if key not in (*_SECTIONS, "job", "models")
    ]

    host, state_dir = _defaults(env)
    daemon = sections["daemon"]
    if not daemon.device_id:
        try:
            _device_id(host)
        except ValueError as exc:
            problems.append(f"daemon.device_id: not set, and the host name cannot serve: {exc}")
    daemon = replace(
        daemon,
        device_id=daemon.device_id or host,
        state_dir=(daemon.state_dir or state_dir).absolute(),
    )
    source = _finish_source(sections["source"], daemon, "", problems, warnings)
    publish = sections["publish"]
    if env.get("KAFKA_BROKER_URL"):
        publish = replace(
            publish, kafka=replace(publish.kafka, bootstrap_servers=env["KAFKA_BROKER_URL"])
        )
    cfg = Config(
        daemon=daemon,
        source=source,
        training=sections["training"],
        model=sections["model"],
        scoring=sections["scoring"],
        publish=publish,
        job_options=job_options,
        path=path,
        metrics=sections["metrics"],
    )
    if models:
        cfg = replace(
            cfg,
            models=tuple(
                _model(cfg, sections["source"], name, table, problems, warnings)
                for name, table in models.items()
            ),
        )
    # After the model tables, whose deprecated keys and DSN passwords warn too.
    cfg = replace(cfg, warnings=tuple(where + w for w in warnings))
    _check(cfg, problems)
    if problems:
        raise ConfigError([where + p for p in problems])
    return cfg


def config_path(cli_value: str | None, env: dict[str, str] | None = None) -> Path:
    """--config, else $SMOCSD_CONFIG, else /etc/smocsd/smocsd.toml."""
    env = os.environ if env is None else env
    return Path(cli_value or env.get("SMOCSD_CONFIG") or DEFAULT_PATH)


def load(path: Path, env: dict[str, str] | None = None) -> Config:
    """The file at `path` -> Config, or ConfigError listing every problem."""
    try:
        # Checked before opening: opening a FIFO blocks until a writer comes, and opening
        # a device can act on it (a watchdog device arms).
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError([f"{path}: not a regular file"])
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from None
    return parse(text, path=path, env=env)


def state_dir_problem(cfg: Config) -> str | None:
    """Why `run` and `train-once` would refuse the state directory, or None.

    They create only its last component, in a parent that exists: a missing parent is a
    disk not mounted yet or a typo higher up the path, and a state built there would start
    afresh (no models, an empty outbox) where nobody looks.
    """
    path = cfg.state_dir
    where = f"{cfg.path}: " if cfg.path else ""
    if path.exists() and not path.is_dir():
        return f"{where}daemon.state_dir: {path}: not a directory"
    if not path.exists() and not path.parent.is_dir():
        return (
            f"{where}daemon.state_dir: {path} does not exist, nor does {path.parent} "
            "(only the last component is created)"
        )
    return None


def make_state_dir(cfg: Config) -> None:
    """Makes the state directory of `run`, `train-once` and a reload if it is missing: its
    last component only, as state_dir_problem allows, with a warning, since a mistyped path
    would otherwise start a fresh empty state in silence. ConfigError when it cannot.

    Under the unit, StateDirectory= has made the default one and the sandbox leaves no
    other place writable, so a mistyped path fails here (read-only file system), at start.
    """
    problem = state_dir_problem(cfg)
    if problem:
        raise ConfigError([problem])
    try:
        cfg.state_dir.mkdir()
    except FileExistsError:
        return
    except OSError as exc:
        where = f"{cfg.path}: " if cfg.path else ""
        raise ConfigError(
            [f"{where}daemon.state_dir: {cfg.state_dir}: cannot create: {exc.strerror}"]
        ) from None
    log.warning("created the state directory %s (daemon.state_dir): no models yet", cfg.state_dir)


# The keys naming files the daemon reads: secrets, which must be owner-only (each with the
# systemd credential read when it is unset), and CA files.
SECRET_FILE_KEYS = {
    "source.password_file": "pg-password",
    "publish.kafka.sasl_password_file": "kafka-password",
    "publish.mqtt.password_file": "mqtt-password",
}
CA_FILE_KEYS = ("publish.kafka.ssl_ca_location", "publish.mqtt.ca_file")


def _user_name(uid: int) -> str:
    """The user's name, else the number (chown takes either)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def file_problem(path: Path, *, secret: bool, reader: int) -> str | None:
    """What keeps uid `reader` from using `path` as a CA or secret file, or None: the one
    rule, applied by check-config for the daemon's user and by the daemon to itself before
    it reads a secret.

    Any such file must be a regular file (reading a FIFO blocks until a writer comes). A
    secret file must also have no group or other permission and be owned by `reader`, root
    included: whoever owns it can read the password too.
    """
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file"
    if not secret:
        return None
    quoted = shlex.quote(str(path))
    if st.st_mode & 0o077:
        return f"{path}: accessible by group or others (chmod go-rwx {quoted})"
    if st.st_uid != reader:
        owner, user = _user_name(st.st_uid), _user_name(reader)
        return f"{path}: owned by {owner}, not {user} (chown {user} {quoted})"
    if reader != 0 and not st.st_mode & stat.S_IRUSR:
        return f"{path}: not readable by its owner (chmod u+r {quoted})"
    return None


def file_problems(cfg: Config, reader: int) -> list[str]:
    """The configured secret and CA files that uid `reader` (the daemon's user) could not
    use: one line each, naming the file and the key.

    """
    where = f"{cfg.path}: " if cfg.path else ""
    keys: list[tuple[str, Any]] = []
    for key in (*SECRET_FILE_KEYS, *CA_FILE_KEYS):
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        keys.append((key, value))
    for model in cfg.models:  # a model table's own password file
        if model.source.password_file != cfg.source.password_file:
            key = f"models.{model.model.name}.source.password_file"
            keys.append((key, model.source.password_file))
    problems = []
    for key, value in keys:
        secret = key.endswith("password_file")
        problem = value and file_problem(value, secret=secret, reader=reader)
        if problem:
            problems.append(f"{where}{key}: {problem}")
    return problems


def read_secret(path: Path | None, credential: str) -> str | None:
    """A secret from `path`, else from the systemd credential `credential`, else None.

    Secrets never live in the TOML. A file that fails file_problem for this process's user
    is refused, as check-config refuses it: a leaked broker or database password outlives
    any fix. A credential is systemd's, readable by the service's user alone (0400 and that
    user's, or from systemd 257 root's 0440 with an ACL for it), so it is taken as it is.
    """
    if path is None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory or not (Path(directory) / credential).is_file():
            return None
        path, where = Path(directory) / credential, f"credential {credential}"
    else:
        where = next(key for key, name in SECRET_FILE_KEYS.items() if name == credential)
        problem = file_problem(path, secret=True, reader=os.geteuid())
        if problem:
            raise ConfigError([f"{where}: {problem}"])
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"{where}: {path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: {path}: not UTF-8 text"]) from None
