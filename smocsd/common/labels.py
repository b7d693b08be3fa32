"""The operator's say over what is normal: state_dir/labels.json, and its messages.

Two kinds of label, each a range of the order column:

- accept: "this is the new normal" (a repaired pump, a new recipe). Rows the current
  model alarmed on become trainable again, and the next check trains at once.
- exclude: a maintenance or calibration period, never trained on and never alarmed.

A label names the model it is for (`model`, `smocsd accept --model NAME`), or none: it
applies to every model, as each label made before models had names does (`for_model`).

The file is rewritten whole by `write_atomic` under `labels.lock`, so a crash at any
instant leaves the old list or the new one; ids only grow (`next_id`), so a removed
label's id never names another. No numpy here: the daemon and `status` read labels.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..schemas import LABEL_SCHEMA
from .files import locked, remove_temp_files, write_atomic
from .state import utcnow

FORMAT = "smocsd.labels/1"
FILE = "labels.json"


class LabelError(Exception):
    """labels.json cannot be read or a label cannot be made; one line naming the file."""


class Kind(str, Enum):
    ACCEPT = "accept"
    EXCLUDE = "exclude"


class By(str, Enum):
    OPERATOR = "operator"  # smocsd accept / exclude
    ACCEPT_AFTER = "accept_after"  # model.accept_after: a change that lasted


@dataclass(frozen=True)
class Label:
    id: int
    kind: Kind
    first: int  # order column, inclusive
    last: int  # inclusive
    reason: str
    by: By
    created_at: str
    model: str | None = None  # the model it is for; None: every model

    def covers(self, order: int) -> bool:
        return self.first <= order <= self.last

    def to_json(self) -> dict[str, Any]:
        """As labels.json keeps it; `model` only when the label has one, so that a label
        for every model is written as a release before models had names wrote it."""
        data = {**asdict(self), "kind": self.kind.value, "by": self.by.value}
        if self.model is None:
            del data["model"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Label:
        return cls(
            id=int(data["id"]),
            kind=Kind(data["kind"]),
            first=int(data["first"]),
            last=int(data["last"]),
            reason=str(data.get("reason", "")),
            by=By(data.get("by", "operator")),
            created_at=str(data["created_at"]),
            model=_model_name(data.get("model")),
        )

    def describe(self) -> str:
        reason = f": {self.reason}" if self.reason else ""
        by = "" if self.by is By.OPERATOR else f" (by {self.by.value})"
        model = "" if self.model is None else f" for {self.model}"
        return f"#{self.id} {self.kind.value} {self.first}..{self.last}{model}{by}{reason}"

    def applies_to(self, model: str) -> bool:
        """Whether the label is in force for `model`: it names that model, or none."""
        return self.model is None or self.model == model


def _model_name(value: Any) -> str | None:
    """A label's `model`: absent or null (every model), else a non-empty string."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"model is {value!r}, not a model's name")
    return value


class Labels:
    """state_dir/labels.json: the labels in force."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / FILE

    def _load(self) -> tuple[int, list[Label]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 1, []
        except (OSError, ValueError) as exc:
            raise LabelError(f"{self.path}: unreadable: {exc}") from None
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            labels = [Label.from_json(item) for item in data["labels"]]
            next_id = max([int(data["next_id"]), *(label.id + 1 for label in labels)])
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise LabelError(f"{self.path}: not a labels file: {exc}") from None
        return next_id, labels

    def read(self) -> list[Label]:
        """The labels, oldest first (none when the file does not exist)."""
        return self._load()[1]

    def _locked(self) -> contextlib.AbstractContextManager[bool]:
        return locked(self.path.with_name("labels.lock"))

    def _write(self, next_id: int, labels: list[Label]) -> None:
        doc = {"format": FORMAT, "next_id": next_id, "labels": [x.to_json() for x in labels]}
        write_atomic(self.path, (json.dumps(doc, indent=2) + "\n").encode())

    def add(
        self,
        kind: Kind,
        first: int,
        last: int,
        reason: str = "",
        by: By = By.OPERATOR,
        model: str | None = None,
    ) -> Label:
        """A new label over `first`..`last`, for `model` (None: every model)."""
        if first > last:
            raise LabelError(f"--from {first} is after --to {last}")
        with self._locked():
            next_id, labels = self._load()
            label = Label(next_id, kind, first, last, reason, by, utcnow(), model)
            self._write(next_id + 1, [*labels, label])
        return label

    def remove_leftovers(self) -> list[str]:
        """Temp files of writes a crash interrupted; under the lock, so never a live one."""
        with self._locked():
            return remove_temp_files(self.path)

    def remove(self, label_id: int, model: str | None = None) -> Label:
        """Removes label `label_id`; given `model`, only if it is in force for that model
        (one for every model goes for all of them)."""
        with self._locked():
            next_id, labels = self._load()
            gone = [x for x in labels if x.id == label_id]
            if not gone:
                raise LabelError(f"{self.path}: no label #{label_id}")
            if model is not None and not gone[0].applies_to(model):
                raise LabelError(
                    f"{self.path}: label #{label_id} is for {gone[0].model}, not {model}"
                )
            self._write(next_id, [x for x in labels if x.id != label_id])
        return gone[0]


def for_model(labels: list[Label], name: str) -> list[Label]:
    """The labels in force for model `name`: those for it and those for every model."""
    return [x for x in labels if x.applies_to(name)]


def ranges_of(labels: list[Label], kind: Kind) -> list[tuple[int, int]]:
    """(first, last) of each label of `kind`: what scoring and screening apply."""
    return [(x.first, x.last) for x in labels if x.kind is kind]


def message(label: Label, action: str, device_id: str, model: str) -> dict[str, Any]:
    """The smocsd.label/1 message: what a gateway was told, for the fleet's central side.
    `model` names the model it was told about: the label's own, if it has one."""
    return {
        "schema": LABEL_SCHEMA,
        "message_id": str(uuid.uuid4()),
        "device_id": device_id,
        "model": label.model or model,
        "action": action,  # "added" or "removed"
        "label": label.to_json(),
        "timestamp": utcnow(),
    }
