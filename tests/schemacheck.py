"""Checks a document against the JSON Schema it names (smocsd/schemas): `validate()` is the
one place that does it. conftest makes every message a test reads back from the real
brokers pass through it; tests/test_schemas.py checks the schemas themselves."""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
import pytest
import services
from referencing import Registry, Resource

from smocsd import schemas


@cache
def _validators() -> dict[str, jsonschema.Draft202012Validator]:
    """A validator per schema name, all sharing one registry: the result's schema refers
    to the metadata's by its $id, as a consumer's validator would resolve it."""
    loaded = {name: schemas.load(name) for name in schemas.FILES}
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in loaded.values()
    )
    return {
        name: jsonschema.Draft202012Validator(schema, registry=registry)
        for name, schema in loaded.items()
    }


def problems(document: Any) -> list[str]:
    """Why `document` does not pass the schema it names, one line per violation ([]:
    it passes); a document naming no known schema is one problem."""
    name = schemas.name_of(document)
    validator = _validators().get(name or "")
    if validator is None:
        return [f"names no known schema ({name!r}; known: {', '.join(schemas.FILES)})"]
    return [
        f"{error.json_path}: {_shorten(error.message)}"
        for error in sorted(validator.iter_errors(document), key=lambda e: e.json_path)
    ]


def _shorten(text: str, keep: int = 200) -> str:
    """The message without the middle of a long instance (a whole metadata.json), keeping
    both ends: jsonschema says what is wrong after the instance, or before it."""
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


def validate(document: Any) -> None:
    """Fails the test unless `document` passes the schema it names ("schema" or "format")."""
    found = problems(document)
    which = document.get("message_id", "") if isinstance(document, dict) else ""
    assert not found, f"{schemas.name_of(document)} {which} breaks its schema:\n" + "\n".join(found)


def check_received(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every message a test reads back from the real brokers pass validate(): wraps
    services.Kafka.messages and services.MqttSubscriber.messages for this test."""
    read_kafka = services.Kafka.messages
    read_mqtt = services.MqttSubscriber.messages

    def kafka_messages(self: services.Kafka, *args: Any, **kwargs: Any) -> list[dict]:
        records = read_kafka(self, *args, **kwargs)
        for record in records:
            validate(record["value"])
        return records

    def mqtt_messages(self: services.MqttSubscriber, *args: Any, **kwargs: Any) -> list:
        received = read_mqtt(self, *args, **kwargs)
        for _topic, payload in received:
            validate(payload)
        return received

    monkeypatch.setattr(services.Kafka, "messages", kafka_messages)
    monkeypatch.setattr(services.MqttSubscriber, "messages", mqtt_messages)


def label() -> dict:
    """A label message as the contract shows it (smocsd.label/1): valid, for tests to vary."""
    return {
        "schema": "smocsd.label/1",
        "message_id": "5c1f0d9e-2b7a-4e63-9f08-7d3a1c6b4e21",
        "device_id": "gw-01",
        "model": "autoencoder",
        "action": "added",
        "label": {
            "id": 3,
            "kind": "accept",
            "first": 18231,
            "last": 18262,
            "reason": "bearing replaced",
            "by": "operator",
            "created_at": "2026-11-28T05:00:00Z",
        },
        "timestamp": "2026-11-28T05:00:01Z",
    }
