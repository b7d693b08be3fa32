"""The JSON Schemas (draft 2020-12) of what smocsd publishes and writes.

Each document names its own schema: a training result, an alarm or a label message in its
"schema" field, a version's metadata.json in its "format" field. The files here are
package data, and every .deb also installs them in /usr/share/smocsd/schemas/, so a
consumer can validate with any JSON Schema validator without importing smocsd.

The training result's schema refers to the metadata's by its $id (a result of the
built-in job carries the version's metadata.json as `model_meta`): a validator needs
all the files here loaded, e.g. in a `referencing.Registry` for Python's `jsonschema`.

The names live here, apart from the code that sends each document, so that a part
needs no sender's imports for a string (publish.py's would load the Kafka and MQTT
clients into `smocsd score`). This module imports the standard library only; the daemon
uses the names, never load(), and validating is left to the consumer (smocsd does not
depend on a validator).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "ALARM_SCHEMA",
    "DIRECTORY",
    "FILES",
    "LABEL_SCHEMA",
    "MODEL_FORMAT",
    "RESULT_SCHEMA",
    "load",
    "name_of",
]

DIRECTORY = Path(__file__).resolve().parent

# The names the documents carry: a message's "schema", metadata.json's "format".
RESULT_SCHEMA = "smocsd.training-result/1"
ALARM_SCHEMA = "smocsd.alarm/1"
LABEL_SCHEMA = "smocsd.label/1"
MODEL_FORMAT = "smocsd.model/1"

# The name a document carries -> its schema file. A new version of a format gets a new
# name (".../2") and a file beside the old one, which consumers may still receive.
FILES = {
    RESULT_SCHEMA: "training-result-1.schema.json",
    ALARM_SCHEMA: "alarm-1.schema.json",
    LABEL_SCHEMA: "label-1.schema.json",
    MODEL_FORMAT: "model-1.schema.json",
}


def name_of(document: Any) -> str | None:
    """The schema a document names: its "schema" (messages) or "format" (metadata.json)
    field; None if it names none."""
    if not isinstance(document, dict):
        return None
    name = document.get("schema", document.get("format"))
    return name if isinstance(name, str) else None


@cache
def _load(name: str) -> str:
    try:
        file = FILES[name]
    except KeyError:
        raise KeyError(f"no schema named {name!r}: one of {', '.join(FILES)}") from None
    return (DIRECTORY / file).read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """The schema named `name` (e.g. "smocsd.alarm/1"), parsed: a fresh copy each call."""
    return json.loads(_load(name))
