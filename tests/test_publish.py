"""Publishing against real servers: Kafka first, MQTT as fallback, the outbox for the rest.

Every check reads back with a real consumer what the brokers stored.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import schemacheck
from services import CertificateAuthority, Kafka, Mosquitto

from smocsd.common.config import KafkaConfig, MqttConfig, PublishConfig, parse, partition_value
from smocsd.delivery import publish
from smocsd.delivery.outbox import FLUSH_BATCH, Outbox
from smocsd.delivery.publish import Publisher, Said, mqtt_topic
from smocsd.schemas import ALARM_SCHEMA, LABEL_SCHEMA

DEVICE = "gw-test"
MQTT_TOPIC = "smocsd/{device_id}/training-results"
TIMEOUT = 3.0  # seconds per sink and attempt; short to keep the outage tests quick


def result(n: int = 0) -> dict:
    return {
        "schema": "smocsd.training-result/1",
        "message_id": str(uuid.uuid4()),
        "device_id": DEVICE,
        "model": "autoencoder",
        "version": n + 1,
        "outcome": "promoted",
        "timestamp": "2026-11-26T05:00:00Z",
        "metrics": {"val_loss": 0.5 / (n + 1)},
        "eval": {"val_score_p99": 0.1},
        "model_meta": {"backend": "numpy"},
    }


def ids(messages: list[dict]) -> list[str]:
    return [m["message_id"] for m in messages]


def publish_config(
    kafka: Kafka, mosquitto: Mosquitto, topic: str, order: tuple[str, ...] = ("kafka", "mqtt")
) -> PublishConfig:
    return PublishConfig(
        order=order,
        kafka=KafkaConfig(bootstrap_servers=kafka.bootstrap, topic=topic, timeout=TIMEOUT),
        mqtt=MqttConfig(host="127.0.0.1", port=mosquitto.port, topic=MQTT_TOPIC, timeout=TIMEOUT),
    )


def has_all(wanted: list[str]) -> Callable[[list], bool]:
    """A stop condition for read-back: every wanted message_id has arrived."""

    def check(records: list) -> bool:
        return set(wanted) <= {_value(r)["message_id"] for r in records}

    return check


def _value(record: dict | tuple) -> dict:
    return record["value"] if isinstance(record, dict) else record[1]


@pytest.fixture
def topic() -> str:
    return f"results-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox.db")


def test_result_reaches_kafka_with_key_and_schema(
    kafka: Kafka, mosquitto: Mosquitto, topic: str
) -> None:
    messages = [result(0), {**result(1), "model": "pump_7"}]
    publisher = Publisher(publish_config(kafka, mosquitto, topic), DEVICE)
    assert publisher.attempt()(messages) == ["kafka", "kafka"]
    records = kafka.messages(topic, has_all(ids(messages)))
    assert [r["key"] for r in records] == ["gw-test/autoencoder", "gw-test/pump_7"]
    assert [r["value"] for r in records] == messages


@pytest.mark.timeout(180)
def test_kafka_down_then_mqtt_then_outbox_then_recovery(
    kafka: Kafka, mosquitto: Mosquitto, topic: str, outbox: Outbox
) -> None:
    publisher = Publisher(publish_config(kafka, mosquitto, topic), DEVICE)
    first, via_mqtt, waiting = result(0), result(1), [result(2), result(3)]
    with mosquitto.subscriber("smocsd/+/training-results") as sub:
        outbox.put(first)
        assert outbox.flush(publisher.attempt()) == 1

        kafka.stop()
        outbox.put(via_mqtt)
        assert outbox.flush(publisher.attempt()) == 1
        received = sub.messages(has_all([via_mqtt["message_id"]]))
        assert received == [("smocsd/gw-test/training-results", via_mqtt)]

        mosquitto.stop()
        for m in waiting:
            outbox.put(m)
        assert outbox.flush(publisher.attempt()) == 0  # returns, bounded by the timeouts
        assert outbox.pending() == waiting

        kafka.start()
        mosquitto.start()
        assert outbox.flush(publisher.attempt()) == 2
        assert len(outbox) == 0
    records = kafka.messages(topic, has_all(ids([first, *waiting])))
    assert [r["value"] for r in records] == [first, *waiting]


@pytest.mark.timeout(180)
def test_results_queued_during_outage_all_arrive(
    kafka: Kafka,
    mosquitto: Mosquitto,
    topic: str,
    outbox: Outbox,
    record_property: Callable[[str, object], None],
) -> None:
    publisher = Publisher(publish_config(kafka, mosquitto, topic), DEVICE)
    messages = [result(i) for i in range(200)]
    kafka.stop()
    mosquitto.stop()
    for i, m in enumerate(messages):
        outbox.put(m)
        if i % 50 == 0:  # the daemon's ticks keep trying during the outage
            assert outbox.flush(publisher.attempt()) == 0
    assert len(outbox) == 200
    kafka.start()
    mosquitto.start()
    assert outbox.flush(publisher.attempt()) == 200
    assert len(outbox) == 0
    records = kafka.messages(topic, has_all(ids(messages)))
    counts = collections.Counter(r["value"]["message_id"] for r in records)
    assert set(counts) == set(ids(messages)), "results lost"
    # At least once: a duplicate is allowed (counted in the report), but only as a whole copy.
    record_property("duplicates", sum(counts.values()) - len(counts))
    by_id = {m["message_id"]: m for m in messages}
    assert all(r["value"] == by_id[r["value"]["message_id"]] for r in records)


def run_ticks(
    outbox: Outbox, publisher: Publisher, server: Kafka | Mosquitto, first: int = 0
) -> tuple[list[dict], collections.Counter[str | None]]:
    """Tick like the daemon (put one result, flush the outbox) before, during and after
    a restart of `server` (down for a second) in another thread. Returns the results
    put and how many deliveries each sink took."""
    sent: list[dict] = []
    taken: collections.Counter[str | None] = collections.Counter()
    failure: list[BaseException] = []

    def restart() -> None:
        try:
            server.stop()
            time.sleep(1)
            server.start()
        except BaseException as exc:
            failure.append(exc)

    def deliver(messages: list[dict]) -> list[str | None]:
        sinks = publisher.attempt()(messages)
        taken.update(sinks)
        return sinks

    thread = threading.Thread(target=restart)
    after = 0
    while after < 5:
        if len(sent) == 5:
            thread.start()
        elif len(sent) > 5 and not thread.is_alive():
            after += 1
        sent.append(result(first + len(sent)))
        outbox.put(sent[-1])
        outbox.flush(deliver)
        time.sleep(0.05)
    if failure:
        raise failure[0]
    return sent, taken


@pytest.mark.timeout(300)
def test_broker_restarts_in_the_middle_of_a_run(
    kafka: Kafka, mosquitto: Mosquitto, topic: str, outbox: Outbox
) -> None:
    with mosquitto.subscriber("smocsd/+/training-results") as sub:
        kafka_first = Publisher(publish_config(kafka, mosquitto, topic), DEVICE)
        sent, taken = run_ticks(outbox, kafka_first, kafka)
        assert taken["kafka"] >= 10 and taken["mqtt"] >= 1, taken
        mqtt_first = Publisher(publish_config(kafka, mosquitto, topic, ("mqtt", "kafka")), DEVICE)
        more, taken = run_ticks(outbox, mqtt_first, mosquitto, first=len(sent))
        assert taken["mqtt"] >= 10 and taken["kafka"] >= 1, taken
        sent += more
        assert len(outbox) == 0
        want = ids(sent)
        arrived = [r["value"] for r in kafka.messages(topic, lambda _r: False, timeout=3)]
        arrived += [
            p
            for _t, p in sub.messages(
                lambda got: set(want) <= set(ids(arrived + [p for _, p in got]))
            )
        ]
    counts = collections.Counter(ids(arrived))
    assert set(counts) == set(want), f"{len(set(want) - set(counts))} results lost"
    # Duplicates are allowed (at least once) but each one must be a whole copy.
    by_id = {m["message_id"]: m for m in sent}
    assert all(m == by_id[m["message_id"]] for m in arrived)


# ---------------------------------------------------------------- authenticated, encrypted


def secret_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"secret-{uuid.uuid4().hex[:6]}"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def sasl_config(
    kafka: Kafka, ca: CertificateAuthority, topic: str, mechanism: str, password_file: Path
) -> PublishConfig:
    return PublishConfig(
        order=("kafka",),
        kafka=KafkaConfig(
            bootstrap_servers=kafka.sasl_bootstrap,
            topic=topic,
            security_protocol="SASL_SSL",
            sasl_mechanism=mechanism,
            sasl_username=kafka.username,
            sasl_password_file=password_file,
            ssl_ca_location=ca.ca_file,
            timeout=TIMEOUT,
        ),
    )


def tls_config(
    mosquitto: Mosquitto, ca: CertificateAuthority, password_file: Path
) -> PublishConfig:
    return PublishConfig(
        order=("mqtt",),
        mqtt=MqttConfig(
            host="localhost",
            port=mosquitto.tls_port,
            topic=MQTT_TOPIC,
            tls=True,
            ca_file=ca.ca_file,
            username=mosquitto.username,
            password_file=password_file,
            timeout=TIMEOUT,
        ),
    )


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "PLAIN"])
def test_kafka_sasl_ssl_delivers(
    kafka: Kafka, test_ca: CertificateAuthority, topic: str, tmp_path: Path, mechanism: str
) -> None:
    cfg = sasl_config(kafka, test_ca, topic, mechanism, secret_file(tmp_path, kafka.password))
    message = result()
    assert Publisher(cfg, DEVICE).attempt()([message]) == ["kafka"]
    assert [r["value"] for r in kafka.messages(topic, has_all([message["message_id"]]))] == [
        message
    ]


def test_kafka_wrong_password_is_refused_clearly(
    kafka: Kafka,
    test_ca: CertificateAuthority,
    topic: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = sasl_config(kafka, test_ca, topic, "SCRAM-SHA-256", secret_file(tmp_path, "wrong"))
    with caplog.at_level(logging.DEBUG, logger="smocsd.publish"):
        assert Publisher(cfg, DEVICE).attempt()([result()]) == [None]
    lines = [
        r for r in caplog.records if r.name == "smocsd.publish" and r.levelno >= logging.WARNING
    ]
    assert len(lines) == 1
    assert lines[0].levelno == logging.ERROR
    text = lines[0].getMessage()
    assert text.startswith(f"kafka {kafka.sasl_bootstrap} refused")
    assert "Authentication failed" in text


def test_mqtt_tls_with_password_delivers(
    mosquitto: Mosquitto, test_ca: CertificateAuthority, tmp_path: Path
) -> None:
    cfg = tls_config(mosquitto, test_ca, secret_file(tmp_path, mosquitto.password))
    message = result()
    with mosquitto.subscriber("smocsd/+/training-results") as sub:
        assert Publisher(cfg, DEVICE).attempt()([message]) == ["mqtt"]
        assert [p for _t, p in sub.messages(has_all([message["message_id"]]))] == [message]


def test_mqtt_wrong_password_is_refused_clearly(
    mosquitto: Mosquitto,
    test_ca: CertificateAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = tls_config(mosquitto, test_ca, secret_file(tmp_path, "wrong"))
    with caplog.at_level(logging.DEBUG, logger="smocsd.publish"):
        assert Publisher(cfg, DEVICE).attempt()([result()]) == [None]
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelno) for r in lines] == [("smocsd.publish", logging.ERROR)]
    assert (
        lines[0]
        .getMessage()
        .startswith(f"mqtt localhost:{mosquitto.tls_port} refused the connection")
    )
    assert "Not authorized" in lines[0].getMessage()


def test_mqtt_untrusted_certificate_is_refused(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other_ca = CertificateAuthority.create(tmp_path / "other-ca")
    cfg = tls_config(mosquitto, other_ca, secret_file(tmp_path, mosquitto.password))
    with caplog.at_level(logging.WARNING, logger="smocsd.publish"):
        assert Publisher(cfg, DEVICE).attempt()([result()]) == [None]
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "TLS handshake failed" in caplog.text
    assert "certificate verify failed" in caplog.text


def test_a_message_kafka_rejects_goes_to_mqtt_alone(
    kafka: Kafka, mosquitto: Mosquitto, topic: str
) -> None:
    """The chain is per message: one result Kafka refuses (too large) takes the MQTT
    path, its neighbours still go to Kafka."""
    small, big, last = result(0), {**result(1), "model_meta": {"blob": "x" * 2_000_000}}, result(2)
    publisher = Publisher(publish_config(kafka, mosquitto, topic), DEVICE)
    with mosquitto.subscriber("smocsd/+/training-results") as sub:
        assert publisher.attempt()([small, big, last]) == ["kafka", "mqtt", "kafka"]
        assert [p for _t, p in sub.messages(has_all([big["message_id"]]))] == [big]
    assert [r["value"] for r in kafka.messages(topic, has_all(ids([small, last])))] == [small, last]


# ---------------------------------------------------------------- never stalls, never raises


@pytest.mark.timeout(60)
def test_silent_brokers_cost_one_bounded_attempt_each(
    tmp_path: Path, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Brokers that accept TCP connections but never answer (a hung host) make
    deliver() give up after each sink's timeout, once per call however many results."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        port = silent.getsockname()[1]
        cfg = PublishConfig(
            kafka=KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", topic=topic, timeout=2),
            mqtt=MqttConfig(host="127.0.0.1", port=port, timeout=2),
        )
        with caplog.at_level(logging.WARNING, logger="smocsd.publish"):
            assert Publisher(cfg, DEVICE).attempt()([result(i) for i in range(50)]) == [None] * 50
    assert [r.getMessage().split()[0] for r in caplog.records] == ["kafka", "mqtt"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("sink", "why"),
    [("kafka", "stopping before a delivery report"), ("mqtt", "stopping before a CONNACK")],
)
def test_an_attempt_on_a_silent_broker_asks_should_stop_all_along(
    sink: str, why: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout may be 15 minutes and the unit's WatchdogSec is 2: an attempt waiting on
    a broker that accepts connections and never answers calls should_stop (the daemon's
    feeds the watchdog) between short waits, and ends when it says stop."""
    calls: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 20

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        port = silent.getsockname()[1]
        cfg = PublishConfig(
            order=(sink,),
            kafka=KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", topic=topic, timeout=900),
            mqtt=MqttConfig(host="127.0.0.1", port=port, timeout=900),
        )
        with caplog.at_level(logging.WARNING, logger="smocsd.publish"):
            deliver = Publisher(cfg, DEVICE).attempt(should_stop)
            assert deliver([result(i) for i in range(5)]) == [None] * 5
    assert len(calls) == 21  # one before the sink, then one per wait until it said stop
    [line] = caplog.records
    assert line.getMessage().startswith(f"{sink} 127.0.0.1:{port}") and why in line.getMessage()


class FakeMqttBroker:
    """A TCP server that speaks just enough MQTT to fail after the CONNACK: it accepts
    the session, then `mode` "no-puback" reads every PUBLISH and acknowledges none,
    "stops-reading" reads nothing more (a hung broker: the client's send buffer fills),
    "drops" closes the connection once a PUBLISH arrives."""

    CONNACK = b"\x20\x02\x00\x00"  # session accepted

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.done = threading.Event()
        self.server = socket.socket()
        # A small receive buffer (inherited by the accepted socket), so that a broker that
        # stops reading fills the client's send buffer after a few MB on any host.
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)  # the CONNECT
            conn.sendall(self.CONNACK)
            if self.mode == "drops":
                conn.recv(1)
                return
            while not self.done.is_set():
                if self.mode == "no-puback":
                    conn.settimeout(0.1)
                    with contextlib.suppress(TimeoutError):
                        if not conn.recv(65536):
                            return
                else:
                    self.done.wait(0.1)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.server.close()


def paho_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "payload", "why", "within"),
    [
        # Not acknowledged: never counted as delivered, whatever reached the broker.
        ("no-puback", 100, "no PUBACK before the timeout", (2.0, 3.0)),
        # 25 MB: DISCONNECT cannot be written either; the socket is shut down after the
        # grace (1 s), so paho's thread ends and loop_stop() returns.
        ("stops-reading", 500_000, "no PUBACK before the timeout", (2.9, 4.5)),
        # A lost connection ends the wait at once, not at the deadline.
        ("drops", 100, "connection lost", (0.0, 1.5)),
    ],
)
def test_mqtt_broker_failing_after_connack_costs_one_bounded_attempt(
    mode: str, payload: int, why: str, within: tuple[float, float], caplog: pytest.LogCaptureFixture
) -> None:
    broker = FakeMqttBroker(mode)
    cfg = PublishConfig(
        order=("mqtt",), mqtt=MqttConfig(host="127.0.0.1", port=broker.port, timeout=2)
    )
    messages = [{**result(i), "model_meta": {"blob": "x" * payload}} for i in range(50)]
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="smocsd.publish"):
            assert Publisher(cfg, DEVICE).attempt()(messages) == [None] * 50
        took = time.monotonic() - started
    finally:
        broker.close()
    assert within[0] <= took < within[1], took
    [line] = caplog.records
    text = line.getMessage()
    assert text.startswith(f"mqtt 127.0.0.1:{broker.port}: 50 of 50 result(s) not acknowledged")
    assert why in text, text
    assert not paho_threads(), "paho's network thread outlived the attempt"


def test_unsafe_secret_file_is_reported_not_raised(
    tmp_path: Path, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    readable = tmp_path / "kafka.pass"
    readable.write_text("secret\n")
    readable.chmod(0o644)
    cfg = PublishConfig(
        order=("kafka",),
        kafka=KafkaConfig(
            bootstrap_servers="127.0.0.1:9",
            topic=topic,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="u",
            sasl_password_file=readable,
        ),
    )
    with caplog.at_level(logging.ERROR, logger="smocsd.publish"):
        assert Publisher(cfg, DEVICE).attempt()([result()]) == [None]
    assert len(caplog.records) == 1
    assert str(readable) in caplog.records[0].getMessage()


def test_missing_ca_files_are_reported_not_raised(
    tmp_path: Path, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    cfg = PublishConfig(
        kafka=KafkaConfig(
            bootstrap_servers="127.0.0.1:9",
            topic=topic,
            security_protocol="SSL",
            ssl_ca_location=missing,
        ),
        mqtt=MqttConfig(host="127.0.0.1", port=9, tls=True, ca_file=missing),
    )
    with caplog.at_level(logging.ERROR, logger="smocsd.publish"):
        assert Publisher(cfg, DEVICE).attempt()([result()]) == [None]
    assert [r.getMessage().split()[0] for r in caplog.records] == ["kafka", "mqtt"]
    assert all("ca" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


# ---------------------------------------------------------------- one flush, one attempt per sink


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_backlog_with_kafka_down_costs_one_kafka_attempt_and_goes_by_mqtt(
    mosquitto: Mosquitto, topic: str, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = PublishConfig(
        order=("kafka", "mqtt"),
        kafka=KafkaConfig(
            bootstrap_servers=f"127.0.0.1:{closed_port()}", topic=topic, timeout=TIMEOUT
        ),
        mqtt=MqttConfig(host="127.0.0.1", port=mosquitto.port, topic=MQTT_TOPIC, timeout=TIMEOUT),
    )
    messages = [result(i) for i in range(250)]
    for m in messages:
        outbox.put(m)
    with (
        mosquitto.subscriber("smocsd/+/training-results") as sub,
        caplog.at_level(logging.WARNING, logger="smocsd.publish"),
    ):
        assert outbox.flush(Publisher(cfg, DEVICE).attempt()) == 250
        received = sub.messages(has_all(ids(messages)))
    kafka_lines = [r for r in caplog.records if r.getMessage().startswith("kafka ")]
    assert len(kafka_lines) == 1, [r.getMessage() for r in kafka_lines]
    assert f"{FLUSH_BATCH} of {FLUSH_BATCH}" in kafka_lines[0].getMessage()  # the first batch
    assert sorted(ids([p for _t, p in received])) == sorted(ids(messages))
    assert len(outbox) == 0


class FakeSink:
    """A sink that acknowledges what `ack` says, or raises once `broken`; remembers how
    many messages each call sent."""

    def __init__(self, name: str, ack: Callable[[dict], bool]) -> None:
        self.name = name
        self.ack = ack
        self.broken = False
        self.calls: list[int] = []
        self.said = Said()

    def send(self, messages: list[dict], _should_stop: Callable[[], bool]) -> list[bool]:
        self.calls.append(len(messages))
        if self.broken:
            raise RuntimeError("a bug in the sink")
        return [self.ack(m) for m in messages]


def test_attempt_skips_for_the_rest_of_a_flush_a_sink_that_failed() -> None:
    publisher = Publisher(PublishConfig(order=("kafka", "mqtt")), DEVICE)
    kafka = FakeSink("kafka", lambda m: m["version"] != 2)
    mqtt = FakeSink("mqtt", lambda _m: True)
    publisher.sinks = [kafka, mqtt]
    deliver = publisher.attempt()
    batch = [result(i) for i in range(3)]  # versions 1, 2, 3
    assert deliver(batch) == ["kafka", "mqtt", "kafka"]
    assert deliver(batch) == ["mqtt"] * 3  # kafka failed one: not tried again
    assert (kafka.calls, mqtt.calls) == ([3], [1, 3])
    assert publisher.attempt()(batch) == ["kafka", "mqtt", "kafka"]  # the next flush tries it

    kafka.broken = True
    deliver = publisher.attempt()
    assert deliver(batch) == ["mqtt"] * 3  # a raising sink counts as failed
    kafka.broken = False
    assert deliver(batch) == ["mqtt"] * 3
    assert kafka.calls == [3, 3, 3]


def test_an_outage_is_said_once_an_hour_and_again_after_a_delivery(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker down for a day is not two journal lines a check: each kind of failure is a
    warning when it starts, when REMIND has passed and once the sink delivered between."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = MqttConfig(host="127.0.0.1", port=closed, topic=MQTT_TOPIC, timeout=TIMEOUT)
    publisher = Publisher(PublishConfig(order=("mqtt",), mqtt=down), DEVICE)
    (sink,) = publisher.sinks

    def attempts(n: int) -> list[int]:
        """The levels of what n flushes said."""
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="smocsd.publish"):
            for _ in range(n):
                publisher.attempt()([result()])
        return [r.levelno for r in caplog.records if "not delivered" in r.getMessage()]

    assert attempts(3) == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    sink.cfg = MqttConfig(host="127.0.0.1", port=mosquitto.port, topic=MQTT_TOPIC, timeout=TIMEOUT)
    assert publisher.attempt()([result()]) == ["mqtt"]
    sink.cfg = down
    assert attempts(2) == [logging.WARNING, logging.DEBUG]  # said again after a delivery
    monkeypatch.setattr(publish, "REMIND", 0.0)
    assert attempts(2) == [logging.WARNING, logging.WARNING]  # and once REMIND has passed


def test_mqtt_topic_paho_refuses_fails_that_result_only(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored result whose device_id makes a wildcard topic does not hold back the
    others, nor make them wait for the timeout."""
    cfg = PublishConfig(
        order=("mqtt",),
        mqtt=MqttConfig(host="127.0.0.1", port=mosquitto.port, topic=MQTT_TOPIC, timeout=10),
    )
    bad = {**result(1), "device_id": "gw/+"}
    messages = [result(0), bad, result(2)]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="smocsd.publish"):
        assert Publisher(cfg, DEVICE).attempt()(messages) == ["mqtt", None, "mqtt"]
    assert time.monotonic() - started < 5
    [line] = caplog.records
    assert line.levelno == logging.ERROR
    assert (
        bad["message_id"] in line.getMessage()
        and "smocsd/gw/+/training-results" in line.getMessage()
    )


# ---------------------------------------------------------------- the MQTT topic's placeholders


MODEL_TOPICS = MqttConfig(
    topic="smocsd/{device_id}/{model}/training-results",
    alarm_topic="plant/{model}/alarms/{device_id}",
    label_topic="{model}",
)


def alarm() -> dict:
    """An alarm event as smocsd/app/live.py sends it (smocsd.alarm/1)."""
    return {
        "schema": ALARM_SCHEMA,
        "message_id": str(uuid.uuid4()),
        "event_id": str(uuid.uuid4()),
        "state": "closed",
        "device_id": DEVICE,
        "model": "autoencoder",
        "version": 3,
        "start": {"order": 18231, "time": 1764305520.0},
        "end": {"order": 18262, "time": None},
        "peak_score": 4.71,
        "threshold": 0.38,
        "channels": [{"name": "vibration", "share": 0.91}],
        "timestamp": "2026-11-28T05:00:00Z",
    }


def label() -> dict:
    """A label message as smocsd/common/labels.py sends it (smocsd.label/1)."""
    return {**schemacheck.label(), "message_id": str(uuid.uuid4()), "device_id": DEVICE}


def test_mqtt_topic_fills_device_id_and_model_from_the_message() -> None:
    message = {**result(), "device_id": "gw-9", "model": "pumps@P-1"}
    alarm, label = {**message, "schema": ALARM_SCHEMA}, {**message, "schema": LABEL_SCHEMA}
    assert mqtt_topic(MODEL_TOPICS, message) == "smocsd/gw-9/pumps@P-1/training-results"
    assert mqtt_topic(MODEL_TOPICS, alarm) == "plant/pumps@P-1/alarms/gw-9"
    assert mqtt_topic(MODEL_TOPICS, label) == "pumps@P-1"
    # The defaults name no model: existing subscribers keep their topics.
    defaults = MqttConfig()
    assert mqtt_topic(defaults, message) == "smocsd/gw-9/training-results"
    assert mqtt_topic(defaults, alarm) == "smocsd/gw-9/alarms"
    assert mqtt_topic(defaults, label) == "smocsd/gw-9/labels"


def test_mqtt_topic_takes_braces_of_a_stored_message_as_text() -> None:
    """The values come from stored messages: one naming a placeholder is not filled in
    again (one pass)."""
    message = {**result(), "device_id": "{model}", "model": "{device_id}"}
    assert mqtt_topic(MODEL_TOPICS, message) == "smocsd/{model}/{device_id}/training-results"


def _partition_values() -> list[str]:
    """Values partition_value accepts among candidates: every character of the BMP's first
    part alone and between letters, and random strings (seeded) of the characters a value
    may hold with now and then one it may not."""
    rng = random.Random(20261204)
    allowed = "aZ09._-"
    awkward = "@/+#$ \t\n\x00\x7f\u0085\u2028é{}%*?"
    candidates: list[object] = [chr(c) for c in range(0x3000)]
    candidates += ["a" + chr(c) + "b" for c in range(0x3000)]
    for _ in range(20000):
        text = rng.choices(allowed, k=rng.randint(1, 70))
        if rng.random() < 0.5:
            text[rng.randrange(len(text))] = rng.choice(awkward)
        candidates.append("".join(text))
    candidates += [0, 7, 2**63 - 1, "P-1", "x" * 64]
    values = []
    for raw in candidates:
        try:
            values.append(partition_value(raw))
        except ValueError:
            continue
    return values


def test_a_partition_models_name_is_one_topic_level_without_wildcards() -> None:
    """A model named `<name>@<value>` fills `{model}` with one level, never '+', '#' or '/'
    (which would make paho refuse the topic, or move the message to another one)."""
    definition = parse("[model]\nname = 'pumps'\n[source]\npartition_column = 'asset'", env={})
    values = _partition_values()
    assert len(values) > 1000 and "P-1" in values and "9223372036854775807" in values
    for value in values:
        name = definition.for_partition(value).model.name
        assert name == f"pumps@{value}"
        topic = mqtt_topic(MODEL_TOPICS, {**result(), "model": name})
        assert topic.split("/") == ["smocsd", DEVICE, name, "training-results"], topic
        assert not set(name) & set("+#/") and name.isascii() and name.isprintable()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "names",
    [
        pytest.param(("pumps", "motors", "line_a"), id="model-tables"),
        pytest.param(("pumps@P-1", "motors@7", "line_a@x_y.z-1"), id="partitions"),
    ],
)
def test_mqtt_topics_naming_the_model_reach_their_subscribers(
    mosquitto: Mosquitto, names: tuple[str, str, str]
) -> None:
    """Results, alarm events and labels each arrive on their model's topic level at a
    real broker; the subscriber of one model's level gets that model's alone."""
    cfg = PublishConfig(
        order=("mqtt",),
        mqtt=MqttConfig(
            host="127.0.0.1",
            port=mosquitto.port,
            topic=MODEL_TOPICS.topic,
            alarm_topic=MODEL_TOPICS.alarm_topic,
            label_topic="smocsd/{device_id}/{model}/labels",
            timeout=10,
        ),
    )
    first, second, third = names
    messages = [
        {**result(0), "model": first},
        {**alarm(), "model": second},
        {**label(), "model": third},
        result(3),
    ]
    with (
        mosquitto.subscriber(f"smocsd/+/{first}/#") as one,
        mosquitto.subscriber("#") as every,
    ):
        assert Publisher(cfg, DEVICE).attempt()(messages) == ["mqtt"] * 4
        got = every.messages(has_all(ids(messages)))
        assert [p for _t, p in one.messages(has_all(ids(messages[:1])))] == messages[:1]
    topics = {p["message_id"]: t for t, p in got}
    assert [topics[m["message_id"]] for m in messages] == [
        f"smocsd/{DEVICE}/{first}/training-results",
        f"plant/{second}/alarms/{DEVICE}",
        f"smocsd/{DEVICE}/{third}/labels",
        f"smocsd/{DEVICE}/autoencoder/training-results",
    ]
