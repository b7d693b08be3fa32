"""CHANGELOG.md read as data: the `Unreleased` section and each release with its date and
its items by kind (Added, Changed, Fixed...). The Debian changelog, the release command and
the tests that versions agree all read it here, so the file's format is checked once.

Only the subset of Keep a Changelog that CHANGELOG.md uses: `## [Unreleased]`,
`## [X.Y.Z] - YYYY-MM-DD`, `### Kind` and `- item` lines (continued by indented lines).
Anything else under a release is its prose, kept as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

CHANGELOG = Path(__file__).resolve().parent.parent / "CHANGELOG.md"
VERSION = re.compile(r"\d+\.\d+\.\d+")
EXPECTED = "expected '## [X.Y.Z] - YYYY-MM-DD'"
HEADING = re.compile(r"## \[(?P<name>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?\s*")


class ChangelogError(Exception):
    """CHANGELOG.md is not as this module reads it (one line naming the line)."""


@dataclass
class Section:
    """One `## [...]` section: its prose and its items by kind, in the file's order."""

    name: str  # "Unreleased" or a version
    date: date | None
    prose: list[str] = field(default_factory=list)
    items: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(self.items.values())


@dataclass
class Changelog:
    unreleased: Section
    releases: list[Section]  # newest first

    def release(self, version: str) -> Section:
        for section in self.releases:
            if section.name == version:
                return section
        raise ChangelogError(f"CHANGELOG.md: no release {version}")


def parse(text: str, path: str = "CHANGELOG.md") -> Changelog:
    sections: list[Section] = []
    kind: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        if line.startswith("## "):
            heading = HEADING.fullmatch(line)
            if not heading:
                raise ChangelogError(f"{where}: {EXPECTED}, got {line!r}")
            name, day = heading["name"], heading["date"]
            if name == "Unreleased":
                if sections or day:
                    raise ChangelogError(f"{where}: [Unreleased] comes first, without a date")
                sections.append(Section(name, None))
            else:
                if not VERSION.fullmatch(name) or not day:
                    raise ChangelogError(f"{where}: {EXPECTED}, got {line!r}")
                try:
                    sections.append(Section(name, date.fromisoformat(day)))
                except ValueError:
                    raise ChangelogError(f"{where}: {day} is not a date") from None
            kind = None
        elif not sections:
            continue  # the file's own introduction
        elif line.startswith("### "):
            kind = line[4:].strip()
            sections[-1].items.setdefault(kind, [])
        elif line.startswith("- ") and kind:
            sections[-1].items[kind].append(line[2:].strip())
        elif line.startswith("  ") and kind and sections[-1].items[kind]:
            items = sections[-1].items[kind]
            items[-1] = f"{items[-1]} {line.strip()}"
        elif line.strip() and kind:
            raise ChangelogError(f"{where}: expected '- item' under ### {kind}, got {line!r}")
        elif line.strip():
            sections[-1].prose.append(line.strip())
    if not sections or sections[0].name != "Unreleased":
        raise ChangelogError(f"{path}: no '## [Unreleased]' section first")
    releases = sections[1:]
    versions = [tuple(map(int, s.name.split("."))) for s in releases]
    if versions != sorted(set(versions), reverse=True):
        raise ChangelogError(f"{path}: releases are not newest first, each once")
    return Changelog(sections[0], releases)


def read(path: Path = CHANGELOG) -> Changelog:
    return parse(path.read_text(), str(path))
