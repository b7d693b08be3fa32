"""CHANGELOG.md read as data: the `Unreleased` section and each release with its date and
its items by kind (Added, Changed, Fixed...). The Debian changelog, the release command and
the tests that versions agree all read it here, so the file's format is checked once.

Only the subset of Keep a Changelog that CHANGELOG.md uses: `## [Unreleased]`,
`## [X.Y.Z] - YYYY-MM-DD`, `### Kind` and `- item` lines (continued by indented lines).
Anything else under a release is its prose, kept as it is.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from email.utils import format_datetime
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


def debian(
    log: Changelog,
    version: str,
    package_version: Callable[[str], str],
    distribution: str,
    maintainer: str,
    now: datetime,
) -> str:
    """The Debian changelog (deb-changelog(5)) of the package built from a tree at version
    (smocsd.__version__): one entry per release, newest first, each at
    package_version(its version) and for distribution. A version with no release yet is a
    development build: its entry on top is the Unreleased section, for UNRELEASED, at now."""
    if not VERSION.fullmatch(version):
        raise ChangelogError(f"smocsd version {version!r} is not X.Y.Z")
    newest = log.releases[0].name if log.releases else None
    if newest and _key(newest) > _key(version):
        raise ChangelogError(f"{CHANGELOG.name}: release {newest} is newer than {version}")
    dated = zip(log.releases, _dates(log.releases), strict=True)
    entries = [(s, distribution, when) for s, when in dated]
    if newest != version:
        entries.insert(0, (replace(log.unreleased, name=version), "UNRELEASED", now))
    return "\n".join(
        _entry(section, package_version(section.name), dist, maintainer, when)
        for section, dist, when in entries
    )


def _key(version: str) -> tuple[int, ...]:
    return tuple(map(int, version.split(".")))


def _dates(releases: list[Section]) -> list[datetime]:
    """Each release's time, newest first. A release is dated by its day only: noon UTC is
    that day from UTC-12 to UTC+11. Releases cut on one day follow each other a minute
    apart, since the newest entry must be dated later than the one before it (lintian's
    latest-changelog-entry-without-new-date)."""
    times = []
    for i, section in enumerate(releases):
        assert section.date is not None  # parse() gives every release its date
        earlier = sum(other.date == section.date for other in releases[i + 1 :])
        noon = datetime.combine(section.date, time(12), timezone.utc)
        times.append(noon + timedelta(minutes=earlier))
    return times


def _entry(section: Section, version: str, dist: str, maintainer: str, when: datetime) -> str:
    """One entry: the prose as the first item, then every item prefixed with its kind, as
    `  * Kind: text` wrapped at 80 columns (lintian's debian-changelog-line-too-long). The
    kinds are not `[ Kind ]` groups: that form names the author of the changes below it
    (dch, gbp dch)."""
    items = [" ".join(section.prose)] if section.prose else []
    items += [f"{kind}: {item}" for kind, listed in section.items.items() for item in listed]
    lines = [f"smocsd ({version}) {dist}; urgency=medium", ""]
    for item in items or ["No change listed in CHANGELOG.md yet."]:
        lines += textwrap.wrap(
            item,
            80,
            initial_indent="  * ",
            subsequent_indent="    ",
            break_long_words=False,  # a long `option` or address overflows rather than splits
            break_on_hyphens=False,
        )
    return "\n".join([*lines, "", f" -- {maintainer}  {format_datetime(when)}", ""])
