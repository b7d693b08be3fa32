"""The TOML configuration, loaded into frozen dataclasses.

Every problem is reported as one line naming the file and the key, all at once,
so an operator fixes a bad file in one edit instead of one restart per typo.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/smocsd/smocsd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/smocsd")


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --- value parsers: each takes the raw TOML value and returns it converted, or
# raises ValueError with a message that the loader prefixes with the key.


def _type_name(value: Any) -> str:
    return type(value).__name__


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value


def _nonempty_str(value: Any) -> str:
    if not _str(value).strip():
        raise ValueError("must not be empty")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def _float(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {_type_name(value)}")
        value = float(value)
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high or value != value:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise ValueError(f"must be in {left}{low:g}, {high:g}{right}, got {value:g}")
        return value

    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if _str(value) not in options:
            raise ValueError(f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value

    return parse


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """'90s', '10m', '24h', '1d', '250ms' or plain seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '90s', '10m' or '24h'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(_str(value))
        if not match:
            raise ValueError(f"expected a duration like '90s', '10m' or '24h', got {value!r}")
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {value!r}")
    return seconds


def _max_gap(value: Any) -> float | None:
    """'auto' (None: three median sampling intervals) or a duration."""
    return None if value == "auto" else _positive_duration(value)


def _path(value: Any) -> Path:
    return Path(_nonempty_str(value))


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _identifier(value: Any) -> str:
    if not _IDENT.match(_str(value)):
        raise ValueError(f"{value!r} is not a plain SQL identifier (letters, digits, _)")
    return value


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


def _table_name(value: Any) -> str:
    """A table, optionally schema-qualified (PostgreSQL).

    Kept to plain identifiers so that the one '.' always separates schema and table.
    """
    for part in _str(value).split("."):
        _identifier(part)
    if value.count(".") > 1:
        raise ValueError(f"{value!r}: at most one schema qualifier")
    return value


def _list_of(item: Callable[[Any], Any], *, nonempty: bool = True, unique: bool = False):
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

    return parse


_JOB = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _job(value: Any) -> str:
    if _str(value) != "autoencoder" and not _JOB.match(value):
        raise ValueError(f"expected 'autoencoder' or 'package.module:ClassName', got {value!r}")
    return value


def _opt(default: Any, parse: Callable[[Any], Any]) -> Any:
    return field(default=default, metadata={"parse": parse})


# --- the sections


@dataclass(frozen=True)
class DaemonConfig:
    device_id: str = _opt("", _nonempty_str)
    state_dir: Path = _opt(None, _path)
    check_interval: float = _opt(60.0, _positive_duration)
    log_level: str = _opt("info", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class SourceConfig:
    kind: str = _opt("sqlite", _choice("sqlite", "postgres"))
    path: Path | None = _opt(None, _path)  # sqlite; relative to state_dir
    dsn: str | None = _opt(None, _str)  # postgres; libpq PG* variables also apply
    password_file: Path | None = _opt(None, _path)
    table: str = _opt("readings", _table_name)
    time_column: str = _opt("ts", _column)
    order_column: str | None = _opt(None, _column)  # sqlite default: rowid
    channels: tuple[str, ...] = _opt(
        ("temperature", "vibration", "current"), _list_of(_column, unique=True)
    )
    busy_timeout: float = _opt(10.0, _positive_duration)  # sqlite lock wait
    statement_timeout: float = _opt(60.0, _positive_duration)  # postgres
    connect_timeout: float = _opt(10.0, _positive_duration)  # postgres


@dataclass(frozen=True)
class TrainingConfig:
    job: str = _opt("autoencoder", _job)
    backend: str = _opt("auto", _choice("auto", "ort", "numpy"))
    window_size: int = _opt(10, _int(2))
    stride: int = _opt(1, _int(1))
    max_gap: float | None = _opt(None, _max_gap)  # None: "auto"
    min_training_samples: int = _opt(10000, _int(1))
    min_new_samples: int = _opt(1000, _int(1))
    min_interval: float = _opt(600.0, parse_duration)
    max_rows: int = _opt(200000, _int(2))
    learning_rate: float = _opt(0.001, _float(0.0, 1.0, low_open=True))
    batch_size: int = _opt(32, _int(1))
    epochs: int = _opt(50, _int(1))
    patience: int = _opt(5, _int(1))
    validation_fraction: float = _opt(0.2, _float(0.0, 1.0, low_open=True, high_open=True))
    hidden: tuple[int, ...] = _opt((32, 8), _list_of(_int(1)))
    threads: int = _opt(1, _int(1, 256))
    seed: int = _opt(0, _int(0))


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("autoencoder", _identifier)
    keep_versions: int = _opt(5, _int(1))
    promote: str = _opt("if-better", _choice("always", "if-better"))
    false_alarm_rate: float = _opt(0.001, _float(0.0, 0.5, low_open=True, high_open=True))
    alarm_above: int = _opt(2, _int(1))
    alarm_of: int = _opt(3, _int(1))


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = _opt("localhost:9092", _nonempty_str)  # $KAFKA_BROKER_URL overrides
    topic: str = _opt("training-results", _nonempty_str)
    security_protocol: str | None = _opt(
        None, _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    sasl_mechanism: str | None = _opt(None, _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str | None = _opt(None, _nonempty_str)
    sasl_password_file: Path | None = _opt(None, _path)
    ssl_ca_location: Path | None = _opt(None, _path)
    timeout: float = _opt(10.0, _positive_duration)  # bound on one delivery attempt


@dataclass(frozen=True)
class MqttConfig:
    host: str = _opt("localhost", _nonempty_str)
    port: int = _opt(1883, _int(1, 65535))
    topic: str = _opt("smocsd/{device_id}/training-results", _nonempty_str)
    qos: int = _opt(1, _int(0, 2))
    tls: bool = _opt(False, _bool)
    ca_file: Path | None = _opt(None, _path)
    username: str | None = _opt(None, _nonempty_str)
    password_file: Path | None = _opt(None, _path)
    timeout: float = _opt(10.0, _positive_duration)


@dataclass(frozen=True)
class PublishConfig:
    order: tuple[str, ...] = _opt(
        ("kafka", "mqtt"), _list_of(_choice("kafka", "mqtt"), nonempty=False, unique=True)
    )
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox_max: int = _opt(10000, _int(1))


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    source: SourceConfig
    training: TrainingConfig
    model: ModelConfig
    publish: PublishConfig
    job_options: dict[str, Any]  # the free-form [job] table, handed to a user TrainingJob
    path: Path | None = None
    warnings: tuple[str, ...] = ()  # deprecated keys: logged, never fatal

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir


_SECTIONS = {
    "daemon": DaemonConfig,
    "source": SourceConfig,
    "training": TrainingConfig,
    "model": ModelConfig,
    "publish": PublishConfig,
}


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
    if not isinstance(table, dict):
        problems.append(f"{prefix}: expected a table, got {_type_name(table)}")
        return cls()
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None and f"{prefix}.{key}" in DEPRECATED:
            warnings.append(f"{prefix}.{key}: {DEPRECATED[f'{prefix}.{key}']}")
        elif f is None:
            problems.append(f"{prefix}.{key}: unknown key")
        elif "parse" not in f.metadata:  # a nested table
            nested = type(f.default_factory())
            kwargs[key] = _load_section(nested, value, f"{prefix}.{key}", problems, warnings)
        else:
            try:
                kwargs[key] = f.metadata["parse"](value)
            except ValueError as exc:
                problems.append(f"{prefix}.{key}: {exc}")
    return cls(**kwargs)


def _check(cfg: Config, problems: list[str]) -> None:
    """Checks that span several keys."""
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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}invalid TOML: {exc}"]) from None
    problems: list[str] = []
    warnings: list[str] = []
    sections = {
        name: _load_section(cls, doc.get(name, {}), name, problems, warnings)
        for name, cls in _SECTIONS.items()
    }
    job_options = doc.get("job", {})
    if not isinstance(job_options, dict):
        problems.append(f"job: expected a table, got {_type_name(job_options)}")
        job_options = {}
    problems += [f"{key}: unknown section" for key in doc if key not in _SECTIONS and key != "job"]

    host, state_dir = _defaults(env)
    daemon = sections["daemon"]
    daemon = replace(
        daemon,
        device_id=daemon.device_id or host,
        state_dir=(daemon.state_dir or state_dir).absolute(),
    )
    source = sections["source"]
    if source.kind == "sqlite":
        source = replace(source, path=daemon.state_dir / (source.path or "readings.db"))
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
        publish=publish,
        job_options=job_options,
        path=path,
        warnings=tuple(where + w for w in warnings),
    )
    _check(cfg, problems)
    if problems:
        raise ConfigError([where + p for p in problems])
    return cfg


def config_path(cli_value: str | None, env: dict[str, str] | None = None) -> Path:
    """--config, else $SMOCSD_CONFIG, else /etc/smocsd/smocsd.toml."""
    env = os.environ if env is None else env
    return Path(cli_value or env.get("SMOCSD_CONFIG") or DEFAULT_PATH)


def load(path: Path, env: dict[str, str] | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from None
    return parse(text, path=path, env=env)


def read_secret(path: Path | None, credential: str) -> str | None:
    """A secret from `path`, else from the systemd credential `credential`, else None.

    Secrets never live in the TOML. A file that other users can read is refused,
    because a leaked broker or database password outlives any fix.
    """
    if path is None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory or not (Path(directory) / credential).is_file():
            return None
        path = Path(directory) / credential
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ConfigError(
                [f"{path}: secret file is accessible by other users (chmod o-rwx {path})"]
            )
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read secret: {exc.strerror}"]) from None
