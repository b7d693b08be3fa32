"""metadata.json as the typed ModelMeta: every field checked, a damaged one named, and a
version whose metadata fails never used while the daemon goes on."""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Running, insert, model_meta, smocsd, write_config

from smocsd.common.modelmeta import ModelMeta
from smocsd.common.records import Damage
from smocsd.data import demo

MODELS = "models/autoencoder"
# What a field may become: wrong types, `true` for a number, null, containers, the edges of
# 64-bit integers and doubles, and the non-finite numbers Python's json reads and writes.
VALUES: list[Any] = [
    None,
    True,
    False,
    "x",
    "",
    0,
    -1,
    2**63,
    -(2**63) - 1,
    1e300,
    -1e300,
    math.nan,
    math.inf,
    -math.inf,
    10**400,
    [],
    [1],
    {},
    {"unknown": 1},
]


def _paths(value: Any, at: tuple = ()) -> Iterator[tuple]:
    """Every key and list index in `value`, by its path from the top."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        yield (*at, key)
        if isinstance(item, (dict, list)):
            yield from _paths(item, (*at, key))


def _dotted(path: tuple) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def test_the_documented_file_reads_back_as_itself():
    meta = model_meta(b"onnx")
    assert ModelMeta.parse(meta).to_json() == meta
    assert json.loads(ModelMeta.parse(meta).dumps()) == meta


def test_older_versions_read_as_they_did():
    """Versions from before `score`, result ids, `history`, labels and the sustained and
    level rules: absent means what it meant then, and they write back as they were."""
    older = model_meta(b"onnx", score="mse")
    for key in ("score", "channel_scale", "outcome", "result_id", "history"):
        del older[key]
    del older["alarm"]["sustained"], older["alarm"]["level"]
    for key in ("left_out_rows", "champion_alarm_windows", "alarm_windows_kept", "rejection"):
        del older["eval"][key]
    del older["data"]["left_out"]
    parsed = ModelMeta.parse(older)
    assert parsed.score_kind == "mse" and parsed.outcome is None and parsed.history is None
    assert parsed.to_json() == older


# A field that decides which others must be there: a damage to it is named by the other
# that no longer fits it (without `score`, "mse": `channel_scale` then has no place).
GOVERNED = {"score": ("channel_scale", "alarm.sustained")}


def test_any_damage_is_named_by_its_field_and_parsing_never_raises_otherwise():
    """Seeded: each case damages one to three fields of the real format (replaced by a
    value of the wrong kind, removed, or joined by an unknown key). Parsing raises Damage
    naming the first damaged field it reads, or (for a value that is still valid, e.g. 0
    for a count) returns a record that writes strict JSON and reads back as itself."""
    rng = random.Random(18)
    base = model_meta(b"onnx", ("a", "b"))
    paths = list(_paths(base))
    damaged = 0
    for _ in range(3000):
        meta = copy.deepcopy(base)
        touched = []
        for path in rng.sample(paths, rng.randint(1, 3)):
            parent: Any = meta
            try:
                for key in path[:-1]:
                    parent = parent[key]
                parent[path[-1]]  # an earlier damage in this case may have removed it
            except (KeyError, IndexError, TypeError):
                continue
            what = rng.random()
            if what < 0.15 and isinstance(parent, dict):
                del parent[path[-1]]
            elif what < 0.25 and isinstance(parent, dict):
                parent["extra"] = 1
                path = (*path[:-1], "extra")
            else:
                parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
            touched.append(_dotted(path))
        try:
            parsed = ModelMeta.parse(meta)
        except Damage as damage:
            damaged += 1
            field = str(damage).split(": ", 1)[0]
            assert any(
                field.startswith(t) or t.startswith(field) or field in GOVERNED.get(t, ())
                for t in touched
            ), (damage, touched)
        else:
            assert ModelMeta.parse(json.loads(parsed.dumps())) == parsed, touched
    assert damaged > 2500


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"score": "mse"}, 'channel_scale: expected with "score": "channel-max" and only then'),
        ({"channels": ["a", "a"]}, "channels: a channel is named twice"),
        ({"alarm": {"kind": "k-of-n", "above": 4, "of": 3}}, "alarm.above: 4 is more than"),
        (
            {
                "alarm": {
                    "kind": "k-of-n",
                    "above": 2,
                    "of": 3,
                    "sustained": {"above": 31, "of": 30, "level": 1},
                }
            },
            "alarm.sustained.above: 31 is more than",
        ),
        (
            {
                "alarm": {
                    "kind": "k-of-n",
                    "above": 2,
                    "of": 3,
                    "sustained": {"above": 2, "of": 3, "level": 0},
                }
            },
            "alarm.sustained.level: expected a number > 0",
        ),
        (
            {
                "alarm": {
                    "kind": "k-of-n",
                    "above": 2,
                    "of": 3,
                    "level": {"gap": 100, "baseline": 50, "limit": [0.8]},
                }
            },
            "alarm.level.limit: 1 values for 2 channel",
        ),
        (
            {
                "alarm": {
                    "kind": "k-of-n",
                    "above": 2,
                    "of": 3,
                    "level": {"gap": 100, "baseline": 0, "limit": [0.8, 0.0]},
                }
            },
            "alarm.level.baseline: expected a 64-bit integer >= 1, got 0",
        ),
        ({"threshold": 0}, "threshold: expected a number > 0, got 0"),
        ({"format": "smocsd.model/2"}, 'format: expected "smocsd.model/1"'),
        ({"result_id": "ABC"}, 'result_id: expected a UUID, got "ABC"'),
        ({"created_at": "yesterday"}, "created_at: expected a UTC time"),
        ({"note": "hand-added"}, "note: not a field of this format"),
    ],
)
def test_values_that_contradict_each_other_or_the_format(change, problem):
    with pytest.raises(Damage, match="^" + problem.replace("(", r"\(")):
        ModelMeta.parse({**model_meta(b"onnx", ("a", "b")), **change})


def test_the_sustained_rule_only_with_channel_max():
    """ "mse" errors are not in units of each channel's normal error."""
    meta = model_meta(b"onnx", ("a", "b"), score="mse")
    del meta["channel_scale"]
    with pytest.raises(Damage, match=r'^alarm\.sustained: only with "score": "channel-max"'):
        ModelMeta.parse(meta)
    del meta["alarm"]["sustained"]
    assert ModelMeta.parse(meta).alarm.sustained is None


def test_a_damaged_current_metadata_is_named_and_the_daemon_trains_and_scores(tmp_path):
    """The current version's metadata.json holds a string threshold: the version fails its
    check (status and models list name file and field), live scoring refuses it, the
    next cycle trains a new version from scratch and promotes it, and live scoring takes
    that one."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    config = write_config(
        tmp_path / "smocsd.toml", state, daemon={"check_interval": "1s"}, scoring={"enabled": True}
    )
    smocsd("train-once", config=config, check=True)
    path = state / MODELS / "v000001/metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "threshold": "x"}))
    problem = 'v000001/metadata.json: threshold: expected a number, got "x"'
    status = json.loads(smocsd("status", "--json", config=config, check=True).stdout)
    assert status["current_problem"] == problem
    insert(state / "readings.db", 600)
    daemon = Running(config, tmp_path / "log")
    try:
        daemon.wait_for("scoring with v2")
        assert daemon.stop() == 0
    finally:
        daemon.close()
    log = daemon.text()
    assert log.count(f"current v1 is damaged, not used for warm start or comparison: {problem}")
    assert log.count(f"scoring: keeping vNone: {problem}") == 1
    listed = json.loads(smocsd("models", "list", "--json", config=config, check=True).stdout)
    assert [(v["version"], v["current"], v["problem"]) for v in listed] == [
        (1, False, problem),
        (2, True, None),
    ]
    v2 = json.loads((state / MODELS / "v000002/metadata.json").read_text())
    assert v2["metrics"]["warm_started"] is False and v2["eval"]["champion_problem"] == problem
