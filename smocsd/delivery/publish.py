"""Delivery of results to Kafka, falling back to MQTT.

A result counts as delivered only on the broker's acknowledgement: a Kafka delivery
report without error (acks=all), or an MQTT PUBACK. Each sink opens its connection for
one deliver() call and closes it afterwards, so nothing is left queued inside a client
library to be lost at exit, and every attempt is bounded by the sink's `timeout`. What
no sink acknowledged stays in the outbox for the next tick.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError, KafkaException, Producer

from smocsd.common.config import (
    ConfigError,
    KafkaConfig,
    MqttConfig,
    PublishConfig,
    fill_mqtt_topic,
    read_secret,
)
from smocsd.schemas import ALARM_SCHEMA, LABEL_SCHEMA

log = logging.getLogger("smocsd.publish")

# Kafka client errors that mean the credentials or the certificate were refused.
_KAFKA_REFUSED = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)


def topic_of(cfg: KafkaConfig | MqttConfig, message: dict) -> str:
    """Alarm events (smocsd/app/live.py) and labels (smocsd/common/labels.py) go to their own
    topics, training results to theirs."""
    schema = message.get("schema")
    if schema == ALARM_SCHEMA:
        return cfg.alarm_topic
    if schema == LABEL_SCHEMA:
        return cfg.label_topic
    return cfg.topic


def mqtt_topic(cfg: MqttConfig, message: dict) -> str:
    """The MQTT topic of `message`: its kind's topic with `{device_id}` and `{model}` filled
    in from the message itself (a stored result keeps the device and model it was made
    by). A model's name is one topic level: an identifier, or `<identifier>@<value>` whose
    value has no '/', '+' or '#' (config.partition_value)."""
    return fill_mqtt_topic(topic_of(cfg, message), str(message["device_id"]), str(message["model"]))


def _payload(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


# A failure a sink said at its level is said again at that level after this long while it
# lasts; meanwhile each check's repeat is a debug line. An outage at the default check
# interval would otherwise write two lines a minute, 2880 a day, to an SD card's journal.
REMIND = 3600.0


class Said:
    """A sink's failures as the journal gets them: each kind (level and format) at its
    level when it first happens, again every REMIND while it lasts, and once more after the
    sink has delivered again (see Publisher.attempt); the repeats in between at debug."""

    def __init__(self) -> None:
        self._at: dict[tuple[int, str], float] = {}  # a kind of failure -> when last said

    def log(self, level: int, fmt: str, *args: Any) -> None:
        now, kind = time.monotonic(), (level, fmt)
        if kind in self._at and now - self._at[kind] < REMIND:
            level = logging.DEBUG
        else:
            self._at[kind] = now
        log.log(level, fmt, *args)

    def delivered(self) -> None:
        self._at.clear()


class Sink(Protocol):
    name: str
    said: Said

    def send(self, messages: list[dict], should_stop: Callable[[], bool]) -> list[bool]:
        """Per message, whether the broker acknowledged it. Logs one line on failure.

        `should_stop` is called at least every _SLICE seconds while the attempt waits (it
        feeds the daemon's watchdog); when it returns True the attempt ends, unacknowledged
        messages stay in the outbox."""
        ...


# How long an attempt waits on a broker between calls of should_stop(). The unit's
# WatchdogSec=2min wants a ping every minute, and one attempt may wait `timeout`, up to
# 15 minutes: the attempt is sliced and pings, rather than being capped below
# WatchdogSec, which a drop-in can shorten and the configuration cannot see. A stop
# (TimeoutStopSec=30s) also ends a long attempt within a slice.
_SLICE = 0.1


class Publisher:
    """Sends results down `publish.order`; see attempt()."""

    def __init__(self, cfg: PublishConfig, device_id: str) -> None:
        sinks: dict[str, Sink] = {
            "kafka": KafkaSink(cfg.kafka, device_id),
            "mqtt": MqttSink(cfg.mqtt, device_id),
        }
        self.sinks = [sinks[name] for name in cfg.order]

    def attempt(
        self, should_stop: Callable[[], bool] = lambda: False
    ) -> Callable[[list[dict]], list[str | None]]:
        """A deliver function for one flush of the outbox: the fallback chain, which
        skips in later calls every sink that failed a message in an earlier one. A
        backlog with Kafka down so costs one Kafka timeout, not one per batch, and MQTT
        takes the rest; the next flush tries every sink again. Each sink's wait calls
        `should_stop` (see Sink.send); once it is True no further sink is tried."""
        failed: set[str] = set()

        def deliver(messages: list[dict]) -> list[str | None]:
            """Per message (oldest first), the name of the sink that acknowledged it, or
            None if none did.

            Each sink is tried once per call, with every message the sinks before it did
            not take, so an outage costs one bounded attempt, not one per message. Never
            raises: an undelivered result simply stays in the outbox.
            """
            taken: list[str | None] = [None] * len(messages)
            for sink in self.sinks:
                todo = [i for i, name in enumerate(taken) if name is None]
                if not todo or should_stop():
                    break
                if sink.name in failed:
                    log.debug("%s: not tried again in this flush", sink.name)
                    continue
                try:
                    acked = sink.send([messages[i] for i in todo], should_stop)
                except ConfigError as exc:  # an unreadable or unsafe secret file
                    sink.said.log(logging.ERROR, "%s: not sending: %s", sink.name, exc)
                    acked = [False] * len(todo)
                except Exception:
                    log.exception("%s: unexpected error while sending", sink.name)
                    acked = [False] * len(todo)
                if not all(acked):
                    failed.add(sink.name)
                elif acked:
                    sink.said.delivered()
                for i, ok in zip(todo, acked, strict=True):
                    if ok:
                        taken[i] = sink.name
            return taken

        return deliver


# ---------------------------------------------------------------------------- Kafka


class _DebugLog:
    """librdkafka's own log lines, demoted to DEBUG: the sink reports failures itself,
    in one line per attempt, instead of librdkafka's line per reconnect."""

    _log = logging.getLogger("smocsd.publish.librdkafka")

    def log(self, _level: int, msg: str, *args: Any) -> None:
        self._log.debug(msg, *args)


class KafkaSink:
    """An idempotent, acks=all producer per attempt; a message is delivered when its
    delivery report says so, and whatever is still queued at the deadline is purged."""

    name = "kafka"

    def __init__(self, cfg: KafkaConfig, device_id: str) -> None:
        self.cfg = cfg
        self.client_id = f"smocsd-{device_id}"
        self.said = Said()

    def _config(self, on_error: Any) -> dict[str, Any]:
        timeout_ms = max(1, int(self.cfg.timeout * 1000))
        conf: dict[str, Any] = {
            "bootstrap.servers": self.cfg.bootstrap_servers,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 5,
            "message.timeout.ms": timeout_ms,
            "request.timeout.ms": timeout_ms,
            "socket.connection.setup.timeout.ms": max(1000, timeout_ms),  # its minimum
            "error_cb": on_error,
            "logger": _DebugLog(),
        }
        cfg = self.cfg
        if cfg.security_protocol:
            conf["security.protocol"] = cfg.security_protocol
        if cfg.ssl_ca_location:
            conf["ssl.ca.location"] = str(cfg.ssl_ca_location)
        if cfg.sasl_mechanism:
            conf["sasl.mechanism"] = cfg.sasl_mechanism
        if cfg.sasl_username:
            conf["sasl.username"] = cfg.sasl_username
        password = read_secret(cfg.sasl_password_file, "kafka-password")
        if password is not None:
            conf["sasl.password"] = password
        return conf

    def send(self, messages: list[dict], should_stop: Callable[[], bool]) -> list[bool]:
        client_errors: list[KafkaError] = []
        report_errors: list[KafkaError] = []
        acked = [False] * len(messages)

        def on_delivery(i: int) -> Any:
            def report(err: KafkaError | None, _msg: object) -> None:
                if err is None:
                    acked[i] = True
                else:
                    report_errors.append(err)

            return report

        deadline = time.monotonic() + self.cfg.timeout
        try:
            producer = Producer(self._config(client_errors.append))
        except KafkaException as exc:  # e.g. an unreadable ssl_ca_location
            self.said.log(
                logging.ERROR,
                "kafka %s: cannot create a producer: %s",
                self.cfg.bootstrap_servers,
                exc.args[0].str(),
            )
            return acked
        for i, message in enumerate(messages):
            try:
                producer.produce(
                    topic_of(self.cfg, message),
                    value=_payload(message),
                    key=f"{message['device_id']}/{message['model']}".encode(),
                    on_delivery=on_delivery(i),
                )
            except KafkaException as exc:  # e.g. too large: the others still go
                report_errors.append(exc.args[0])
            except BufferError as exc:  # the local queue is full: the rest waits for a tick
                report_errors.append(KafkaError(KafkaError._QUEUE_FULL, str(exc)))
        stopped = False
        # A broker that accepts connections and never answers holds the attempt for the
        # whole timeout: sliced, so that should_stop() feeds the watchdog meanwhile.
        while producer.flush(_SLICE) > 0 and time.monotonic() < deadline:
            if _hopeless(client_errors):
                break
            if should_stop():
                stopped = True
                break
        producer.purge()  # nothing may linger and be sent after we gave up on it
        producer.flush(1.0)  # serves the purged messages' reports
        if not all(acked):
            self._log_failure(acked, client_errors + report_errors, stopped)
        return acked

    def _log_failure(self, acked: list[bool], errors: list[KafkaError], stopped: bool) -> None:
        refused = [e for e in errors if e.code() in _KAFKA_REFUSED]
        if stopped and not refused:  # the purge's reports would only say "Purged in queue"
            reason = "stopping before a delivery report"
        else:
            reason = (refused or errors)[0].str() if errors else "no delivery report in time"
        self.said.log(
            logging.ERROR if refused else logging.WARNING,
            "kafka %s %s: %d of %d result(s) not delivered: %s",
            self.cfg.bootstrap_servers,
            "refused the client" if refused else "unreachable or failing",
            acked.count(False),
            len(acked),
            reason,
        )


def _hopeless(errors: list[KafkaError]) -> bool:
    """Whether waiting longer in this attempt cannot help: refused credentials, a fatal
    producer error, or no broker reachable. librdkafka reports all brokers down after
    the first failed address of a host (e.g. ::1 of localhost, before 127.0.0.1), so
    that takes a few failed connection attempts as well (about 0.2 s of backoff)."""
    codes = [e.code() for e in errors]
    return any(e.fatal() or e.code() in _KAFKA_REFUSED for e in errors) or (
        KafkaError._ALL_BROKERS_DOWN in codes and codes.count(KafkaError._TRANSPORT) >= 3
    )


# ---------------------------------------------------------------------------- MQTT


class _State(Enum):
    """Where one MQTT session stands. Each way it can end short of acknowledging every
    result is one log line saying which."""

    CONNECTING = "connecting"  # TCP (and TLS) up, CONNECT sent, no CONNACK yet
    CONNECTED = "connected"  # CONNACK accepted: publishing, waiting for PUBACKs
    REFUSED = "refused"  # CONNACK refused (credentials, ACL): paho closes the connection
    LOST = "lost"  # the connection ended under us; nothing more can be acknowledged
    CLOSING = "closing"  # we sent DISCONNECT: its end is not a loss


class _Session:
    """paho's callbacks for one attempt. They run in paho's network thread (loop_start),
    so the state is published with an Event the sending thread waits on."""

    def __init__(self) -> None:
        self.state = _State.CONNECTING
        self.reason: Any = None  # the CONNACK's or the disconnect's reason code
        self.changed = threading.Event()  # set at every change of state
        self.ended = threading.Event()  # the connection is closed: paho's thread is ending
        self._lock = threading.Lock()

    def _move(self, state: _State, reason: Any, *, unless: tuple[_State, ...] = ()) -> None:
        with self._lock:
            if self.state not in unless:
                self.state, self.reason = state, reason
        self.changed.set()

    def on_connect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._move(_State.REFUSED if reason.is_failure else _State.CONNECTED, reason)

    def on_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        # A refusal is followed by paho closing the connection: still a refusal.
        self._move(_State.LOST, reason, unless=(_State.REFUSED, _State.CLOSING))
        self.ended.set()

    def closing(self) -> None:
        self._move(_State.CLOSING, None)

    def wait_for_connack(self, deadline: float, should_stop: Callable[[], bool]) -> _State:
        """The state once the broker answered the CONNECT, the connection ended, or the
        deadline passed or should_stop() said so (still CONNECTING)."""
        while self.state is _State.CONNECTING:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or should_stop():
                break
            self.changed.wait(min(remaining, _SLICE))
            self.changed.clear()
        return self.state


# How often a wait for PUBACKs looks whether the connection is gone: paho leaves a lost
# message's info unpublished (it would resend it after a reconnect, which this sink does
# not make), so without a look the wait would last until the deadline.
_LOSS_CHECK = 0.25
# After the deadline, how long the DISCONNECT may take before the socket is shut down: a
# broker that stopped reading never takes it, and loop_stop() waits for paho's thread.
_CLOSE_GRACE = 1.0
# The longest TCP connect or TLS handshake: paho does them in the calling thread, in one
# blocking call. Half a watchdog period (60 s), and far beyond any network that works.
_CONNECT_MAX = 30.0


class MqttSink:
    """One MQTT session per attempt: connect (TLS, username/password), publish with the
    configured QoS, wait for the PUBACKs until the deadline, disconnect.

    paho's own network thread (loop_start/loop_stop) drives the connection, and each
    result's MQTTMessageInfo.wait_for_publish() waits for its PUBACK (QoS 1): a result
    counts as delivered only once the broker has it. The client never reconnects
    (reconnect_on_failure=False): a lost connection ends the attempt, and the outbox
    retries at the next tick, so the attempt stays bounded by `timeout` (plus at most
    _CLOSE_GRACE to close), also when the daemon is being stopped.
    """

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, device_id: str) -> None:
        self.cfg = cfg
        self.client_id = f"smocsd-{device_id}"  # stable, so broker logs and ACLs can name it
        self.said = Said()

    def _client(self, session: _Session) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        password = read_secret(self.cfg.password_file, "mqtt-password")
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, password)
        if self.cfg.tls:
            client.tls_set(ca_certs=str(self.cfg.ca_file) if self.cfg.ca_file else None)
        # TCP connect and TLS handshake. They block this thread, which cannot feed the
        # watchdog meanwhile (see _SLICE): at most _CONNECT_MAX of the attempt's timeout.
        client.connect_timeout = min(self.cfg.timeout, _CONNECT_MAX)
        client.on_connect = session.on_connect
        client.on_disconnect = session.on_disconnect
        return client

    def send(self, messages: list[dict], should_stop: Callable[[], bool]) -> list[bool]:
        cfg = self.cfg
        where = f"{cfg.host}:{cfg.port}"
        deadline = time.monotonic() + cfg.timeout
        session = _Session()
        try:
            client = self._client(session)
        except (OSError, ValueError) as exc:  # ca_file missing or not a certificate
            self.said.log(
                logging.ERROR,
                "mqtt %s: cannot set up TLS with ca_file %s: %s",
                where,
                cfg.ca_file,
                exc,
            )
            return [False] * len(messages)
        # connect() in this thread, not connect_async(): a refused TCP connection or a TLS
        # handshake failure is an exception here, which says what went wrong, where the
        # network thread would only report that the connection failed.
        try:
            client.connect(cfg.host, cfg.port, keepalive=max(10, int(cfg.timeout) * 2))
        except ssl.SSLError as exc:  # an untrusted or mismatched certificate: fix the config
            self.said.log(
                logging.ERROR,
                "mqtt %s TLS handshake failed: %d result(s) not delivered: %s",
                where,
                len(messages),
                exc,
            )
            return [False] * len(messages)
        except OSError as exc:
            self.said.log(
                logging.WARNING,
                "mqtt %s unreachable: %d result(s) not delivered: %s",
                where,
                len(messages),
                exc,
            )
            return [False] * len(messages)
        client.loop_start()
        try:
            return self._deliver(client, session, messages, where, deadline, should_stop)
        finally:
            _close(client, session)

    def _deliver(
        self,
        client: mqtt.Client,
        session: _Session,
        messages: list[dict],
        where: str,
        deadline: float,
        should_stop: Callable[[], bool],
    ) -> list[bool]:
        """Publishes once the broker accepted the session (paho does not support queuing
        before the CONNACK), then waits for the acknowledgements until `deadline`."""
        state = session.wait_for_connack(deadline, should_stop)
        if state is not _State.CONNECTED:
            if state is _State.REFUSED:
                level, what, why = logging.ERROR, "refused the connection", str(session.reason)
            elif state is _State.LOST:
                level, what = logging.WARNING, "did not answer"
                why = f"the connection closed before CONNACK ({session.reason})"
            else:
                level, what = logging.WARNING, "did not answer"
                late = time.monotonic() >= deadline
                why = "no CONNACK before the timeout" if late else "stopping before a CONNACK"
            # `what` in the format: a refusal after a silence is another kind of failure
            self.said.log(
                level, f"mqtt %s {what}: %d result(s) not delivered: %s", where, len(messages), why
            )
            return [False] * len(messages)
        infos = [self._publish(client, m, where) for m in messages]
        for info in infos:
            while info is not None and not _published(info):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or session.state is not _State.CONNECTED or should_stop():
                    break
                try:
                    info.wait_for_publish(min(remaining, _LOSS_CHECK))
                except (RuntimeError, ValueError):  # paho's way to say it was never sent
                    break
        acked = [info is not None and _published(info) for info in infos]
        unacked = sum(info is not None and not ok for info, ok in zip(infos, acked, strict=True))
        if unacked:
            lost = session.state is _State.LOST
            self.said.log(
                logging.WARNING,
                "mqtt %s: %d of %d result(s) not acknowledged: %s",
                where,
                unacked,
                len(acked),
                f"connection lost ({session.reason})" if lost else "no PUBACK before the timeout",
            )
        return acked

    def _publish(
        self, client: mqtt.Client, message: dict, where: str
    ) -> mqtt.MQTTMessageInfo | None:
        """Queues `message` on its device's and model's topic; None, logged, if paho refuses
        it. The device_id and the model come from the stored result, out of reach of the
        config's checks, and one such result must not fail the others of the call."""
        topic = mqtt_topic(self.cfg, message)
        try:
            return client.publish(topic, _payload(message), qos=self.cfg.qos)
        except ValueError as exc:  # a wildcard (+, #) in the topic, empty, or too long
            log.error(
                "mqtt %s: result %s not sent to topic %r: %s",
                where,
                message["message_id"],
                topic,
                exc,
            )
            return None


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged (QoS 1: PUBACK) the message behind `info`."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):  # paho's way to say it was never queued
        return False


def _close(client: mqtt.Client, session: _Session) -> None:
    """Ends the session and paho's network thread, within _CLOSE_GRACE.

    loop_stop() joins the thread, which goes on while the connection is open and results
    are unacknowledged; DISCONNECT closes it once written. A broker that stopped reading
    never takes the DISCONNECT (the send buffer is full), so after the grace the socket
    is shut down: paho's loop then sees the connection end and its thread returns.
    """
    session.closing()
    client.disconnect()
    if not session.ended.wait(_CLOSE_GRACE):
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                # socket.socket's own shutdown: SSLSocket's would also tear down its TLS
                # state, under paho's thread, which may be using it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
    client.loop_stop()
