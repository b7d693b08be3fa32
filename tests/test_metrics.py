"""[metrics] textfile: the Prometheus text file for node_exporter's textfile collector.

Its format and atomic replacement, what the daemon counts, a file that cannot be written
(logged once, training goes on), and Debian's real node_exporter serving what a real
daemon wrote, under the unit's umask, as the user prometheus.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import Running, insert, model_meta, smocsd, write_config
from services import NodeExporter, ServiceError, free_port

from smocsd import __version__, modelfile
from smocsd.app import metrics
from smocsd.app.metrics import Metrics, Snapshot, Tally, write_textfile
from smocsd.common import config
from smocsd.common.config import ConfigError
from smocsd.data import demo
from smocsd.delivery.publish import Publisher, Said
from smocsd.training.result import Outcome

WAIT = 90.0  # generous: the suite runs on a loaded 2-core machine


def _unavailable(what: str, exc: Exception) -> None:
    """As tests/conftest.py: skipped, except under CI=true, where it fails."""
    reason = f"{what} unavailable: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node_exporter() -> Iterator[NodeExporter]:
    try:
        server = NodeExporter()
        server.start()
    except ServiceError as exc:
        _unavailable("node_exporter", exc)
    try:
        yield server
    finally:
        server.remove()


def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> object:
    """Polls `condition` until it returns something true; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not after {timeout:.0f}s: {what}"
        time.sleep(0.2)
    return value


# --- the file format


def _config(tmp_path: Path, **sections) -> config.Config:
    path = write_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        **{"metrics": {"textfile": str(tmp_path / "prom" / "smocsd.prom")}, **sections},
    )
    return config.load(path)


def _samples(snapshot: Snapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The snapshot's samples by the name the file gives them (a counter's ends in
    _total), each as (labels, value)."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in snapshot.collect():
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append((sample.labels, sample.value))
    return by_name


def test_the_file_holds_each_family_with_its_own_samples_and_escaped_labels(tmp_path):
    """What generate_latest makes of a snapshot: # HELP and # TYPE under the name of the
    family's samples (a counter's with _total, and no _created samples), nothing but
    smocsd's families (none of a registry's process_ or python_ ones), none without
    samples (no publish sink: no delivery counters), label values escaped."""
    cfg = _config(tmp_path, daemon={"device_id": 'gw "7" \\ west'}, publish={"order": []})
    assert cfg.metrics.textfile is not None
    cfg.metrics.textfile.parent.mkdir()
    tally = Tally(started=1795830000.1)
    tally.cycle_ended("autoencoder", Outcome.PROMOTED, 2.5)
    Metrics(cfg, tally).write(lambda: _raise(OSError()), None, [cfg])
    text = cfg.metrics.textfile.read_text()

    family = r"# HELP (\w+) [^\n]+\.\n# TYPE \1 (?:gauge|counter)\n(?:\1\{[^\n]*\} \S+\n)+"
    assert re.fullmatch(f"(?:{family})+", text), text
    assert re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M) == [
        ("smocsd_build_info", "gauge"),
        ("smocsd_start_time_seconds", "gauge"),
        ("smocsd_last_cycle_outcome", "gauge"),
        ("smocsd_cycles_total", "counter"),
        ("smocsd_last_cycle_timestamp_seconds", "gauge"),
        ("smocsd_last_cycle_duration_seconds", "gauge"),
        ("smocsd_current_version", "gauge"),
        ("smocsd_current_damaged", "gauge"),
    ]
    values = {k: float(v) for k, v in re.findall(r"^([^#\n].*) (\S+)$", text, re.M)}
    dev = 'device="gw \\"7\\" \\\\ west"'
    mod = f'{dev},model="autoencoder"'
    assert values[f'smocsd_build_info{{{dev},version="{__version__}"}}'] == 1
    assert values[f"smocsd_start_time_seconds{{{dev}}}"] == 1795830000.1
    assert values[f'smocsd_cycles_total{{{mod},outcome="promoted"}}'] == 1
    assert values[f"smocsd_last_cycle_duration_seconds{{{mod}}}"] == 2.5
    assert values[f"smocsd_current_damaged{{{mod}}}"] == 0  # no current: nothing damaged
    assert len(values) == 2 + 2 * len(Outcome) + 4


def test_every_family_follows_the_naming_conventions(tmp_path):
    cfg = _config(tmp_path, publish={"order": ["kafka", "mqtt"]})
    tally = Tally()
    tally.cycle_ended("autoencoder", Outcome.FAILED, 2.5)

    # What the metrics read of live scoring: a model that has no version to score with yet.
    scoring = SimpleNamespace(
        scorers={"autoencoder": SimpleNamespace(position=SimpleNamespace(event=None))},
        lag_rows=lambda name: None,
    )
    snapshot = Metrics(cfg, tally).snapshot(lambda: _raise(OSError("no outbox")), scoring, [cfg])
    for f in snapshot.collect():
        (name,) = {s.name for s in f.samples}  # the file's name for it: a counter's _total
        assert name.startswith("smocsd_") and re.fullmatch(r"[a-z_]+", name), name
        assert name.endswith("_total") == (f.type == "counter"), name
        # base units: seconds (words of the name: "damaged" holds no age)
        if re.search(r"_(?:time|timestamp|duration|age)(?:_|$)|_lag_s", name):
            assert name.endswith("_seconds"), name
        assert f.documentation.endswith("."), name
        assert all(s.labels["device"] == "gw-test" for s in f.samples), name
    by_name = _samples(snapshot)
    assert "smocsd_outbox_depth" not in by_name  # unreadable now: left out, not the file
    mod = {"device": "gw-test", "model": "autoencoder"}
    assert by_name["smocsd_last_cycle_outcome"] == [
        ({**mod, "outcome": o.value}, int(o is Outcome.FAILED)) for o in Outcome
    ]
    assert by_name["smocsd_current_version"][0][1] == 0  # no model yet
    assert by_name["smocsd_delivery_failures_total"] == [
        ({"device": "gw-test", "sink": "kafka"}, 0),
        ({"device": "gw-test", "sink": "mqtt"}, 0),
    ]
    assert "smocsd_alarms_open" in by_name and "smocsd_scoring_lag_rows" not in by_name


def _raise(exc: Exception):
    raise exc


# --- the atomic write


def test_the_file_is_replaced_whole_and_readable_by_others_under_the_units_umask(tmp_path):
    path = tmp_path / "smocsd.prom"
    path.write_text("smocsd_old 1\n")
    reader = path.open()  # node_exporter in the middle of reading the old file
    inode = path.stat().st_ino
    old_umask = os.umask(0o027)  # systemd/smocsd.service's UMask=
    try:
        write_textfile(path, b"smocsd_new 2\n")
    finally:
        os.umask(old_umask)
    assert reader.read() == "smocsd_old 1\n"  # the old file, whole: never half of either
    reader.close()
    assert path.read_text() == "smocsd_new 2\n"
    assert path.stat().st_ino != inode  # replaced by rename, never written in place
    assert path.stat().st_mode & 0o777 == 0o644  # node_exporter runs as user prometheus
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smocsd.prom"]  # no temp left


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "smocsd.prom"
    path.write_text("smocsd_old 1\n")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left on device") as exc:
        write_textfile(path, b"smocsd_new 2\n")
    assert exc.value.filename == str(path) and "(metrics.textfile)" in str(exc.value)
    assert path.read_text() == "smocsd_old 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smocsd.prom"]
    missing = tmp_path / "nowhere" / "smocsd.prom"
    with pytest.raises(FileNotFoundError) as exc:
        write_textfile(missing, b"x 1\n")
    assert exc.value.filename == str(missing)


def test_scoring_ticks_rewrite_the_file_at_most_once_a_second(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    written: list[float] = []
    monkeypatch.setattr(metrics, "write_textfile", lambda path, data: written.append(1))
    part = Metrics(cfg, Tally())
    assert part.due()
    part.write(lambda: _raise(OSError()), None, [cfg])  # after a cycle: always
    assert not part.due()  # scoring steps: not within a second of a write
    part.write(lambda: _raise(OSError()), None, [cfg])
    assert len(written) == 2
    part._written -= metrics.MIN_INTERVAL  # a second later
    assert part.due()
    part.path = None
    assert not part.due()
    part.write(lambda: _raise(OSError()), None, [cfg])  # not configured: nothing
    assert len(written) == 2


def test_a_temp_file_a_killed_write_left_goes_at_the_first_write(tmp_path, monkeypatch):
    """Its name holds the writer's pid, so the next daemon would never reuse it."""
    cfg = _config(tmp_path)
    assert cfg.metrics.textfile is not None
    cfg.metrics.textfile.parent.mkdir()
    leftover = cfg.metrics.textfile.with_name(f".tmp-{cfg.metrics.textfile.name}.1")
    leftover.write_text("smocsd_half")
    written: list[bytes] = []
    monkeypatch.setattr(metrics, "write_textfile", lambda path, data: written.append(data))
    Metrics(cfg, Tally()).write(lambda: _raise(OSError()), None, [cfg])
    assert written and not leftover.exists()


# --- the configuration


def test_the_textfile_key_is_off_by_default_and_checked(tmp_path):
    env = {"STATE_DIRECTORY": str(tmp_path)}
    assert config.parse("", env=env).metrics.textfile is None
    assert config.parse('[metrics]\ntextfile = ""\n', env=env).metrics.textfile is None
    prom = "/var/lib/prometheus/node-exporter/smocsd.prom"
    cfg = config.parse(f'[metrics]\ntextfile = "{prom}"\n', env=env)
    assert cfg.metrics.textfile == Path(prom)
    for value in ('"smocsd.prom"', '"/var/lib/smocsd/metrics.txt"', '"/tmp/.prom"', "1"):
        with pytest.raises(ConfigError) as exc:
            config.parse(f"[metrics]\ntextfile = {value}\n", path=Path("c.toml"), env=env)
        (problem,) = exc.value.problems
        assert problem.startswith("c.toml: metrics.textfile: "), problem


# --- the counts


def test_alarm_events_opened_are_counted_from_what_a_step_queued():
    tally = Tally()
    # (messages queued, an event open before, after): opened, closed, opened and closed
    # in one step (a backlog), closed and a new one opened, open-close-open.
    for queued, before, after in ((1, False, True), (1, True, False), (2, False, False)):
        tally.scored("pump@1", queued, before, after, scoring=True)
    for queued, before, after in ((2, True, True), (3, False, True), (0, True, True)):
        tally.scored("pump@1", queued, before, after, scoring=True)
    tally.scored("pump@2", 1, False, True, scoring=False)  # each model's own
    assert tally.alarms_opened == {"pump@1": 1 + 0 + 1 + 1 + 2 + 0, "pump@2": 1}
    assert list(tally.caught_up) == ["pump@1"]  # pump@2 has no model to score with yet


def test_deliveries_are_counted_per_sink_as_the_publisher_offers_them():
    class Sink:
        def __init__(self, name: str, takes: bool | None) -> None:
            self.name, self.takes = name, takes
            self.said = Said()

        def send(self, messages: list[dict], _should_stop: Callable[[], bool]) -> list[bool]:
            if self.takes is None:
                raise RuntimeError("boom")
            return [self.takes] * len(messages)

    publisher = Publisher(config.parse("", env={}).publish, "gw")
    publisher.sinks = [Sink("kafka", False), Sink("mqtt", True)]
    tally = Tally()
    metrics.count_deliveries(publisher, tally)
    deliver = publisher.attempt()
    assert deliver([{}, {}]) == ["mqtt", "mqtt"]
    assert deliver([{}]) == ["mqtt"]  # kafka failed in this flush: not offered again
    assert (tally.delivered, tally.failed) == (Counter(mqtt=3), Counter(kafka=2))
    publisher.sinks[1].sink.takes = None  # raises: Publisher logs it, every message fails
    assert publisher.attempt()([{}]) == [None]
    assert (tally.delivered, tally.failed) == (Counter(mqtt=3), Counter(kafka=3, mqtt=1))


def test_each_models_last_cycle_is_known_from_state_json_after_a_restart(tmp_path):
    state = tmp_path / "state.json"
    rejected = {"at": "2026-11-28T04:17:54Z", "outcome": "rejected"}
    # A release before [models] tables: its one cycle is the top-level model's.
    state.write_text(json.dumps({"last_cycle": rejected}))
    tally = Tally.resume(tmp_path)
    last = tally.last_of("autoencoder", "autoencoder")
    assert last is not None and last.outcome is Outcome.REJECTED and last.duration is None
    assert last.ended == 1795839474.0
    assert tally.last_of("pump@1", "autoencoder") is None
    # ... also once this release has saved the model's scoring position, before a cycle.
    position = {"last_order": 3, "version": 1, "recent": [], "event": None, "at": None}
    state.write_text(
        json.dumps({"last_cycle": rejected, "models": {"autoencoder": {"scoring": position}}})
    )
    assert Tally.resume(tmp_path).last_of("autoencoder", "autoencoder") == last
    # This release: each model's own record; the top-level one is any model's last.
    promoted = {"at": "2026-11-29T00:00:00Z", "outcome": "promoted", "version": 2}
    state.write_text(
        json.dumps({"last_cycle": promoted, "models": {"pump@1": {"last_cycle": promoted}}})
    )
    tally = Tally.resume(tmp_path)
    assert tally.last_of("pump@1", "autoencoder").outcome is Outcome.PROMOTED
    assert tally.last_of("autoencoder", "autoencoder") is None
    state.write_text('{"last_cycle": {"outcome": "nonsense"}}')
    assert Tally.resume(tmp_path).last_of("autoencoder", "autoencoder") is None
    assert Tally.resume(tmp_path / "none").last_of("autoencoder", "autoencoder") is None


def test_every_models_metrics_carry_its_name_one_sample_each(tmp_path):
    """Two partitions' models: each family of a model has a sample of each, named by its
    `model` label, from its own store, cycles, alarms and scoring position; the daemon's
    own families carry only the device."""
    from smocsd.app.live import Scoring
    from smocsd.app.modelset import ModelSet

    cfg = _config(
        tmp_path,
        source={"order_column": "id", "partition_column": "asset"},
        scoring={"enabled": True},
    )
    for name, threshold in (("autoencoder@P-1", 1.5), ("autoencoder@P-2", 2.5)):
        version = tmp_path / "state/models" / name / "v000001"
        version.mkdir(parents=True)
        meta = model_meta(b"", name=name, threshold=threshold)
        (version / "metadata.json").write_text(json.dumps(meta))
        (version.parent / "current").symlink_to(version.name)
    event = {
        "event_id": "0a5e1f4c-3a52-5d40-9c8e-7f1b2c3d4e5f",
        "version": 1,
        "start": {"order": 5, "time": None},
        "last": {"order": 6, "time": None},
        "peak_score": 9.0,
        "threshold": 2.5,
        "errors": {"a": 1.0},
    }
    position = {"last_order": 6, "version": 1, "recent": [], "event": event, "at": None}
    (tmp_path / "state/state.json").write_text(
        json.dumps({"models": {"autoencoder@P-2": {"scoring": position}}})
    )
    models = ModelSet(cfg).resolve(read_table=False)
    assert [m.model.name for m in models] == ["autoencoder@P-1", "autoencoder@P-2"]
    tally = Tally()
    tally.cycle_ended("autoencoder@P-1", Outcome.PROMOTED, 2.0)
    tally.cycle_ended("autoencoder@P-2", Outcome.SKIPPED, 0.1)
    tally.cycle_ended("autoencoder@P-2", Outcome.SKIPPED, 0.1)
    tally.scored("autoencoder@P-2", 1, False, True, scoring=True)
    scoring = Scoring(cfg)
    scoring.set_models(models)
    families = _samples(Metrics(cfg, tally).snapshot(lambda: _raise(OSError()), scoring, models))
    scoring.close()

    def samples(name: str, **labels: str) -> dict[str, float]:
        found = [(s, v) for s, v in families[name] if labels.items() <= s.items()]
        by_model = {s["model"]: v for s, v in found}
        assert len(by_model) == len(found), found  # one sample per model
        return by_model

    p1, p2 = "autoencoder@P-1", "autoencoder@P-2"
    assert samples("smocsd_current_version") == {p1: 1, p2: 1}
    assert samples("smocsd_current_threshold") == {p1: 1.5, p2: 2.5}
    assert samples("smocsd_cycles_total", outcome="skipped") == {p1: 0, p2: 2}
    assert samples("smocsd_cycles_total", outcome="promoted") == {p1: 1, p2: 0}
    assert samples("smocsd_last_cycle_outcome", outcome="promoted") == {p1: 1, p2: 0}
    assert set(samples("smocsd_last_cycle_duration_seconds")) == {p1, p2}
    assert samples("smocsd_alarms_open") == {p1: 0, p2: 1}
    assert samples("smocsd_alarms_total") == {p1: 0, p2: 1}
    assert list(samples("smocsd_scoring_lag_seconds")) == [p2]  # p1 has not scored yet
    assert "smocsd_scoring_lag_rows" not in families  # no poll of the table yet
    for name in ("smocsd_build_info", "smocsd_start_time_seconds"):
        assert all("model" not in s for s, _ in families[name]), name


def _damaged(part: Metrics, cfg: config.Config) -> float:
    """The file's smocsd_current_damaged of the one model."""
    samples = _samples(part.snapshot(lambda: _raise(OSError()), None, [cfg]))
    ((_, value),) = samples["smocsd_current_damaged"]
    return value


def test_a_damaged_current_model_is_found_by_its_check_and_said_once(tmp_path, monkeypatch, caplog):
    """The check hashes every file: it runs again only when a file's stat changed, or
    after RECHECK_INTERVAL, which is how bit rot (same inode, size and mtime) shows."""
    demo.write(tmp_path / "state/readings.db", 3000)
    cfg = _config(tmp_path)
    smocsd("train-once", config=tmp_path / "c.toml", check=True)
    onnx = tmp_path / "state/models/autoencoder/v000001/model.onnx"
    whole = onnx.read_bytes()
    checks: list[Path] = []
    check = modelfile.check
    monkeypatch.setattr(modelfile, "check", lambda d: checks.append(d) or check(d))
    caplog.set_level(logging.WARNING, logger=metrics.__name__)
    part = Metrics(cfg, Tally())

    assert _damaged(part, cfg) == 0 and len(checks) == 1
    assert _damaged(part, cfg) == 0 and len(checks) == 1  # the same files: not re-hashed

    # Bit rot: one byte flips, the file's stat stays as it was.
    before = onnx.stat()
    with onnx.open("r+b") as f:
        f.seek(len(whole) // 2)
        f.write(bytes([whole[len(whole) // 2] ^ 0x01]))
    os.utime(onnx, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (onnx.stat().st_ino, onnx.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _damaged(part, cfg) == 0 and len(checks) == 1
    monkeypatch.setattr(metrics, "RECHECK_INTERVAL", 0.0)  # an hour later
    assert _damaged(part, cfg) == 1 and len(checks) == 2
    monkeypatch.setattr(metrics, "RECHECK_INTERVAL", 3600.0)
    assert _damaged(part, cfg) == 1 and len(checks) == 2

    # Repaired, then truncated by hand: each shows at the next write.
    onnx.write_bytes(whole)
    os.utime(onnx, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert _damaged(part, cfg) == 0 and len(checks) == 3
    onnx.write_bytes(whole[:-1])
    assert _damaged(part, cfg) == 1 and len(checks) == 4
    assert _damaged(part, cfg) == 1 and len(checks) == 4

    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once each time it turned damaged
    assert "autoencoder: the current model is damaged: v000001/model.onnx: sha256" in warnings[0]
    assert f"v000001/model.onnx: {len(whole) - 1} bytes, metadata.json says" in warnings[1]


def test_a_dangling_current_link_is_a_damaged_current_model(tmp_path, caplog):
    cfg = _config(tmp_path)
    store = tmp_path / "state/models/autoencoder"
    store.mkdir(parents=True)
    (store / "current").symlink_to("v000007")  # its version directory removed by hand
    caplog.set_level(logging.WARNING, logger=metrics.__name__)
    part = Metrics(cfg, Tally())
    assert _damaged(part, cfg) == 1
    (store / "current").unlink()
    assert _damaged(part, cfg) == 0  # no current model at all: nothing damaged
    (record,) = caplog.records
    assert "-> v000007: no such version directory (dangling link)" in record.getMessage()


# --- the daemon


# --- the daemon


def test_a_file_that_cannot_be_written_is_logged_once_and_training_goes_on(tmp_path):
    state, prom = tmp_path / "state", tmp_path / "prom"
    demo.write(state / "readings.db", 3000)
    textfile = prom / "smocsd.prom"
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "0.3s"},
        scoring={"enabled": True},
        metrics={"textfile": str(textfile)},
    )
    d = Running(cfg, tmp_path / "log")
    try:
        d.wait_for("promoted v1", timeout=WAIT)
        d.wait_for("scoring with v1", timeout=WAIT)
        insert(state / "readings.db", 600)  # enough new rows for another cycle
        d.wait_for(" v2", timeout=WAIT)  # ticks, cycles and scoring steps go on
        failed = [line for line in d.text().splitlines() if "metrics:" in line]
        assert len(failed) == 1, failed
        assert f"No such file or directory (metrics.textfile): '{textfile}'" in failed[0]
        prom.mkdir()
        d.wait_for("metrics: recovered from", timeout=WAIT)
        until(textfile.exists, f"{textfile} written")
        # The path changes on reload: the old file goes, nothing would update it.
        other = prom / "other.prom"
        cfg.write_text(cfg.read_text().replace(str(textfile), str(other)))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("configuration reloaded", timeout=WAIT)
        until(lambda: other.exists() and not textfile.exists(), "the file moved")
        assert d.stop() == 0
    finally:
        d.close()
    assert "smocsd_current_version{" in other.read_text()


def _value(scrape: dict, name: str, **labels: str) -> float | None:
    """The value of the sample of `name` whose labels include `labels`."""
    found = [v for sample, v in scrape.get(name, []) if labels.items() <= sample.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def test_node_exporter_serves_what_a_real_daemon_wrote(tmp_path, node_exporter):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    device = 'gw "7" \\ west'  # quotes and a backslash: the label escapes, end to end
    textfile = node_exporter.textfile_dir / "smocsd.prom"
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "1h", "device_id": device},
        scoring={"enabled": True},
        metrics={"textfile": str(textfile)},
        # Nothing listens there: every delivery fails at once, and the results wait.
        publish={"order": ["mqtt"]},
        **{"publish.mqtt": {"host": "127.0.0.1", "port": free_port()}},
    )
    old_umask = os.umask(0o027)  # the unit's UMask=: the daemon inherits it
    try:
        d = Running(cfg, tmp_path / "log")
    finally:
        os.umask(old_umask)
    dev = {"device": device}
    mod = {**dev, "model": "autoencoder"}
    try:
        d.wait_for("scoring with v1", timeout=WAIT)

        def after_the_first_cycle() -> dict | None:
            """A scrape of a file written after the cycle's result went to the outbox
            and its delivery failed, and after scoring started."""
            s = node_exporter.scrape()
            done = _value(s, "smocsd_last_cycle_outcome", **mod, outcome="promoted")
            tried = _value(s, "smocsd_delivery_failures_total", **dev, sink="mqtt")
            return s if done and tried and "smocsd_scoring_lag_rows" in s else None

        scrape = until(after_the_first_cycle, "a scrape after the first cycle")
        assert _value(scrape, "node_textfile_scrape_error") == 0
        assert _value(scrape, "smocsd_current_version", **mod) == 1
        assert _value(scrape, "smocsd_last_cycle_outcome", **mod, outcome="promoted") == 1
        for outcome in ("rejected", "failed", "skipped"):
            assert _value(scrape, "smocsd_last_cycle_outcome", **mod, outcome=outcome) == 0
        assert _value(scrape, "smocsd_cycles_total", **mod, outcome="promoted") == 1
        assert _value(scrape, "smocsd_outbox_depth", **dev) == 1  # the result, waiting
        assert _value(scrape, "smocsd_outbox_oldest_age_seconds", **dev) >= 0
        assert _value(scrape, "smocsd_deliveries_total", **dev, sink="mqtt") == 0
        assert _value(scrape, "smocsd_delivery_failures_total", **dev, sink="mqtt") >= 1
        meta = json.loads((state / "models/autoencoder/v000001/metadata.json").read_text())
        assert _value(scrape, "smocsd_current_threshold", **mod) == meta["threshold"]
        assert _value(scrape, "smocsd_current_validation_loss", **mod) == pytest.approx(
            meta["metrics"]["val_loss"]
        )
        assert _value(scrape, "smocsd_last_training_read_rows", **mod) == 3000
        dropped = meta["data"]["dropped_rows"]
        assert _value(scrape, "smocsd_last_training_dropped_rows", **mod) == dropped
        assert _value(scrape, "smocsd_last_cycle_duration_seconds", **mod) > 0
        started = _value(scrape, "smocsd_start_time_seconds", **dev)
        assert started <= _value(scrape, "smocsd_last_cycle_timestamp_seconds", **mod)
        assert _value(scrape, "smocsd_alarms_open", **mod) == 0
        assert _value(scrape, "smocsd_alarms_total", **mod) == 0

        # An anomaly: live scoring opens an alarm event, and the file says so.
        insert(state / "readings.db", 30)
        insert(state / "readings.db", 8, vibration_factor=6.0)
        scrape = until(
            lambda: _value(s := node_exporter.scrape(), "smocsd_alarms_total", **mod) and s,
            "smocsd_alarms_total 1",
        )
        assert _value(scrape, "smocsd_alarms_total", **mod) == 1
        assert _value(scrape, "smocsd_alarms_open", **mod) == 1
        assert _value(scrape, "smocsd_outbox_depth", **dev) == 2  # and its open event
        assert _value(scrape, "smocsd_scoring_lag_rows", **mod) == 0
        assert 0 <= _value(scrape, "smocsd_scoring_lag_seconds", **mod) < WAIT
        assert _value(scrape, "node_textfile_scrape_error") == 0
        assert d.stop() == 0
    finally:
        d.close()
    assert textfile.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in node_exporter.textfile_dir.iterdir()] == ["smocsd.prom"]
    textfile.unlink()
