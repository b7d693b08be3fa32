"""The configuration contract: defaults, every error one line naming its key, exit 78."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import smocsd

from smocsd import config
from smocsd.config import ConfigError, parse, parse_duration, read_secret

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
    assert cfg.training.window_size == 10 and cfg.training.hidden == (32, 8)
    assert cfg.training.max_gap is None and cfg.model.false_alarm_rate == 0.001
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
        ("[model]\nfalse_alarm_rate = 0", "model.false_alarm_rate", "(0, 0.5)"),
        ("[model]\nfalse_alarm_rate = 0.7", "model.false_alarm_rate", "(0, 0.5)"),
        ("[model]\nalarm_above = 4", "model.alarm_above", "alarm_of = 3"),
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


def test_secret_files_readable_by_others_are_refused(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o640)
    assert read_secret(secret, "pg-password") == "s3cret"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="other users"):
        read_secret(secret, "pg-password")


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
