"""Real servers for the tests: Apache Kafka (KRaft), Mosquitto, PostgreSQL and
Prometheus' node_exporter.

Each runs as a child process on free loopback ports with its data in a private
directory, so tests can stop, start and restart it and find the same ports and data
again. `tests/provision` installs the Debian packages and caches the Kafka jars; a
server that cannot be started raises ServiceError, which the fixtures turn into a
skip (or a failure under CI).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KAFKA_VERSION = os.environ.get("SMOCSD_KAFKA_VERSION", "4.1.1")
CACHE = Path(os.environ.get("SMOCSD_TEST_CACHE", Path.home() / ".cache" / "smocsd-tests"))


class ServiceError(RuntimeError):
    """A test server could not be started; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _run(cmd: list[str], cwd: Path | None = None, user: str | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, user=user, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(cmd[:3])}... failed: {(proc.stderr or proc.stdout)[-2000:]}")


@dataclass(frozen=True)
class CertificateAuthority:
    """A throw-away CA and one server certificate for 127.0.0.1/localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    p12_file: Path  # the server key and certificate for Java
    p12_password: str

    @classmethod
    def create(cls, directory: Path) -> CertificateAuthority:
        if shutil.which("openssl") is None:
            raise ServiceError("openssl not found (run tests/provision)")
        directory.mkdir(parents=True, exist_ok=True)
        d = directory
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _run(
            [
                "openssl",
                "req",
                "-x509",
                *ec,
                "-keyout",
                str(d / "ca.key"),
                "-out",
                str(d / "ca.crt"),
                "-days",
                "3",
                "-subj",
                "/CN=smocsd test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]
        )
        _run(
            [
                "openssl",
                "req",
                *ec,
                "-keyout",
                str(d / "server.key"),
                "-out",
                str(d / "server.csr"),
                "-subj",
                "/CN=localhost",
            ]
        )
        (d / "server.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid\n"
        )
        _run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(d / "server.csr"),
                "-CA",
                str(d / "ca.crt"),
                "-CAkey",
                str(d / "ca.key"),
                "-CAcreateserial",
                "-days",
                "3",
                "-extfile",
                str(d / "server.ext"),
                "-out",
                str(d / "server.crt"),
            ]
        )
        password = secrets.token_hex(8)
        _run(
            [
                "openssl",
                "pkcs12",
                "-export",
                "-in",
                str(d / "server.crt"),
                "-inkey",
                str(d / "server.key"),
                "-certfile",
                str(d / "ca.crt"),
                "-out",
                str(d / "server.p12"),
                "-passout",
                f"pass:{password}",
            ]
        )
        for f in d.iterdir():  # servers may drop privileges before reading them
            f.chmod(0o644)
        return cls(d / "ca.crt", d / "server.crt", d / "server.key", d / "server.p12", password)


class Server:
    """One server process that can be stopped and started again on the same ports/data."""

    name = "server"
    stop_signal = signal.SIGTERM
    start_timeout = 60.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_file = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what subclasses define
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def run_as(self) -> str | None:
        return None

    # -- lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (no-op when running) and wait until it serves requests."""
        if self.running:
            return
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self.run_as(),
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            if self._proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self._proc.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"{self.name} not ready after {self.start_timeout:.0f}s: {self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server cleanly (SIGKILL if it takes longer than `timeout`)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


# ---------------------------------------------------------------------------- Kafka


def kafka_lib() -> Path:
    lib = CACHE / f"kafka-{KAFKA_VERSION}" / "lib"
    if not (lib / ".complete").exists():
        raise ServiceError(f"Kafka {KAFKA_VERSION} jars not in {lib} (run tests/provision)")
    return lib


class Kafka(Server):
    """A single-node Kafka 4.x in KRaft mode with a PLAINTEXT listener and an
    authenticated, encrypted SASL_SSL one (SCRAM-SHA-256 and PLAIN, user `username`)."""

    name = "kafka"
    start_timeout = 120.0
    username = "smocsd"

    def __init__(self, workdir: Path, ca: CertificateAuthority) -> None:
        super().__init__(workdir)
        if shutil.which("java") is None:
            raise ServiceError("java not found (run tests/provision)")
        self.lib = kafka_lib()
        self.ca = ca
        self.password = secrets.token_hex(12)
        self.port, self.sasl_port, self.controller_port = free_port(), free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.sasl_bootstrap = f"localhost:{self.sasl_port}"
        self._write_config()
        cluster_id = ""
        while not cluster_id or cluster_id.startswith("-"):  # an id like a flag confuses argparse
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        with self.log_file.open("ab") as log:
            proc = subprocess.run(
                [
                    *self._java(),
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    "server.properties",
                    "--add-scram",
                    f"SCRAM-SHA-256=[name={self.username},password={self.password}]",
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0:
            raise ServiceError(f"kafka storage format failed: {self.log_tail()}")

    def _java(self) -> list[str]:
        # Small heap, quick JIT: a test broker serves a few thousand messages.
        return [
            "java",
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{self.lib}/*",
        ]

    def _write_config(self) -> None:
        plain_jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{self.username}="{self.password}";'
        )
        scram_jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        plaintext = f"127.0.0.1:{self.port}"
        controller = f"127.0.0.1:{self.controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{controller}",
            "listeners": f"PLAINTEXT://{plaintext},SASL_SSL://127.0.0.1:{self.sasl_port},"
            f"CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{plaintext},SASL_SSL://{self.sasl_bootstrap}",
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "sasl.enabled.mechanisms": "SCRAM-SHA-256,PLAIN",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram_jaas,
            "listener.name.sasl_ssl.plain.sasl.jaas.config": plain_jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.ca.p12_file),
            "ssl.keystore.password": self.ca.p12_password,
            "ssl.key.password": self.ca.p12_password,
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "log4j2.properties").write_text(
            "rootLogger.level = WARN\n"
            "rootLogger.appenderRef.out.ref = OUT\n"
            "appender.out.type = Console\n"
            "appender.out.name = OUT\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
        )
        (self.workdir / "server.properties").write_text(
            "".join(f"{k}={v}\n" for k, v in props.items())
        )

    def command(self) -> list[str]:
        return [*self._java(), "kafka.Kafka", "server.properties"]

    def ready(self) -> bool:
        """Ready when a produce round-trip succeeds, not merely when the port opens
        (after a restart the listener accepts before the partition leaders are back)."""
        if not port_open(self.port):
            return False
        from confluent_kafka import Producer

        acked: list[bool] = []
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "message.timeout.ms": 3000, "log_level": 0}
        )
        producer.produce(
            "smocsd-test-ready", b"ping", on_delivery=lambda err, _msg: acked.append(err is None)
        )
        producer.flush(5)
        return acked == [True]

    def messages(
        self, topic: str, until: Callable[[list[dict]], bool], timeout: float = 30.0
    ) -> list[dict]:
        """Read `topic` from the beginning until `until(records)` holds or `timeout`.

        Each record is {"key": str, "value": parsed JSON}; a real consumer, so what it
        returns is what the broker stored."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": uuid.uuid4().hex,
                "enable.auto.commit": False,
                "log_level": 0,
            }
        )
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        records: list[dict] = []
        deadline = time.monotonic() + timeout
        try:
            while not until(records) and time.monotonic() < deadline:
                for msg in consumer.consume(500, 0.5):
                    if msg.error() is None:
                        records.append(
                            {"key": msg.key().decode(), "value": json.loads(msg.value())}
                        )
        finally:
            consumer.close()
        return records


# ---------------------------------------------------------------------------- Mosquitto


class Mosquitto(Server):
    """Mosquitto with an anonymous plain listener (`port`) and a TLS listener
    (`tls_port`) that requires `username`/`password`; sessions persist across restarts."""

    name = "mosquitto"
    username = "smocsd"

    def __init__(self, workdir: Path, ca: CertificateAuthority) -> None:
        super().__init__(workdir)
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            raise ServiceError("mosquitto not found (run tests/provision)")
        self.ca = ca
        self.port, self.tls_port = free_port(), free_port()
        self.password = secrets.token_hex(12)
        workdir.mkdir(parents=True, exist_ok=True)
        passwd = workdir / "passwd"
        _run(["mosquitto_passwd", "-c", "-b", str(passwd), self.username, self.password])
        (workdir / "mosquitto.conf").write_text(f"""\
per_listener_settings true
user {pwd.getpwuid(os.geteuid()).pw_name}
persistence true
persistence_location {workdir}/
log_dest stdout
log_type error
log_type warning
log_type notice

listener {self.port} 127.0.0.1
allow_anonymous true

listener {self.tls_port} 127.0.0.1
allow_anonymous false
password_file {passwd}
cafile {ca.ca_file}
certfile {ca.cert_file}
keyfile {ca.key_file}
""")

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.workdir / "mosquitto.conf")]

    def ready(self) -> bool:
        return port_open(self.port) and port_open(self.tls_port)

    @contextlib.contextmanager
    def subscriber(self, topic: str) -> Iterator[MqttSubscriber]:
        sub = MqttSubscriber(self.port, topic)
        try:
            yield sub
        finally:
            sub.close()


class MqttSubscriber:
    """A real MQTT consumer with a persistent QoS 1 session, so messages published
    while it is reconnecting (e.g. across a broker restart) still reach it."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self._lock = threading.Lock()
        self._payloads: list[tuple[str, dict]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
            clean_session=False,
        )
        self._client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.2, 1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise ServiceError(f"MQTT subscriber could not subscribe to {topic}")

    def _on_message(self, _client: object, _userdata: object, msg: object) -> None:
        with self._lock:
            self._payloads.append((msg.topic, json.loads(msg.payload)))  # type: ignore[attr-defined]

    def messages(
        self, until: Callable[[list[tuple[str, dict]]], bool], timeout: float = 30.0
    ) -> list[tuple[str, dict]]:
        """(topic, payload) pairs received so far, waiting until `until` holds or `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self._payloads)
            if until(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# ---------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise ServiceError("no PostgreSQL server in /usr/lib/postgresql (run tests/provision)")
    return found[-1].parent


class Postgres(Server):
    """PostgreSQL with database `dbname` owned by role `user`, who must log in with
    `password` over TCP (scram-sha-256); `admin_dsn` is the trusted superuser over the
    Unix socket, for setting up tables."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: no waiting for clients to leave
    user = "smocsd"
    dbname = "plant"

    def __init__(self) -> None:
        # Not under pytest's tmp dir: that is 0700 root, and root may not run postgres.
        super().__init__(Path(tempfile.mkdtemp(prefix="smocsd-pg-")))
        self.bin = postgres_bin()
        self._os_user = "postgres" if os.geteuid() == 0 else None
        if self._os_user is not None:
            shutil.chown(self.workdir, self._os_user, self._os_user)
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.dsn = f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"
        self.admin_dsn = f"host={self.workdir} port={self.port} user=postgres dbname=postgres"
        data = self.workdir / "data"
        _run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            user=self._os_user,
        )
        (data / "pg_hba.conf").write_text(
            "local all postgres trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._created_db = False

    def start(self) -> None:
        super().start()
        if not self._created_db:
            self.admin(
                f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                f"CREATE DATABASE {self.dbname} OWNER {self.user}",
            )
            self._created_db = True

    def run_as(self) -> str | None:
        return self._os_user

    def command(self) -> list[str]:
        return [
            str(self.bin / "postgres"),
            "-D",
            str(self.workdir / "data"),
            "-p",
            str(self.port),
            "-k",
            str(self.workdir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ]

    def ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.admin_dsn, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def connect(self) -> Any:
        """A psycopg connection (autocommit) as `user`, the owner of `dbname`: the way to
        create and fill the tables a test reads."""
        import psycopg

        return psycopg.connect(self.dsn, password=self.password, autocommit=True)

    def admin(self, *statements: str, dbname: str = "postgres") -> None:
        """Run statements as the superuser (autocommit), e.g. to create tables."""
        import psycopg

        dsn = self.admin_dsn.replace("dbname=postgres", f"dbname={dbname}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------- node_exporter


# A sample line of the text format: name{labels} value (no timestamps here).
_SAMPLE = re.compile(r"(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _unescape(value: str) -> str:
    r"""A label value as the text format escapes it (\\, \", \n), read back."""
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


class NodeExporter(Server):
    """Debian's prometheus-node-exporter serving only its textfile collector, which reads
    the `*.prom` files of `textfile_dir`; `scrape()` reads back what it serves.

    As root it runs as Debian's `prometheus` user, as on a gateway, so a metrics file it
    may not read fails the test instead of passing as root."""

    name = "node-exporter"
    binary = "/usr/bin/prometheus-node-exporter"

    def __init__(self) -> None:
        if not Path(self.binary).exists():
            raise ServiceError(f"{self.binary} not found (run tests/provision)")
        # Not under pytest's tmp dir: that is 0700 root, closed to the prometheus user.
        super().__init__(Path(tempfile.mkdtemp(prefix="smocsd-node-exporter-")))
        self.workdir.chmod(0o755)
        self.textfile_dir = self.workdir / "textfile"
        self.textfile_dir.mkdir()
        self.textfile_dir.chmod(0o755)  # whatever the umask
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self._user: str | None = None
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                self._user = pwd.getpwnam("prometheus").pw_name  # made by the package

    def run_as(self) -> str | None:
        return self._user

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={self.textfile_dir}",
            "--web.disable-exporter-metrics",
        ]

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        with contextlib.suppress(OSError):
            self.text()
            return True
        return False

    def text(self) -> str:
        """One scrape of /metrics, as Prometheus would make it."""
        import urllib.request

        with urllib.request.urlopen(self.url, timeout=10) as response:
            return response.read().decode()

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """One scrape, parsed: metric name -> [(labels, value)]."""
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in self.text().splitlines():
            sample = _SAMPLE.fullmatch(line)
            if sample:
                labels = {k: _unescape(v) for k, v in _LABEL.findall(sample["labels"] or "")}
                samples.setdefault(sample["name"], []).append((labels, float(sample["value"])))
        return samples

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
