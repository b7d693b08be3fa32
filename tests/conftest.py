"""Shared fixtures (the real servers of tests/services.py, a demo plant) and the two tiers.

Each server starts once per session on free loopback ports. The function-scoped
fixtures (`kafka`, `mosquitto`, `postgres`) make sure it is running when a test
begins, so a test may stop or restart it freely. A server that cannot be started
skips the tests that need it, except under CI (CI=true), where they fail.

Tiers: every test is marked `fast` or `slow`. Slow ones start a server, boot or unpack
into a container, build packages, install from PyPI or run the daemon for minutes;
`packaging/dev test -m fast` runs the rest, for a maintainer's edit-test loop. CI runs
both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import write_config
from schemacheck import check_received
from services import (
    CertificateAuthority,
    Kafka,
    Mosquitto,
    Postgres,
    Server,
    ServiceError,
)

from smocsd.data import demo

# Fixtures that start a real server, and modules that build packages, boot containers,
# install from PyPI or run the daemon for minutes: a test that uses one is `slow`.
SLOW_FIXTURES = frozenset(
    {
        "kafka",
        "mosquitto",
        "postgres",
        "kafka_server",
        "mosquitto_server",
        "postgres_server",
        "node_exporter",
    }
)
SLOW_MODULES = frozenset(
    {"test_systemd", "test_deb", "test_arm64", "test_source_install", "test_dev_run"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        slow = item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames)
        item.add_marker(pytest.mark.slow if slow else pytest.mark.fast)


@pytest.fixture(autouse=True)
def _received_messages_pass_their_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every message a test reads back from Kafka or Mosquitto passes the JSON Schema it
    names (tests/schemacheck.py)."""
    check_received(monkeypatch)


@pytest.fixture
def plant(tmp_path: Path) -> tuple[Path, Path]:
    """A state dir with 3000 demo rows and a FAST config file: (state dir, config path)."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    return state, write_config(tmp_path / "smocsd.toml", state)


def _unavailable(what: str, exc: Exception) -> None:
    reason = f"{what} unavailable: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _serve(what: str, make: Callable[[], Server]) -> Iterator[Server]:
    try:
        server = make()
        server.start()
    except ServiceError as exc:
        _unavailable(what, exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A throw-away CA (`ca_file`) and a server certificate for localhost/127.0.0.1."""
    try:
        return CertificateAuthority.create(tmp_path_factory.mktemp("ca"))
    except ServiceError as exc:
        _unavailable("test CA", exc)
        raise


@pytest.fixture(scope="session")
def kafka_server(
    tmp_path_factory: pytest.TempPathFactory, test_ca: CertificateAuthority
) -> Iterator[Kafka]:
    workdir: Path = tmp_path_factory.mktemp("kafka")
    yield from _serve("Kafka", lambda: Kafka(workdir, test_ca))  # type: ignore[misc]


@pytest.fixture(scope="session")
def mosquitto_server(
    tmp_path_factory: pytest.TempPathFactory, test_ca: CertificateAuthority
) -> Iterator[Mosquitto]:
    workdir: Path = tmp_path_factory.mktemp("mosquitto")
    yield from _serve("Mosquitto", lambda: Mosquitto(workdir, test_ca))  # type: ignore[misc]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    try:
        server = Postgres()
    except ServiceError as exc:
        _unavailable("PostgreSQL", exc)
    try:
        yield from _serve("PostgreSQL", lambda: server)  # type: ignore[misc]
    finally:
        server.remove()


@pytest.fixture
def kafka(kafka_server: Kafka) -> Kafka:
    """Kafka 4.x (KRaft), running: `bootstrap` (PLAINTEXT), `sasl_bootstrap` (SASL_SSL,
    SCRAM-SHA-256 or PLAIN as `username`/`password`, CA `test_ca.ca_file`),
    `messages(topic, until)` to read back, `stop()/start()/restart()`."""
    kafka_server.start()
    return kafka_server


@pytest.fixture
def mosquitto(mosquitto_server: Mosquitto) -> Mosquitto:
    """Mosquitto, running: anonymous `port`, TLS `tls_port` with `username`/`password`
    (CA `test_ca.ca_file`), `subscriber(topic)` to read back, `stop()/start()/restart()`."""
    mosquitto_server.start()
    return mosquitto_server


@pytest.fixture
def postgres(postgres_server: Postgres) -> Postgres:
    """PostgreSQL, running: `dsn` (no password in it) + `password` for role `user`, owner
    of database `dbname`; `connect()` as that user, `admin(*sql, dbname=...)` as superuser,
    `stop()/start()/restart()`."""
    postgres_server.start()
    return postgres_server
