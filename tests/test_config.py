"""The configuration contract: defaults, every error one line naming its key, exit 78."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import smocsd

from smocsd.common import config
from smocsd.common.config import ConfigError, parse, parse_duration, read_secret

ENV = {"STATE_DIRECTORY": "/srv/state"}


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(text, path=Path("c.toml"), env=ENV)
    return exc.value.problems


def test_defaults_follow_the_contract():
    cfg = parse("", env=ENV)
    assert cfg.state_dir == Path("/srv/state")
    assert cfg.source.path == Path("/srv/state/readings.db")
    assert cfg.daemon.check_interval == 60
    assert cfg.training.window_size == 10 and cfg.training.hidden == (32,)
    assert cfg.training.max_gap is None and cfg.model.false_alarm_rate == 0.0001
    assert (cfg.model.alarm_above, cfg.model.alarm_of) == (2, 3)
    assert cfg.training.min_interval == 600
    assert cfg.model.promote == "if-better" and cfg.model.keep_versions == 5
    assert cfg.publish.order == ("kafka", "mqtt")
    assert cfg.publish.mqtt.topic == "smocsd/{device_id}/training-results"
    assert parse("", env={}).state_dir == Path("/var/lib/smocsd")
    assert parse("", env={}).daemon.device_id  # the host name


def test_the_shipped_config_is_valid_and_matches_the_defaults():
    shipped = Path(__file__).parents[1] / "conf" / "smocsd.toml"
    assert parse(shipped.read_text(), env=ENV) == parse("", env=ENV)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("24h", 86400), ("1d", 86400), ("250ms", 0.25), (42, 42)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ("[daemon]\ncheck_intervl = 3", "daemon.check_intervl", "unknown key"),
        ("[daemon]\ncheck_interval = '5 parsecs'", "daemon.check_interval", "duration"),
        ("[daemon]\ncheck_interval = '0s'", "daemon.check_interval", "longer than zero"),
        ("[training]\nwindow_size = 1", "training.window_size", ">= 2"),
        ("[training]\nwindow_size = 'big'", "training.window_size", "integer"),
        ("[training]\nstride = 0", "training.stride", ">= 1"),
        ("[training]\nvalidation_fraction = 1.0", "training.validation_fraction", "(0, 1)"),
        ("[training]\nvalidation_fraction = 0", "training.validation_fraction", "(0, 1)"),
        ("[training]\nbackend = 'torch'", "training.backend", "one of"),
        ("[training]\nhidden = []", "training.hidden", "empty"),
        ("[training]\nhidden = [8, 0]", "training.hidden", "item 2"),
        ("[training]\njob = 'not a path'", "training.job", "package.module:ClassName"),
        ("[source]\nchannels = []", "source.channels", "empty"),
        ("[source]\nchannels = ['a', 'a']", "source.channels", "duplicates"),
        ("[source]\ntable = 'x; DROP TABLE y'", "source.table", "identifier"),
        ("[source]\ntable = 'a.b.c'", "source.table", "one schema"),
        ("[source]\ntime_column = ''", "source.time_column", "empty"),
        ("[source]\ntime_column = ' ts'", "source.time_column", "whitespace"),
        ("[source]\norder_column = 'id '", "source.order_column", "whitespace"),
        ('[source]\norder_column = "a\\u0000b"', "source.order_column", "control character"),
        ('[source]\nchannels = ["a", "b\\nc"]', "source.channels", "item 2: 'b\\nc' contains"),
        ('[source]\nchannels = ["a\\tb"]', "source.channels", "control character"),
        ('[source]\nchannels = ["a\\u007f"]', "source.channels", "control character"),
        ("[source]\nchannels = [1]", "source.channels", "expected a string"),
        ("[source]\nkind = 'postgres'", "source.order_column", "required"),
        ("[model]\npromote = 'sometimes'", "model.promote", "one of"),
        ("[publish]\norder = ['kafka', 'smtp']", "publish.order", "item 2"),
        ("[publish.mqtt]\nport = 70000", "publish.mqtt.port", "<= 65535"),
        ("[publish.kafka]\npassword = 'x'", "publish.kafka.password", "unknown key"),
        ("[plugins]\nx = 1", "plugins", "unknown section"),
        ("[training]\nmin_training_samples = 300000", "training.min_training_samples", "max_rows"),
        ("[training]\nmin_training_samples = 39", "training.min_training_samples", "4 x window"),
        ("[training]\nmax_gap = 'never'", "training.max_gap", "duration"),
        ("[training]\nmax_gap = 0", "training.max_gap", "longer than zero"),
        ("[training]\nnetworks = 0", "training.networks", ">= 1"),
        ("[training]\nnetworks = 'all'", "training.networks", '"auto" or an integer'),
        ("[model]\nfalse_alarm_rate = 0", "model.false_alarm_rate", "(0, 0.5)"),
        ("[model]\nfalse_alarm_rate = 0.7", "model.false_alarm_rate", "(0, 0.5)"),
        ("[model]\nalarm_above = 4", "model.alarm_above", "alarm_of = 3"),
        ("[model]\nsustained_above = 31", "model.sustained_above", "sustained_of = 30"),
        ("[model]\nsustained_level = 0", "model.sustained_level", "(0, 1000]"),
    ],
)
def test_each_bad_value_is_one_line_naming_file_and_key(toml, key, fragment):
    lines = problems(toml)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"c.toml: {key}"), lines
    assert fragment in lines[0]


def test_column_names_may_be_what_plant_historians_use():
    names = ["Volume Flow RateRMS", "Température °C", "Pump-3 Current (A)", 'say "hi"', "Ölstand"]
    text = (
        "[source]\ntime_column = 'Time Stamp'\norder_column = 'Row No.'\n"
        f"channels = {json.dumps(names, ensure_ascii=False)}\n"
    )
    src = parse(text, env=ENV).source
    assert (src.time_column, src.order_column) == ("Time Stamp", "Row No.")
    assert src.channels == tuple(names)


def test_max_gap_is_auto_or_a_duration():
    assert parse("[training]\nmax_gap = 'auto'", env=ENV).training.max_gap is None
    assert parse("[training]\nmax_gap = '5m'", env=ENV).training.max_gap == 300.0


def test_networks_auto_trains_three_for_a_machine_of_up_to_five_channels():
    auto = parse("", env=ENV).training
    assert auto.networks is None
    assert [auto.networks_for(c) for c in (1, 5, 6, 52)] == [3, 3, 1, 1]
    two = parse("[training]\nnetworks = 2", env=ENV).training
    assert [two.networks_for(c) for c in (1, 52)] == [2, 2]


def test_a_deprecated_key_warns_instead_of_stopping_an_upgraded_gateway():
    cfg = parse("[model]\nthreshold_percentile = 99.0\n", path=Path("c.toml"), env=ENV)
    assert replace(cfg, warnings=()) == parse("", path=Path("c.toml"), env=ENV)
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith("c.toml: model.threshold_percentile: ignored")


def test_all_problems_are_reported_at_once():
    lines = problems("[training]\nwindow_size = 1\nstride = 0\nepochs = -1\n[daemon]\nfoo = 1\n")
    assert len(lines) == 4
    assert all("\n" not in line for line in lines)


def test_invalid_toml_is_one_line():
    (line,) = problems("[training\n")
    assert line.startswith("c.toml: invalid TOML")


def test_kafka_broker_url_overrides_bootstrap_servers():
    cfg = parse("", env={**ENV, "KAFKA_BROKER_URL": "broker:9093"})
    assert cfg.publish.kafka.bootstrap_servers == "broker:9093"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_the_daemon_refuses_a_secret_file_check_config_refuses(tmp_path, mode):
    """One rule (config.file_problem) for both: what check-config says of a file is what
    the daemon does with it, for the user it runs as."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    assert read_secret(secret, "pg-password") == "s3cret"
    secret.chmod(mode)
    cfg = with_files(tmp_path, source__password_file=secret)
    (line,) = config.file_problems(cfg, reader=os.geteuid())
    with pytest.raises(ConfigError) as exc:
        read_secret(secret, "pg-password")
    assert exc.value.problems == [line.removeprefix("c.toml: ")]
    assert "source.password_file" in line and "accessible by group or others" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_secret_file_owned_by_another_user_is_refused_even_for_root(tmp_path):
    """Its owner can read the password too. Root reads any file, and still refuses it."""
    cfg = with_files(
        tmp_path,
        source__password_file=secret(tmp_path, "pg", 0o600, uid=65534),
        publish__mqtt__password_file=secret(tmp_path, "mqtt", 0o600, uid=0),
    )
    line = (
        f"source.password_file: {tmp_path}/pg: owned by nobody, not root (chown root {tmp_path}/pg)"
    )
    assert config.file_problems(cfg, reader=0) == [f"c.toml: {line}"]
    with pytest.raises(ConfigError) as exc:
        read_secret(tmp_path / "pg", "pg-password")
    assert exc.value.problems == [line]
    assert read_secret(tmp_path / "mqtt", "mqtt-password") == "s3cret"


def test_a_fifo_as_secret_is_refused_without_blocking(tmp_path):
    """Reading a FIFO waits for a writer that never comes: the daemon would hang."""
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(ConfigError) as exc:
        read_secret(tmp_path / "fifo", "kafka-password")
    assert exc.value.problems == [
        f"publish.kafka.sasl_password_file: {tmp_path}/fifo: not a regular file"
    ]


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://smocsd:hunter2@db.plant/readings",
        "postgres://smocsd@db.plant/readings?password=hunter2",
        "host=db.plant user=smocsd password=hunter2",
        "host=db.plant password = 'hunter2 x' dbname=readings",
    ],
)
def test_a_password_in_the_dsn_is_one_warning_that_never_shows_it(dsn):
    cfg = parse(
        f"[source]\nkind = 'postgres'\norder_column = 'id'\ndsn = \"{dsn}\"\n",
        path=Path("c.toml"),
        env=ENV,
    )
    (warning,) = cfg.warnings
    assert warning.startswith("c.toml: source.dsn: holds a password") and "hunter2" not in warning
    assert "source.password_file" in warning


@pytest.mark.parametrize(
    "dsn", ["postgresql://smocsd@db.plant/readings", "host=db.plant user=smocsd", ""]
)
def test_a_dsn_without_a_password_passes_without_a_warning(dsn):
    cfg = parse(f"[source]\nkind = 'postgres'\norder_column = 'id'\ndsn = '{dsn}'\n", env=ENV)
    assert cfg.warnings == ()


def test_a_dsn_libpq_cannot_parse_is_one_line_that_does_not_echo_it():
    (line,) = problems(
        "[source]\nkind = 'postgres'\norder_column = 'id'\ndsn = 'host=db password=hunter 2'"
    )
    assert line == "c.toml: source.dsn: not a libpq connection string (a URI or key=value pairs)"


def test_secret_from_systemd_credentials(tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text("from-credential")
    (tmp_path / "mqtt-password").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(None, "mqtt-password") == "from-credential"
    assert read_secret(None, "kafka-password") is None


def test_config_path_precedence():
    assert config.config_path("a.toml", {"SMOCSD_CONFIG": "b.toml"}) == Path("a.toml")
    assert config.config_path(None, {"SMOCSD_CONFIG": "b.toml"}) == Path("b.toml")
    assert config.config_path(None, {}) == Path("/etc/smocsd/smocsd.toml")


def test_check_config_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(f"[daemon]\nstate_dir = '{tmp_path}'\n")
    assert smocsd("check-config", config=good).returncode == 0
    # --config before the subcommand, and $SMOCSD_CONFIG, work too
    cmd = smocsd("--config", str(good), "check-config")
    assert cmd.returncode == 0, cmd.stderr
    env_run = smocsd("check-config", env={"SMOCSD_CONFIG": str(good)})
    assert env_run.returncode == 0, env_run.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nwindow_size = 1\nstrid = 2\n")
    proc = smocsd("check-config", config=bad)
    assert proc.returncode == 78
    assert proc.stderr.splitlines() == [
        f"{bad}: training.window_size: must be >= 2, got 1",
        f"{bad}: training.strid: unknown key",
    ]
    missing = smocsd("check-config", config=tmp_path / "nope.toml")
    assert missing.returncode == 78 and "cannot read" in missing.stderr


def test_a_job_that_cannot_be_loaded_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[daemon]\nstate_dir = '{tmp_path}'\n[training]\njob = 'no_such_mod:Job'\n")
    for command in ("check-config", "train-once", "run"):
        proc = smocsd(command, config=cfg)
        assert proc.returncode == 78, (command, proc.stderr)
        assert "training.job: cannot import 'no_such_mod'" in proc.stderr


def test_usage_errors_exit_2():
    assert smocsd("frobnicate").returncode == 2
    assert os.EX_CONFIG == 78


HUGE = "99999999999999999999"  # beyond a signed 64-bit integer


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ("[daemon]\ncheck_interval = nan", "daemon.check_interval", "number of seconds"),
        ("[daemon]\ncheck_interval = inf", "daemon.check_interval", "at most 366d"),
        ("[daemon]\ncheck_interval = -inf", "daemon.check_interval", "negative"),
        ("[daemon]\ncheck_interval = '367d'", "daemon.check_interval", "at most 366d"),
        (f"[daemon]\ncheck_interval = '{'9' * 400}s'", "daemon.check_interval", "at most 366d"),
        (f"[daemon]\ncheck_interval = {HUGE}", "daemon.check_interval", "at most 366d"),
        ("[training]\nmin_interval = nan", "training.min_interval", "number of seconds"),
        ("[training]\nmin_interval = 1e300", "training.min_interval", "at most 366d"),
        ("[training]\nmax_gap = inf", "training.max_gap", "at most 366d"),
        ("[source]\nbusy_timeout = '25d'", "source.busy_timeout", "at most 24d"),
        ("[source]\nstatement_timeout = 1e9", "source.statement_timeout", "at most 24d"),
        ("[source]\nconnect_timeout = -inf", "source.connect_timeout", "negative"),
        ("[publish.kafka]\ntimeout = '16m'", "publish.kafka.timeout", "at most 15m"),
        ("[publish.mqtt]\ntimeout = nan", "publish.mqtt.timeout", "number of seconds"),
        (f"[training]\nmax_rows = {HUGE}", "training.max_rows", "<= 9223372036854775807"),
        (f"[training]\nepochs = {HUGE}", "training.epochs", "signed 64-bit"),
        (f"[training]\nhidden = [8, {HUGE}]", "training.hidden", "item 2: must be <="),
        (f"[training]\nseed = -{HUGE}", "training.seed", ">= 0"),
        ("[model]\nkeep_versions = 9223372036854775808", "model.keep_versions", "<= 9223"),
        (f"[publish]\noutbox_max = {HUGE}", "publish.outbox_max", "signed 64-bit"),
        ("[training]\nlearning_rate = nan", "training.learning_rate", "a number, got nan"),
        ("[training]\nlearning_rate = inf", "training.learning_rate", "(0, 1]"),
        ("[training]\nvalidation_fraction = -inf", "training.validation_fraction", "(0, 1)"),
        ("[model]\nfalse_alarm_rate = nan", "model.false_alarm_rate", "got nan"),
    ],
)
def test_numbers_must_be_finite_and_in_range(toml, key, fragment):
    (line,) = problems(toml)
    assert line.startswith(f"c.toml: {key}: "), line
    assert fragment in line, line


def test_the_largest_values_still_accepted():
    cfg = parse(
        "[daemon]\ncheck_interval = '366d'\n[source]\nbusy_timeout = '24d'\n"
        "[publish.kafka]\ntimeout = '15m'\n"
        "[training]\nmax_rows = 9223372036854775807\nmin_training_samples = 9223372036854775807\n",
        env=ENV,
    )
    assert cfg.daemon.check_interval == 366 * 86400 and cfg.source.busy_timeout == 24 * 86400
    assert cfg.training.max_rows == 2**63 - 1


def test_an_integer_too_long_for_python_is_one_line():
    (line,) = problems(f"[training]\nmax_rows = 1{'0' * 5000}")
    assert line.startswith("c.toml: invalid TOML") and len(line) < 300


@pytest.mark.parametrize(
    ("device_id", "fragment"),
    [
        ("gw#1", "'#'"),
        ("gw+1", "'+'"),
        ("plant/gw-1", "'/'"),
        ("gw-1\nsmocsd: forged line", "control character"),
        ("gw\u0000", "control character"),
        ("gw\u009b", "control character"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_device_id_is_one_topic_level_without_wildcards_or_controls(device_id, fragment):
    (line,) = problems(f"[daemon]\ndevice_id = {json.dumps(device_id)}")
    assert line.startswith("c.toml: daemon.device_id: ") and fragment in line, line


def test_a_host_name_that_cannot_be_a_device_id_must_be_replaced(monkeypatch):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "gw+1")
    (line,) = problems("")
    assert line.startswith("c.toml: daemon.device_id: not set, and the host name cannot serve")
    assert parse("[daemon]\ndevice_id = 'gw-1'", env=ENV).daemon.device_id == "gw-1"


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("smocsd/#", "wildcard '#'"),
        ("smocsd/+/results", "wildcard '+'"),
        ("$SYS/smocsd", "starts with '$'"),
        ("", "empty"),
        ("smocsd/{device_id}/\n", "control character"),
        ("smocsd/\u0000", "control character"),
        ("smocsd/{device}/results", "only placeholder"),
        ("smocsd/{device_id/results", "only placeholder"),
        ("smocsd/device_id}/results", "only placeholder"),
        ("smocsd/{{device_id}}", "only placeholder"),
        ("smocsd/{models}/results", "{device_id} and {model} are the only placeholders"),
        ("smocsd/{Model}/results", "only placeholder"),
        ("smocsd/{model/results", "only placeholder"),
        ("smocsd/{{model}}", "only placeholder"),
        ("smocsd/{mod{device_id}el}", "only placeholder"),  # one pass: no nesting
        ("smocsd/{dev{model}ice_id}", "only placeholder"),
    ],
)
def test_mqtt_topic(topic, fragment):
    (line,) = problems(f"[publish.mqtt]\ntopic = {json.dumps(topic)}")
    assert line.startswith("c.toml: publish.mqtt.topic: ") and fragment in line, line


@pytest.mark.parametrize("key", ["topic", "alarm_topic", "label_topic"])
@pytest.mark.parametrize(
    "topic",
    [
        "smocsd/{device_id}/{model}/results",
        "smocsd/{model}",
        "{model}",
        "{model}/{device_id}/{model}",
        "plant/{device_id}-{model}",
    ],
)
def test_mqtt_topic_may_name_the_model(key, topic):
    cfg = parse(f"[publish.mqtt]\n{key} = '{topic}'", env=ENV)
    assert getattr(cfg.publish.mqtt, key) == topic


def test_mqtt_topic_defaults_keep_their_topics():
    mqtt = parse("", env=ENV).publish.mqtt
    assert (mqtt.topic, mqtt.alarm_topic, mqtt.label_topic) == (
        "smocsd/{device_id}/training-results",
        "smocsd/{device_id}/alarms",
        "smocsd/{device_id}/labels",
    )
    assert config.MODEL_PLACEHOLDER == "{model}"
    assert "{model}" in config.MqttConfig.__dataclass_fields__["topic"].metadata["parse"].accepted


def test_fill_mqtt_topic_fills_both_placeholders_in_one_pass():
    fill = config.fill_mqtt_topic
    assert fill("s/{device_id}/{model}/r", "gw-1", "pumps@P-1") == "s/gw-1/pumps@P-1/r"
    assert fill("{model}/{model}", "gw", "m") == "m/m"
    assert fill("s/{device_id}/r", "gw", "m") == "s/gw/r"  # the default: no model level
    # A brace in a value is text, never a placeholder filled in again.
    assert fill("{device_id}/{model}", "{model}", "{device_id}") == "{model}/{device_id}"


@pytest.mark.parametrize("key", ["topic", "alarm_topic", "label_topic"])
@pytest.mark.parametrize(
    ("tables", "longest"),
    [
        ("", "autoencoder"),
        ("[model]\nname = 'm'\n", "m"),
        ("[source]\npartition_column = 'asset'\n", "autoencoder@" + "x" * 64),
        ("[models.a.training]\nepochs = 2\n[models.long_name.training]\nepochs = 2\n", "long_name"),
        (
            "[models.a.source]\npartition_column = 'asset'\n"
            "[models.long_name_longer_than_a.training]\nepochs = 2\n",
            "a@" + "x" * 64,
        ),
    ],
)
def test_mqtt_topic_length_counts_the_longest_model_name(key, tables, longest):
    """{model} is counted as the longest name a configured model can have: a partitioned
    one's `<name>@` and a value of 64 characters (the most partition_value takes)."""

    others = "".join(f"{o} = 'o'\n" for o in ("topic", "alarm_topic", "label_topic") if o != key)

    def text(device_id: str) -> str:
        return (
            f"[daemon]\ndevice_id = '{device_id}'\n{tables}"
            f"[publish.mqtt]\n{key} = '{{device_id}}/{{model}}'\n{others}"
        )

    room = 65535 - len("/") - len(longest)  # for the device_id
    assert parse(text("x" * room), env=ENV)  # the limit
    (line,) = problems(text("x" * (room + 1)))
    assert line == (
        f"c.toml: publish.mqtt.{key}: 65536 bytes with device_id and the longest model name "
        f"({len(longest)} bytes) filled in, MQTT allows 65535"
    )


@pytest.mark.parametrize("key", ["topic", "alarm_topic", "label_topic"])
def test_mqtt_topic_length_counts_utf8_bytes_with_device_id_filled_in(key):
    others = "".join(
        f"{other} = 'o'\n" for other in ("topic", "alarm_topic", "label_topic") if other != key
    )

    def topic_with(device_id: str) -> str:
        return (
            f"[daemon]\ndevice_id = '{device_id}'\n"
            f"[publish.mqtt]\n{key} = 't/{{device_id}}'\n{others}"
        )

    assert parse(topic_with("x" * 65533), env=ENV)  # 't/' + 65533 bytes: the limit
    (line,) = problems(topic_with("x" * 65534))
    assert (
        line
        == f"c.toml: publish.mqtt.{key}: 65536 bytes with device_id filled in, MQTT allows 65535"
    )
    (line,) = problems(topic_with("é" * 32767))  # 32769 characters, 65536 bytes
    assert "65536 bytes" in line


@pytest.mark.parametrize(
    "topic",
    [
        "",
        ".",
        "..",
        "training results",
        "smocsd/results",
        "ergebnisse-ü",
        "{device_id}",
        "t" * 250,
        "t\n",
    ],
)
def test_kafka_topic_refused(topic):
    (line,) = problems(f"[publish.kafka]\ntopic = {json.dumps(topic)}")
    assert line.startswith("c.toml: publish.kafka.topic: ") and "not a Kafka topic name" in line


@pytest.mark.parametrize("topic", ["training-results", "plant.gw_01.Results-2", "t" * 249, "..."])
def test_kafka_topic_accepted(topic):
    assert parse(f"[publish.kafka]\ntopic = '{topic}'", env=ENV).publish.kafka.topic == topic


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[model]\nname = "autoencoder\\n"', "model.name"),
        ('[source]\ntable = "readings\\n"', "source.table"),
        ('[training]\njob = "userjob:Job\\n"', "training.job"),
    ],
)
def test_a_trailing_newline_does_not_slip_through_a_pattern(toml, key):
    (line,) = problems(toml)
    assert line.startswith(f"c.toml: {key}: ")


def test_the_config_path_must_be_a_regular_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path)
    assert exc.value.problems == [f"{tmp_path}: not a regular file"]


@pytest.mark.timeout(20)
def test_a_fifo_as_config_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "smocsd.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as exc:
        config.load(fifo)  # opening it would wait for a writer forever
    assert exc.value.problems == [f"{fifo}: not a regular file"]
    proc = smocsd("check-config", config=fifo, timeout=20)
    assert proc.returncode == 78 and proc.stderr == f"{fifo}: not a regular file\n"


def with_files(tmp_path: Path, **keys: Path) -> config.Config:
    """A config naming the given files, keys spelled like source__password_file."""
    tables: dict[str, list[str]] = {
        "source": ["kind = 'postgres'", "order_column = 'id'"],
        "publish.mqtt": ["username = 'gw'", "tls = true"],
    }
    for key, path in keys.items():
        section, name = key.rsplit("__", 1)
        tables.setdefault(section.replace("__", "."), []).append(f"{name} = '{path}'")
    text = "\n".join(f"[{t}]\n" + "\n".join(lines) for t, lines in tables.items())
    return parse(text, path=Path("c.toml"), env=ENV)


def secret(tmp_path: Path, name: str, mode: int, uid: int = 0) -> Path:
    path = tmp_path / name
    path.write_text("s3cret\n")
    path.chmod(mode)
    os.chown(path, uid, -1)
    return path


def test_secret_and_ca_files_that_are_usable_pass(tmp_path):
    cfg = with_files(
        tmp_path,
        source__password_file=secret(tmp_path, "pg", 0o600),
        publish__kafka__sasl_password_file=secret(tmp_path, "kafka", 0o400),
        publish__kafka__ssl_ca_location=secret(tmp_path, "ca.pem", 0o644),
        publish__mqtt__password_file=secret(tmp_path, "mqtt", 0o600),
        publish__mqtt__ca_file=secret(tmp_path, "ca2.pem", 0o644, uid=65534),
    )
    assert config.file_problems(cfg, reader=0) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_each_unusable_secret_or_ca_file_is_one_line_naming_file_and_key(tmp_path):
    cfg = with_files(
        tmp_path,
        source__password_file=secret(tmp_path, "pg", 0o640, uid=65534),
        publish__kafka__sasl_password_file=secret(tmp_path, "kafka", 0o600, uid=0),
        publish__kafka__ssl_ca_location=tmp_path / "missing.pem",
        publish__mqtt__password_file=secret(tmp_path, "mqtt", 0o200, uid=65534),
        publish__mqtt__ca_file=tmp_path,
    )
    assert config.file_problems(cfg, reader=65534) == [
        f"c.toml: source.password_file: {tmp_path}/pg: accessible by group or others "
        f"(chmod go-rwx {tmp_path}/pg)",
        f"c.toml: publish.kafka.sasl_password_file: {tmp_path}/kafka: owned by root, not nobody "
        f"(chown nobody {tmp_path}/kafka)",
        f"c.toml: publish.mqtt.password_file: {tmp_path}/mqtt: not readable by its owner "
        f"(chmod u+r {tmp_path}/mqtt)",
        f"c.toml: publish.kafka.ssl_ca_location: {tmp_path}/missing.pem: No such file or directory",
        f"c.toml: publish.mqtt.ca_file: {tmp_path}: not a regular file",
    ]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o601, 0o610])
def test_a_secret_file_must_be_owner_only(tmp_path, mode):
    cfg = with_files(tmp_path, publish__mqtt__password_file=secret(tmp_path, "pw", mode))
    (line,) = config.file_problems(cfg, reader=0)
    assert "publish.mqtt.password_file" in line and "accessible by group or others" in line


def test_a_secret_file_must_be_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    cfg = with_files(
        tmp_path,
        source__password_file=tmp_path / "fifo",
        publish__mqtt__password_file=tmp_path / "nope",
    )
    assert config.file_problems(cfg, reader=0) == [
        f"c.toml: source.password_file: {tmp_path}/fifo: not a regular file",
        f"c.toml: publish.mqtt.password_file: {tmp_path}/nope: No such file or directory",
    ]


# ---------------------------------------------------------------- [models.<name>] and partitions


def test_the_top_level_alone_is_exactly_one_model():
    for text in (
        "",
        "[model]\nname = 'pump'\n[training]\nwindow_size = 20\nmin_training_samples = 80",
    ):
        cfg = parse(text, env=ENV)
        assert cfg.models == () and cfg.definitions() == (cfg,)
        assert not cfg.partitioned and cfg.source.partition is None
    shipped = Path(__file__).parents[1] / "conf" / "smocsd.toml"
    cfg = parse(shipped.read_text(), env=ENV)
    assert cfg.definitions() == (cfg,)


def test_an_empty_models_table_leaves_the_top_level_the_one_model():
    cfg = parse("[models]\n", env=ENV)
    assert cfg == parse("", env=ENV) and cfg.definitions() == (cfg,)


TWO_MODELS = """\
[source]
table = "readings"
channels = ["temperature", "vibration", "current"]
[training]
window_size = 10
epochs = 7
[model]
name = "top"
false_alarm_rate = 0.001
[scoring]
enabled = true
close_after = 4

[models.a.source]
table = "pumps"
channels = ["flow", "pressure"]
[models.a.training]
window_size = 20
min_training_samples = 100

[models.b.source]
table = "plant.motors"
[models.b.model]
false_alarm_rate = 0.01
alarm_above = 3
[models.b.scoring]
close_after = 9
"""


def test_model_tables_override_their_keys_and_inherit_the_rest():
    cfg = parse(TWO_MODELS, env=ENV)
    top = parse(TWO_MODELS.split("[models.a.source]")[0], env=ENV)
    a, b = cfg.definitions()
    assert cfg.models == (a, b) and [m.model.name for m in (a, b)] == ["a", "b"]
    assert a.models == () and b.models == ()

    assert (a.source.table, a.source.channels) == ("pumps", ("flow", "pressure"))
    assert (a.training.window_size, a.training.min_training_samples) == (20, 100)
    assert a.training.epochs == 7  # inherited
    assert a.model == replace(top.model, name="a")
    assert a.scoring == top.scoring

    assert (b.source.table, b.source.channels) == ("plant.motors", top.source.channels)
    assert b.training == top.training
    assert (b.model.false_alarm_rate, b.model.alarm_above) == (0.01, 3)
    assert b.model.keep_versions == top.model.keep_versions
    assert (b.scoring.enabled, b.scoring.close_after) == (True, 9)

    for model in (a, b):  # the rest is the top level's
        assert (model.daemon, model.publish, model.metrics) == (
            cfg.daemon,
            cfg.publish,
            cfg.metrics,
        )
        assert model.source.path == Path("/srv/state/readings.db")
    assert replace(cfg, models=()) == top  # the top level is as if the tables were not there


def test_a_relative_source_path_of_a_model_table_is_under_state_dir():
    cfg = parse(
        "[source]\npath = 'top.db'\n"
        "[models.a.source]\npath = 'a.db'\n"
        "[models.b.source]\npath = '/data/b.db'\n"
        "[models.c.training]\nepochs = 2\n",
        env=ENV,
    )
    assert cfg.source.path == Path("/srv/state/top.db")
    assert [m.source.path for m in cfg.definitions()] == [
        Path("/srv/state/a.db"),
        Path("/data/b.db"),
        Path("/srv/state/top.db"),  # inherited, made absolute once
    ]


def test_a_model_table_switching_to_postgres_has_no_sqlite_path():
    cfg = parse(
        "[source]\npath = 'top.db'\n"
        "[models.pg.source]\nkind = 'postgres'\norder_column = 'id'\ndsn = 'host=db'\n"
        "[models.lite.training]\nepochs = 2\n",
        env=ENV,
    )
    pg, lite = cfg.definitions()
    assert (pg.source.kind, pg.source.path, pg.source.dsn) == ("postgres", None, "host=db")
    assert lite.source.path == Path("/srv/state/top.db")
    # Without a path at the top level either: none is filled in for it.
    cfg = parse("[models.pg.source]\nkind = 'postgres'\norder_column = 'id'\n", env=ENV)
    assert cfg.models[0].source.path is None


def test_a_model_table_switching_to_sqlite_leaves_the_top_levels_dsn():
    cfg = parse(
        "[source]\nkind = 'postgres'\norder_column = 'id'\ndsn = 'host=db'\n"
        "password_file = '/etc/smocsd/pg.pass'\n"
        "[models.lite.source]\nkind = 'sqlite'\n"
        "[models.pg.model]\nkeep_versions = 2\n",
        env=ENV,
    )
    lite, pg = cfg.definitions()
    assert (lite.source.dsn, lite.source.password_file) == (None, None)
    assert lite.source.path == Path("/srv/state/readings.db")
    assert (pg.source.dsn, pg.source.path) == ("host=db", None)


def test_a_model_switching_to_postgres_needs_order_column_naming_the_model():
    lines = problems("[models.pg.source]\nkind = 'postgres'\n[models.lite.training]\nepochs = 2\n")
    assert lines == ["c.toml: models.pg.source.order_column: required for kind = 'postgres'"]


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        (
            "[models.a.training]\nwindow_size = 1",
            "models.a.training.window_size: must be >= 2, got 1",
        ),
        ("[models.a.source]\ntable = 'a b'", "models.a.source.table: 'a b' is not a plain SQL"),
        ("[models.a.source]\npartition = 'x'", "models.a.source.partition: unknown key"),
        ("[models.a.scoring]\nclose_afer = 3", "models.a.scoring.close_afer: unknown key"),
        ("[models.a.model]\nname = 'b'", "models.a.model.name: the table's name, 'a', names"),
        ("[models.a.model]\nname = 'not an identifier'", "models.a.model.name: the table's name"),
        ("[models.a.source]\nkind = 'mysql'", "models.a.source.kind: "),
        ("[models.a]\nsource = 3", "models.a.source: expected a table, got int"),
        ("[models.a]\nwindow_size = 3", "models.a.window_size: unknown key (a model overrides"),
        ("[models.a.daemon]\ndevice_id = 'x'", "models.a.daemon: unknown key (a model overrides"),
        ("[models.a.publish.mqtt]\nport = 1", "models.a.publish: unknown key (a model overrides"),
        ("[models.a.metrics]\ntextfile = ''", "models.a.metrics: unknown key (a model overrides"),
        ("[models.a.job]\nx = 1", "models.a.job: unknown key (a model overrides"),
        ("[models.a.plugins]\nx = 1", "models.a.plugins: unknown key (a model overrides"),
        ("[models.'pump-3']\n", "models.pump-3: a model's name is a plain identifier"),
        ("[models.3pump]\n", "models.3pump: a model's name is a plain identifier"),
        ("[models.'a.b']\n", 'models."a.b": a model\'s name is a plain identifier'),
        ('[models."a\\nb"]\n', 'models."a\\nb": a model\'s name is a plain identifier'),
        ("[models.'a@1']\n", 'models."a@1": a model\'s name is a plain identifier'),
        ("[models]\na = 3", "models.a: expected a table, got int"),
        (
            "[models.a.model]\nalarm_above = 4",
            "models.a.model.alarm_above: 4 windows can never be above",
        ),
        (
            "[models.a.training]\nmin_training_samples = 39",
            "models.a.training.min_training_samples: must be at least 4 x window_size",
        ),
        (
            "[models.a.source]\nchannels = ['ts']",
            "models.a.source.channels: must not include time_column or order_column",
        ),
        (
            "[models.a.source]\ndsn = 'host=db'",
            "models.a.source.dsn: only for kind = 'postgres'",
        ),
    ],
)
def test_each_problem_of_a_model_table_is_one_line_naming_model_section_and_key(toml, line):
    (got,) = problems(toml + "\n[models.ok.training]\nepochs = 2\n")
    assert got.startswith(f"c.toml: {line}"), got
    assert "\n" not in got


@pytest.mark.parametrize(("value", "kind"), [("3", "int"), ("[]", "list"), ("'a'", "str")])
def test_models_must_be_a_table_of_tables(value, kind):
    (line,) = problems(f"models = {value}")
    assert line == f"c.toml: models: expected a table of [models.<name>] tables, got {kind}"


@pytest.mark.parametrize(
    "toml", ['["a\\nb"]\nx = 1', '[source]\n"a\\nb" = 1', '[models.a.source]\n"a\\u0085b" = 1']
)
def test_an_unknown_key_is_named_on_one_line_whatever_it_holds(toml):
    (line,) = problems(toml)
    assert line.splitlines() == [line], line
    assert line.startswith("c.toml: ") and ("\\n" in line or "\\u0085" in line), line


def test_every_model_tables_problem_is_reported_at_once():
    lines = problems(
        "[training]\nepochs = 0\n"
        "[models.a.training]\nwindow_size = 1\nstride = 0\n"
        "[models.a.model]\nname = 'x'\n"
        "[models.b.source]\nkind = 'postgres'\nfoo = 1\n"
        "[models.b.publish]\norder = []\n"
        "[models.'c d']\n"
    )
    assert sorted(lines) == sorted(
        [
            "c.toml: training.epochs: must be >= 1, got 0",
            'c.toml: models."c d": a model\'s name is a plain identifier '
            "(letters, digits, _; not starting with a digit)",
            "c.toml: models.a.training.window_size: must be >= 2, got 1",
            "c.toml: models.a.training.stride: must be >= 1, got 0",
            "c.toml: models.a.model.name: the table's name, 'a', names the model",
            "c.toml: models.b.source.foo: unknown key",
            "c.toml: models.b.publish: unknown key (a model overrides [models.b.source], "
            "[models.b.training], [models.b.model], [models.b.scoring])",
            "c.toml: models.b.source.order_column: required for kind = 'postgres'",
        ]
    ), lines


def test_a_check_failing_for_a_key_of_the_top_level_names_each_model_it_fails_for():
    lines = problems(
        "[source]\nkind = 'postgres'\n"
        "[models.a.source]\norder_column = 'id'\n"
        "[models.b.training]\nepochs = 2\n"
        "[models.c.source]\nkind = 'sqlite'\n"
    )
    assert lines == ["c.toml: models.b.source.order_column: required for kind = 'postgres'"]


@pytest.mark.parametrize("column", ["ts", "temperature", "current", "rowid"])
def test_partition_column_must_not_be_time_order_or_a_channel(column):
    (line,) = problems(f"[source]\npartition_column = '{column}'")
    assert line == (
        "c.toml: source.partition_column: must not be time_column, order_column or a channel"
    )
    (line,) = problems(f"[models.a.source]\npartition_column = '{column}'")
    assert line.startswith("c.toml: models.a.source.partition_column: must not be")


def test_partition_column_must_not_be_the_order_column_either():
    (line,) = problems("[source]\norder_column = 'id'\npartition_column = 'id'")
    assert line.startswith("c.toml: source.partition_column: must not be")
    assert parse("[source]\norder_column = 'id'\npartition_column = 'rowid'", env=ENV)


def test_source_partition_is_not_a_key():
    (line,) = problems("[source]\npartition = 'x'")
    assert line == "c.toml: source.partition: unknown key"
    keys = config.keys()
    assert "source.partition" not in keys and "source.partition_column" in keys


def test_for_partition_names_the_model_and_its_rows():
    cfg = parse("[model]\nname = 'x'\n[source]\npartition_column = 'asset'", env=ENV)
    assert cfg.partitioned and cfg.definitions() == (cfg,)
    one = cfg.for_partition("P-1")
    assert one.model.name == "x@P-1"
    assert (one.source.partition, one.source.partition_column) == ("P-1", "asset")
    assert not one.partitioned
    assert replace(one, source=cfg.source, model=cfg.model) == cfg

    cfg = parse(
        "[models.pumps.source]\npartition_column = 'asset'\n[models.line.source]\n", env=ENV
    )
    pumps, line = cfg.definitions()
    assert pumps.partitioned and not line.partitioned
    assert pumps.for_partition("7").model.name == "pumps@7"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (0, "0"),
        (7, "7"),
        (2**63 - 1, "9223372036854775807"),
        ("P-1", "P-1"),
        ("pump_3", "pump_3"),
        ("line.4", "line.4"),
        ("7", "7"),
        ("0x1F", "0x1F"),
        ("a" * 64, "a" * 64),
    ],
)
def test_partition_value_accepted(raw, text):
    assert config.partition_value(raw) == text


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".x",
        ".",
        "..",
        "_x",
        "-x",
        "a/b",
        "a b",
        " a",
        "a\n",
        "+",
        "#",
        "a+b",
        "a#",
        "a@b",
        "a{b}",
        "pumpé",
        "a" * 65,
        -1,  # "-1": not starting with a letter or digit
        True,
        1.0,
        None,
        b"a",
    ],
)
def test_partition_value_refused(raw):
    with pytest.raises(ValueError) as exc:
        config.partition_value(raw)
    assert "\n" not in str(exc.value)


def test_a_dsn_password_warns_once_per_place_that_sets_the_dsn():
    cfg = parse(
        "[source]\nkind = 'postgres'\norder_column = 'id'\n"
        "dsn = 'postgresql://u:hunter2@db/plant'\n"
        "[models.a.source]\ndsn = 'host=db2 password=hunter3'\n"
        "[models.b.source]\ntable = 'other'\n"  # inherits the top level's: no second warning
        "[models.c.source]\ndsn = 'host=db3'\n",
        path=Path("c.toml"),
        env=ENV,
    )
    assert [w.split(": holds")[0] for w in cfg.warnings] == [
        "c.toml: source.dsn",
        "c.toml: models.a.source.dsn",
    ]
    assert not any("hunter" in w for w in cfg.warnings)
    (line,) = problems(
        "[source]\nkind = 'postgres'\norder_column = 'id'\n"
        "[models.a.source]\ndsn = 'host=db password=hunter 2'\n"
    )
    assert line == (
        "c.toml: models.a.source.dsn: not a libpq connection string (a URI or key=value pairs)"
    )


def test_the_warnings_of_model_tables_are_kept():
    cfg = parse(
        "[model]\nthreshold_percentile = 99.0\n"
        "[source]\nkind = 'postgres'\norder_column = 'id'\n"
        "[models.a.source]\ndsn = 'host=db password=x'\n",
        env=ENV,
    )
    assert [w.split(":")[0] for w in cfg.warnings] == [
        "model.threshold_percentile",
        "models.a.source.dsn",
    ]
