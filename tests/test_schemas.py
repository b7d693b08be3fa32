"""The JSON Schemas in smocsd/schemas: valid draft 2020-12 documents named by URNs, passed
by everything smocsd emits (results of each backend and of a user job, failed and recovered
results, alarm events, label messages, metadata.json) and failing what is wrong.

The helper that checks a document against the schema it names is tests/schemacheck.py;
conftest passes every message a test reads back from the real brokers through it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import insert, smocsd, write_config
from schemacheck import label, problems, validate

from smocsd import schemas
from smocsd.app.cycle import reconcile
from smocsd.app.live import LiveScorer
from smocsd.common import config
from smocsd.common.labels import By, Kind, Labels
from smocsd.common.labels import message as label_message
from smocsd.data import demo
from smocsd.delivery.outbox import Outbox
from smocsd.schemas import ALARM_SCHEMA, LABEL_SCHEMA, MODEL_FORMAT, RESULT_SCHEMA
from smocsd.training.trainers import ort_training_installed

# ---------------------------------------------------------------- the schema files


def schema_files() -> list[Path]:
    return sorted(schemas.DIRECTORY.glob("*.schema.json"))


def test_every_file_is_a_draft_2020_12_schema_named_by_a_urn() -> None:
    assert sorted(p.name for p in schema_files()) == sorted(schemas.FILES.values())
    for name, file in schemas.FILES.items():
        text = (schemas.DIRECTORY / file).read_text()
        schema = json.loads(text)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        kind, version = re.fullmatch(r"smocsd\.([a-z-]+)/(\d+)", name).groups()  # type: ignore[union-attr]
        assert schema["$id"] == f"urn:smocsd:schema:{kind}:{version}"
        assert file == f"{kind}-{version}.schema.json"
        # The field naming the schema is pinned to it.
        field = "format" if kind == "model" else "schema"
        assert schema["properties"][field] == {"const": name}
        assert field in schema["required"]
        # Only the dialect's own URI is a URL: the schemas link nothing outside the repo.
        assert re.findall(r"https?://[^\"]*", text) == [schema["$schema"]]
        assert schema["description"] and schema["title"]


def test_the_names_the_code_emits_have_a_schema() -> None:
    assert {RESULT_SCHEMA, ALARM_SCHEMA, LABEL_SCHEMA, MODEL_FORMAT} == set(schemas.FILES)


def test_shared_definitions_are_the_same_in_every_file() -> None:
    defs: dict[str, list[Any]] = {}
    for name in schemas.FILES:
        for key, value in schemas.load(name).get("$defs", {}).items():
            defs.setdefault(key, []).append(value)
    for key, values in defs.items():
        assert all(v == values[0] for v in values), f"$defs/{key} differs between files"
    assert len(defs["device_id"]) == 4 and len(defs["utc_time"]) == 4
    assert len(defs["model_name"]) == 3 and len(defs["outbox_dropped"]) == 3


def test_only_the_job_defined_parts_are_open() -> None:
    """The envelopes are closed; what TrainingJob hooks return is open to a user job's
    fields (and the built-in fields stay required where the built-in job wrote them)."""
    result, alarm, label, model = (
        schemas.load(n) for n in (RESULT_SCHEMA, ALARM_SCHEMA, LABEL_SCHEMA, MODEL_FORMAT)
    )
    for schema in (result, alarm, label, model, label["properties"]["label"]):
        assert schema["additionalProperties"] is False
    for hook_output in ("metrics", "eval", "model_meta"):
        assert "additionalProperties" not in result["properties"][hook_output]
    for hook_output in ("metrics", "eval"):
        assert "additionalProperties" not in model["properties"][hook_output]
        assert model["properties"][hook_output]["required"]


def test_name_of() -> None:
    assert schemas.name_of({"schema": "smocsd.alarm/1"}) == "smocsd.alarm/1"
    assert schemas.name_of({"format": "smocsd.model/1"}) == "smocsd.model/1"
    assert schemas.name_of({"outcome": "skipped", "reason": "x"}) is None
    assert schemas.name_of([]) is None
    with pytest.raises(KeyError, match="no schema named"):
        schemas.load("smocsd.alarm/2")


# ---------------------------------------------------------------- what smocsd emits passes


BACKENDS = [
    pytest.param(
        backend,
        marks=pytest.mark.skipif(
            backend == "ort" and not ort_training_installed(),
            reason="onnxruntime-training is not installed here",
        ),
    )
    for backend in ("ort", "numpy")
]


def versions(state: Path) -> list[Path]:
    return sorted((state / "models" / "autoencoder").glob("v[0-9]*"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_and_results_of_each_backend_pass(backend: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    path = write_config(tmp_path / "c.toml", state, training={"backend": backend})
    printed = [json.loads(smocsd("train-once", config=path, check=True).stdout)]
    # The second is warm-started and compared with the first: eval's previous_* are set.
    printed.append(json.loads(smocsd("train-once", "--force", config=path, check=True).stdout))
    metas = [json.loads((v / "metadata.json").read_text()) for v in versions(state)]
    assert [m["backend"] for m in metas] == [backend, backend]
    assert metas[1]["eval"]["previous_version"] == 1 and metas[1]["metrics"]["warm_started"]
    for meta in metas:
        validate(meta)
    outbox = Outbox(state / "outbox.db")
    stored = outbox.pending()
    outbox.close()
    assert [m["message_id"] for m in stored] == [m["message_id"] for m in printed]
    for message in printed + stored:
        validate(message)
        assert message["model_meta"]["format"] == "smocsd.model/1"  # checked by the $ref


def user_job(tmp_path: Path, **options: str) -> Path:
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    log = tmp_path / "hooks.jsonl"
    return write_config(
        tmp_path / "c.toml",
        state,
        training={"job": "userjob:RecordingJob"},
        job={"log": str(log), **options},
    )


def test_user_job_results_pass_with_their_own_fields(tmp_path: Path) -> None:
    """A user job's metrics, eval and model_meta are its own; a non-finite number it
    returns arrives as null."""
    path = user_job(tmp_path, fail="nan")
    result = json.loads(smocsd("train-once", config=path, check=True).stdout)
    assert result["metrics"] == {"n": 3000, "loss": None, "peak": None}
    assert result["model_meta"] == {"kind": "recording"} and result["version"] == 7
    validate(result)


def test_failed_and_recovered_results_pass(tmp_path: Path) -> None:
    path = user_job(tmp_path, fail="train")
    failed = json.loads(smocsd("train-once", config=path).stdout)
    assert failed["outcome"] == "failed" and "boom" in failed["error"]
    validate(failed)

    state = tmp_path / "state2"
    demo.write(state / "readings.db", 3000)
    path = write_config(tmp_path / "c2.toml", state)
    smocsd("train-once", config=path, check=True)
    for leftover in state.glob("outbox.db*"):  # the result was lost before the outbox
        leftover.unlink()
    outbox = Outbox(state / "outbox.db")
    assert reconcile(config.load(path), outbox) == 1
    [recovered] = outbox.pending()
    outbox.close()
    assert recovered["recovered"] is True
    validate(recovered)


def test_alarm_messages_pass(tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    path = write_config(tmp_path / "c.toml", state, scoring={"enabled": True, "close_after": 5})
    smocsd("train-once", config=path, check=True)
    outbox = Outbox(state / "outbox.db")
    [result] = outbox.pending()
    scorer = LiveScorer(config.load(path))
    try:
        scorer.step(outbox)  # scoring starts at the newest row
        for rows, factor in ((30, 1.0), (8, 6.0), (20, 1.0)):
            insert(state / "readings.db", rows, factor)
            scorer.step(outbox)
    finally:
        scorer.close()
    alarms = outbox.pending()[1:]
    outbox.close()
    assert [m["state"] for m in alarms] == ["open", "closed"], alarms
    assert alarms[0]["end"] is None and alarms[1]["end"]["order"] > 3030
    for message in [result, *alarms]:
        validate(message)


def test_label_messages_pass(tmp_path: Path) -> None:
    """Built by smocsd.common.labels.message from labels as labels.json keeps them, and as the
    commands queue them."""
    labels = Labels(tmp_path)
    made = [
        labels.add(Kind.ACCEPT, 18231, 18262, "bearing replaced"),
        labels.add(Kind.EXCLUDE, 120000, 121500),  # no --reason: ""
        labels.add(Kind.ACCEPT, 90000, 95000, "alarmed for 49.0 h", By.ACCEPT_AFTER),
    ]
    assert labels.read() == made
    for made_label in made:
        for action in ("added", "removed"):
            validate(label_message(made_label, action, "gw-01", "autoencoder"))

    state = tmp_path / "state"
    state.mkdir()
    path = write_config(tmp_path / "c.toml", state)
    smocsd(
        "exclude", "--from", "10", "--to", "20", "--reason", "calibration", config=path, check=True
    )
    smocsd("labels", "remove", "1", config=path, check=True)
    outbox = Outbox(state / "outbox.db")
    queued = outbox.pending()
    outbox.close()
    assert [(m["action"], m["label"]["kind"]) for m in queued] == [
        ("added", "exclude"),
        ("removed", "exclude"),
    ]
    for m in queued:
        validate(m)


# ---------------------------------------------------------------- and what is wrong fails


def alarm() -> dict:
    return {
        "schema": "smocsd.alarm/1",
        "message_id": "0b4e7c2a-9f1d-4c3b-8a5e-2d6f7e8a9b0c",
        "event_id": "6f1d3c2e-4b6a-5f0e-9a51-5d0c8e7b2a90",
        "state": "closed",
        "device_id": "gw-01",
        "model": "autoencoder",
        "version": 3,
        "start": {"order": 18231, "time": 1764305520.0},
        "end": {"order": 18262, "time": None},
        "peak_score": 4.71,
        "threshold": 0.38,
        "channels": [{"name": "vibration", "share": 0.91}, {"name": "Temp (°C)", "share": 0.06}],
        "timestamp": "2026-11-28T05:00:00Z",
    }


def result() -> dict:
    return {
        "schema": "smocsd.training-result/1",
        "message_id": "2d668c9a-3b6c-4d3a-a7da-2a4edbacea1d",
        "device_id": "gw-01",
        "model": "autoencoder",
        "version": 2,
        "outcome": "promoted",
        "timestamp": "2026-11-28T05:30:42Z",
        "metrics": {"val_loss": 0.5, "a_user_metric": [1, None]},
        "eval": {},
        "model_meta": {"anything": {"a user job": "writes"}},
    }


@pytest.fixture(scope="module")
def metadata(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real metadata.json (numpy backend)."""
    tmp = tmp_path_factory.mktemp("meta")
    state = tmp / "state"
    demo.write(state / "readings.db", 3000)
    path = write_config(tmp / "c.toml", state, training={"backend": "numpy"})
    smocsd("train-once", config=path, check=True)
    [version] = versions(state)
    yield json.loads((version / "metadata.json").read_text())


def broken(document: dict, change: str) -> dict:
    """A copy of `document` with `change` applied: "del a/b", or "a/b = <JSON>" (keys
    have dots: "model.onnx", "p99.9")."""
    doc = copy.deepcopy(document)
    target, _, value = change.partition(" = ")
    *parents, key = target.removeprefix("del ").split("/")
    parent = doc
    for p in parents:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    if change.startswith("del "):
        del parent[key]
    elif isinstance(parent, list):
        parent[int(key)] = json.loads(value)
    else:
        parent[key] = json.loads(value)
    return doc


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("del message_id", "'message_id' is a required property"),
        ("del model_meta", "'model_meta' is a required property"),
        ('outcome = "skipped"', "'skipped' is not one of"),
        ('outcome = "Promoted"', "is not one of"),
        ('version = "2"', "is not of type 'integer', 'null'"),
        ("version = 2.5", "is not of type 'integer', 'null'"),
        ("metrics = []", "is not of type 'object'"),
        ('schema = "smocsd.training-result/2"', "names no known schema"),
        ('timestamp = "2026-11-28 05:30:42"', "does not match"),
        ('device_id = "gw/01"', "does not match"),
        ('model = "pump-7"', "does not match"),
        ("extra = 1", "Additional properties are not allowed ('extra' was unexpected)"),
        ('error = "only on failed results"', "should not be valid"),
        ('outcome = "failed"', "'error' is a required property"),
        ("recovered = false", "True was expected"),
        ("outbox_dropped = 0", "less than the minimum of 1"),
        ('model_meta = {"format": "smocsd.model/1"}', "'threshold' is a required property"),
    ],
)
def test_result_schema_rejects(change: str, why: str) -> None:
    validate(result())
    found = problems(broken(result(), change))
    assert any(why in p for p in found), found


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("del event_id", "'event_id' is a required property"),
        ("del end", "'end' is a required property"),
        ('state = "opened"', "is not one of ['open', 'closed']"),
        ('state = "open"', "is not of type 'null'"),
        ("end = null", "is not of type 'object'"),
        ('peak_score = "4.71"', "is not of type 'number', 'null'"),
        ("threshold = null", "is not of type 'number'"),
        ("version = 0", "less than the minimum of 1"),
        ('start/order = "18231"', "is not of type 'integer'"),
        ("channels = []", "should be non-empty"),
        ("channels/0/share = 1.5", "greater than the maximum of 1"),
        ("channels/0/extra = 1", "Additional properties are not allowed"),
        ('event_id = "not-a-uuid"', "does not match"),
        ('metrics = {"n": 1}', "Additional properties are not allowed ('metrics' was unexpected)"),
    ],
)
def test_alarm_schema_rejects(change: str, why: str) -> None:
    validate(alarm())
    validate(broken(alarm(), 'state = "open"') | {"end": None})
    validate(broken(alarm(), "peak_score = null"))  # a score that was not finite
    found = problems(broken(alarm(), change))
    assert any(why in p for p in found), found


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ('label/kind = "maybe"', "'maybe' is not one of ['accept', 'exclude']"),
        ("del label/id", "'id' is a required property"),
        ("del label/reason", "'reason' is a required property"),
        ("del action", "'action' is a required property"),
        ('action = "changed"', "is not one of ['added', 'removed']"),
        ("label/id = 0", "less than the minimum of 1"),
        ('label/first = "18231"', "is not of type 'integer'"),
        ('label/by = "daemon"', "is not one of ['operator', 'accept_after']"),
        ('label/created_at = "yesterday"', "does not match"),
        ("label/extra = 1", "Additional properties are not allowed ('extra' was unexpected)"),
        ("version = 3", "Additional properties are not allowed ('version' was unexpected)"),
        ('device_id = "gw/01"', "does not match"),
        ('schema = "smocsd.label/2"', "names no known schema"),
    ],
)
def test_label_schema_rejects(change: str, why: str) -> None:
    validate(label())
    validate(broken(label(), 'label/reason = ""'))  # no --reason given
    found = problems(broken(label(), change))
    assert any(why in p for p in found), found


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("del threshold", "'threshold' is a required property"),
        ("del files/model.onnx", "'model.onnx' is a required property"),
        ('backend = "torch"', "is not one of ['ort', 'numpy']"),
        ('outcome = "failed"', "is not one of ['promoted', 'rejected']"),
        ('threshold = "0.5"', "is not of type 'number'"),
        ("threshold = null", "is not of type 'number'"),
        ("window_size = 1", "less than the minimum of 2"),
        ('result_id = "x"', "does not match"),
        ("extra = 1", "Additional properties are not allowed ('extra' was unexpected)"),
        ("normalization/scale/0 = 0", "less than or equal to the minimum of 0"),
        ("alarm/above = 0", "less than the minimum of 1"),
        ("eval/champion_problem = 3", "is not of type 'string', 'null'"),
        ("del eval/previous_version", "'previous_version' is a required property"),
        ('metrics/epochs_run = "4"', "is not of type 'integer'"),
        ("score_quantiles/validation = {}", "'p50' is a required property"),
        ('files/metadata.json = {"sha256": "", "bytes": 1}', "does not match"),
    ],
)
def test_metadata_schema_rejects(metadata: dict, change: str, why: str) -> None:
    validate(metadata)
    # metrics and eval are hook outputs a subclass of the built-in job may extend.
    validate(broken(broken(metadata, "metrics/user = 1"), 'eval/user = "x"'))
    found = problems(broken(metadata, change))
    assert any(why in p for p in found), found
