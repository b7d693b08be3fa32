"""A training result from `smocsd train-once` to a real consumer, through every fallback."""

from __future__ import annotations

import json
import socket

import pytest
from helpers import smocsd, write_config

from smocsd.data import demo


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gateway(tmp_path, kafka, mosquitto):
    """A demo database and a config publishing to the test Kafka, then Mosquitto."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    topic = f"results-{tmp_path.name}"

    def configure(kafka_port: int | None = None, mqtt_port: int | None = None):
        return write_config(
            tmp_path / "c.toml",
            state,
            publish={"order": ["kafka", "mqtt"]},
            **{
                "publish.kafka": {
                    "bootstrap_servers": f"127.0.0.1:{kafka_port or kafka.port}",
                    "topic": topic,
                    "label_topic": f"labels-{tmp_path.name}",
                    "timeout": "5s",
                },
                "publish.mqtt": {
                    "host": "127.0.0.1",
                    "port": mqtt_port or mosquitto.port,
                    "label_topic": f"smocsd/{{device_id}}/labels-{tmp_path.name}",
                    "timeout": "5s",
                },
            },
        )

    return configure, topic


def test_train_once_publishes_to_kafka_with_key_and_schema(gateway, kafka):
    configure, topic = gateway
    cfg = configure()
    result = json.loads(smocsd("train-once", config=cfg, check=True).stdout)
    records = kafka.messages(topic, until=lambda r: len(r) >= 1)
    assert records == [{"key": "gw-test/autoencoder", "value": result}]
    assert json.loads(smocsd("outbox", "list", "--json", config=cfg).stdout) == []


def test_kafka_down_mqtt_then_outbox_then_flush(gateway, kafka, mosquitto):
    configure, topic = gateway
    cfg = configure(kafka_port=closed_port())
    with mosquitto.subscriber("smocsd/gw-test/training-results") as sub:
        first = json.loads(smocsd("train-once", config=cfg, check=True).stdout)
        got = sub.messages(until=lambda m: len(m) >= 1)
    assert [payload for _, payload in got] == [first]

    cfg = configure(kafka_port=closed_port(), mqtt_port=closed_port())
    second = json.loads(smocsd("train-once", "--force", config=cfg, check=True).stdout)
    waiting = json.loads(smocsd("outbox", "list", "--json", config=cfg).stdout)
    assert [m["message_id"] for m in waiting] == [second["message_id"]]
    status = json.loads(smocsd("status", "--json", config=cfg).stdout)
    assert status["outbox_depth"] == 1
    assert smocsd("outbox", "flush", config=cfg).returncode == 1  # still nowhere to go

    cfg = configure()
    flushed = smocsd("outbox", "flush", config=cfg, check=True)
    assert "delivered 1, 0 waiting" in flushed.stdout
    records = kafka.messages(topic, until=lambda r: len(r) >= 1)
    assert [r["value"]["message_id"] for r in records] == [second["message_id"]]


def test_labels_reach_kafka_and_mqtt_on_their_own_topics(gateway, tmp_path, kafka, mosquitto):
    """`smocsd exclude` and `smocsd labels remove` queue smocsd.label/1 messages, which go
    to publish.kafka.label_topic, or publish.mqtt.label_topic when Kafka is down."""
    configure, _ = gateway
    topic = f"labels-{tmp_path.name}"  # the gateway's label topics

    cfg = configure()
    smocsd("exclude", "--from", "10", "--to", "20", config=cfg, check=True)
    (added,) = json.loads(smocsd("outbox", "list", "--json", config=cfg, check=True).stdout)
    assert (added["schema"], added["action"]) == ("smocsd.label/1", "added")
    assert "delivered 1, 0 waiting" in smocsd("outbox", "flush", config=cfg, check=True).stdout
    records = kafka.messages(topic, until=lambda r: len(r) >= 1)
    assert records == [{"key": "gw-test/autoencoder", "value": added}]

    cfg = configure(kafka_port=closed_port())
    with mosquitto.subscriber(f"smocsd/gw-test/{topic}") as sub:
        smocsd("labels", "remove", "1", config=cfg, check=True)
        (removed,) = json.loads(smocsd("outbox", "list", "--json", config=cfg, check=True).stdout)
        assert "delivered 1, 0 waiting" in smocsd("outbox", "flush", config=cfg).stdout
        got = sub.messages(until=lambda m: len(m) >= 1)
    assert got == [(f"smocsd/gw-test/{topic}", removed)]
    assert (removed["action"], removed["label"]) == ("removed", added["label"])
