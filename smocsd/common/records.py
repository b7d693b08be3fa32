"""Checking a JSON file's values into typed records: the helpers state.json and
metadata.json are read with.

Each check takes a value as json.loads gave it and its dotted name in the file, and
returns it typed or raises Damage naming that field: a file that is damaged, hand-edited
or another release's must be named once, by file and field, never surface later as a
TypeError or a NaN in a computation. Standard library only: the daemon imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

# Order values and ids become SQLite and PostgreSQL integer parameters, which are 64-bit:
# a larger one fails every query it is in.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Damage(Exception):
    """A field that fails its check: its dotted name and what is wrong with it."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")


def shown(value: Any) -> str:
    """A value as the file has it, cut short: a log line, not a dump."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: Any, name: str, low: int = INT64_MIN) -> int:
    # bool is an int to Python, never to the file: `true` is no order value
    if isinstance(value, bool) or not isinstance(value, int):
        raise Damage(name, f"expected an integer, got {shown(value)}")
    if not low <= value <= INT64_MAX:
        span = "a 64-bit integer" + ("" if low == INT64_MIN else f" >= {low}")
        raise Damage(name, f"expected {span}, got {shown(value)}")
    return value


def number(value: Any, name: str, low: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Damage(name, f"expected a number, got {shown(value)}")
    try:
        result = float(value)
    except OverflowError:  # an integer of hundreds of digits
        result = math.inf
    if not (math.isfinite(result) and low <= result):
        span = "a finite number" if low == -math.inf else f"a finite number >= {low:g}"
        raise Damage(name, f"expected {span}, got {shown(value)}")
    return result


def number_or_none(value: Any) -> float | None:
    """A number as a record or a job's dict holds it; None for anything else (a bool is
    not one): for what reports a value if there is one and never fails for its lack."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise Damage(name, f"expected a string, got {shown(value)}")
    return value


def uuid_text(value: Any, name: str) -> str:
    """A message id, as the messages' schemas have it: lowercase, hyphenated."""
    with contextlib.suppress(ValueError):
        if str(uuid.UUID(text(value, name))) == value:
            return value
    raise Damage(name, f"expected a UUID, got {shown(value)}")


def count(value: Any, name: str) -> int:
    """An integer >= 0: a counter, an id, a count of rows."""
    return integer(value, name, 0)


def positive(value: Any, name: str) -> int:
    """An integer >= 1: a version number."""
    return integer(value, name, 1)


def nonnegative(value: Any, name: str) -> float:
    """A finite number >= 0: a score or threshold (scoring caps scores at float32's largest,
    finite), a loss."""
    return number(value, name, 0.0)


def or_null(check: Callable[[Any, str], T]) -> Callable[[Any, str], T | None]:
    return lambda value, name: None if value is None else check(value, name)


def json_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise Damage(name, f"expected a list, got {shown(value)}")
    return value


def names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


@dataclass
class Findings:
    """What one read found wrong, each named by its dotted field ("scoring.event.version")."""

    damaged: list[str] = field(default_factory=list)  # "NAME: PROBLEM; what became of it"
    unknown: list[str] = field(default_factory=list)  # keys this release does not read

    def note(self, damage: Damage, what: str) -> None:
        self.damaged.append(f"{damage}; {what}")

    def keep(self, read: Callable[[], T], default: T, what: str = "reset") -> T:
        """read(), or `default` once its damage is noted."""
        try:
            return read()
        except Damage as damage:
            self.note(damage, what)
            return default


class Object:
    """One JSON object of the file, at dotted `name`; its getters raise Damage naming the
    field. `known`: its keys (the others are noted unknown); None: any key is its own."""

    def __init__(
        self, value: Any, name: str, known: Collection[str] | None, findings: Findings
    ) -> None:
        if not isinstance(value, dict):
            raise Damage(name, f"expected an object, got {shown(value)}")
        self.data, self.name = value, name
        if known is not None:
            findings.unknown += [self.at(key) for key in value if key not in known]

    def at(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def field(self, key: str, check: Callable[[Any, str], T]) -> T:
        """A field the record cannot do without."""
        if key not in self.data:
            raise Damage(self.at(key), "missing")
        return check(self.data[key], self.at(key))

    def optional(self, key: str, check: Callable[[Any, str], T]) -> T | None:
        """A field that may be absent or null: None then."""
        value = self.data.get(key)
        return None if value is None else check(value, self.at(key))

    def present(self, key: str, check: Callable[[Any, str], T]) -> T | None:
        """A field that may be absent (None then), but is never null when present."""
        return check(self.data[key], self.at(key)) if key in self.data else None
