#!/usr/bin/env python3
"""Write the configuration keys' documentation from smocsd/common/config.py, where each key is
defined once: its default and parser (whose ranges and choices it states in words) and its
KeyDoc.

    python3 packaging/config_docs.py            # rewrite the generated parts
    python3 packaging/config_docs.py --check    # exit 1 naming each stale file

The generated parts sit between marker comments, so the prose around them stays
hand-written: the README's key table, the contract's key table, the man page's key list
under CONFIGURATION and the keys of the conffile conf/smocsd.toml. The man page's .TH line
too, from smocsd.__version__ and CHANGELOG.md. tests/test_docs.py fails while any of them
differs from what this writes.

A development tool beside build_deb.py, not part of the package: a gateway never renders
these, and the loader it runs stays free of Markdown and roff.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import Field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import smocsd  # noqa: E402 - the repository's, not an installed one
from smocsd.common import config  # noqa: E402

sys.path.insert(0, str(REPO / "packaging"))
import changelog  # noqa: E402

COMMAND = "python3 packaging/config_docs.py"
_SOURCE = f"generated from smocsd/common/config.py by {COMMAND}: edit there, not here"


def _doc(f: Field) -> config.KeyDoc:
    return f.metadata["doc"]


def _parser(f: Field) -> config.Parser:
    return f.metadata["parse"]


def _default(f: Field) -> str | None:
    """The default as a TOML value, or None for a key without one (KeyDoc.unset says what
    holds then)."""
    return None if _doc(f).unset else _parser(f).show(f.default)


def _with_rule(text: str, rule: str) -> str:
    """`text` and then `rule`: a clause, or a parenthesis (a link)."""
    if not rule:
        return text
    return text + (" " if rule.startswith("(") else "; ") + rule


def _accepted(f: Field) -> str:
    return _with_rule(_parser(f).accepted, _doc(f).rule)


# --- Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme() -> str:
    """The README's table: `rule` links resolve in the contract."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, f in config.keys().items():
        doc = _doc(f)
        default = doc.unset or f"`{_default(f)}`"
        meaning = _with_rule(doc.text, doc.rule.replace("](#", "](docs/contract.md#"))
        rows.append(f"| `{key}` | {_cell(default)} | {_cell(meaning)} |")
    rows.append("| `[job]` | | free-form table for a user job (`self.config.job_options`) |")
    return "\n".join(rows) + "\n"


def contract() -> str:
    """The contract's table: `text` links resolve in the README, one directory up."""
    rows = ["| key | default | accepted | meaning |", "|---|---|---|---|"]
    for key, f in config.keys().items():
        default = _doc(f).unset or f"`{_default(f)}`"
        meaning = _doc(f).text.replace("](#", "](../README.md#")
        meaning += f". {_doc(f).more}" if _doc(f).more else ""
        rows.append(f"| `{key}` | {_cell(default)} | {_cell(_accepted(f))} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


# --- plain text: the man page and the conffile


def _plain(markdown: str) -> str:
    """Markdown as read on a terminal: a parenthesis holding only a link goes, another
    link keeps its label, code spans lose their backticks."""
    text = re.sub(r"\s*\(\[[^\]]*\]\([^)]*\)\)", "", markdown)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return text.replace("`", "")


def _sentence(markdown: str) -> str:
    text = _plain(markdown)
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _description(f: Field) -> str:
    doc = _doc(f)
    parts = [_sentence(doc.text), _sentence(doc.more) if doc.more else ""]
    parts.append(_sentence(_accepted(f)))
    if doc.unset:
        parts.append(f"Unset: {_plain(doc.unset)}.")
    return " ".join(part for part in parts if part)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _tables() -> dict[str, list[tuple[str, Field]]]:
    """The keys by table ("publish.kafka"), in order."""
    tables: dict[str, list[tuple[str, Field]]] = {}
    for key, f in config.keys().items():
        table, _, name = key.rpartition(".")
        tables.setdefault(table, []).append((name, f))
    return tables


_ROFF = {"\\": "\\e", "-": "\\-", '"': "\\(dq", "≥": "\\(>=", "≤": "\\(<=", "±": "\\(+-"}


def _roff(text: str) -> str:
    out = "".join(_ROFF.get(ch, ch if ch.isascii() else f"\\[u{ord(ch):04X}]") for ch in text)
    return "\\&" + out if out.startswith((".", "'")) else out


def man() -> str:
    lines = []
    for table, entries in _tables().items():
        lines.append(f'.SS "[{table}]"')
        for name, f in entries:
            default = _default(f)
            tag = f'.BR {name} " = {_roff(default)}"' if default else f".B {name}"
            lines += [".TP", tag, *map(_roff, _wrap(_description(f), 88))]
    return "\n".join(lines) + "\n"


def man_title() -> str:
    """The man page's .TH line: smocsd's version, and the date of its release in
    CHANGELOG.md. A version not released yet (the tree between two releases) gets the newest
    release's date, not today's: the page must come out the same on any day and from a
    source tarball, or tests/test_docs.py would fail each morning after a regeneration and
    two builds of one commit would differ."""
    version = smocsd.__version__
    releases = changelog.read().releases
    dated = [s.date for s in releases if s.name == version] or [s.date for s in releases[:1]]
    if not dated:
        raise SystemExit(f"{changelog.CHANGELOG}: no release, so no date for the man page")
    return f'.TH SMOCSD 1 "{dated[0]}" "smocsd {version}" "User Commands"\n'


def conffile() -> str:
    lines = []
    for table, entries in _tables().items():
        lines += ["", f"[{table}]"]
        for name, f in entries:
            default = _default(f)
            lines += ["", *(f"# {line}" for line in _wrap(_description(f), 86))]
            lines.append(f"{name} = {default}" if default else f"# {name} = {_doc(f).example}")
    return "\n".join(lines[1:]) + "\n"


# --- the files and their markers


class Target:
    """A file whose part between the line `begin` and the line `end` is `render()`."""

    def __init__(self, path: str, begin: str, end: str, render: Callable[[], str]):
        self.path, self.begin, self.end, self.render = REPO / path, begin, end, render

    def spliced(self, text: str) -> str:
        """`text` (the file's) with the generated part as it should be."""
        head, begin, rest = text.partition(self.begin + "\n")
        _, end, tail = rest.partition(self.end + "\n")
        if not begin or not end:
            raise SystemExit(f"{self.path}: no {self.begin!r} ... {self.end!r} lines")
        return head + begin + self.render() + end + tail


class Line:
    """A file whose one line starting with `begin` is `render()`: where no marker comment
    can go around it (the man page's .TH)."""

    def __init__(self, path: str, begin: str, render: Callable[[], str]):
        self.path, self.begin, self.render = REPO / path, begin, render

    def spliced(self, text: str) -> str:
        lines = text.splitlines(keepends=True)
        found = [i for i, line in enumerate(lines) if line.startswith(self.begin)]
        if len(found) != 1:
            raise SystemExit(f"{self.path}: {len(found)} lines start with {self.begin!r}, not 1")
        lines[found[0]] = self.render()
        return "".join(lines)


_MARKDOWN = (f"<!-- {_SOURCE} -->", "<!-- end of the generated part -->")
TARGETS = (
    Target("README.md", *_MARKDOWN, readme),
    Target("docs/contract.md", *_MARKDOWN, contract),
    Line("packaging/smocsd.1", ".TH SMOCSD 1 ", man_title),
    Target("packaging/smocsd.1", f'.\\" {_SOURCE}', '.\\" end of the generated part', man),
    Target(
        "conf/smocsd.toml",
        "# --- the keys: generated from smocsd/common/config.py (packaging/config_docs.py) ---",
        "# --- end of the keys ---",
        conffile,
    ),
)
PATHS = list(dict.fromkeys(t.path for t in TARGETS))


def generated(path: Path) -> str:
    """The file at `path` with each of its generated parts as it should be."""
    text = path.read_text(encoding="utf-8")
    for target in TARGETS:
        if target.path == path:
            text = target.spliced(text)
    return text


def stale() -> list[Path]:
    """The files whose generated parts are not what the code and CHANGELOG.md say."""
    return [path for path in PATHS if generated(path) != path.read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    paths = stale()
    for path in paths:
        if args.check:
            print(f"{path.relative_to(REPO)}: stale, run {COMMAND}", file=sys.stderr)
        else:
            path.write_text(generated(path), encoding="utf-8")
            print(f"wrote {path.relative_to(REPO)}")
    return 1 if args.check and paths else 0


if __name__ == "__main__":
    sys.exit(main())
