"""The documents of the external contract agree with the code, and their links resolve.

Every configuration key is given with its default in four places: the README's table,
docs/contract.md, the man page and the shipped conffile. smocsd/common/config.py is the truth,
and packaging/config_docs.py writes those four parts from it: a key added, renamed or
given a new default there without regenerating them fails here instead of misleading an
operator, and so does a slip of the generator, since the checks below read what the
documents say. The contract must also name every command and option,
exit code, message and metadata.json field, JSON Schema and metric the code has. The
Markdown documents link only to files in the repository, so a clone or a source tarball
reads complete on a gateway without a network.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import Field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import model_meta

from smocsd import schemas
from smocsd.app import cli, metrics
from smocsd.common import config
from smocsd.delivery import outbox
from smocsd.training import result

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
import config_docs  # noqa: E402 - a development tool, not part of the package

README = ROOT / "README.md"
CONTRACT = ROOT / "docs/contract.md"
MAN = ROOT / "packaging/smocsd.1"
CONFFILE = ROOT / "conf/smocsd.toml"
LINKED_DOCS = (README, CONTRACT, ROOT / "docs/RELIABILITY.md")


def _keys() -> dict[str, Field]:
    """Every key ("publish.kafka.topic") with its dataclass field, walked as the loader
    walks them: the sections of config._SECTIONS, nested tables by their default_factory,
    leaves being the fields that carry a parser."""
    keys: dict[str, Field] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in fields(cls):
            if "parse" in f.metadata:
                keys[f"{prefix}.{f.name}"] = f
            elif "derived" not in f.metadata:
                walk(type(f.default_factory()), f"{prefix}.{f.name}")

    for name, cls in config._SECTIONS.items():
        walk(cls, name)
    return keys


KEYS = _keys()
TABLES = {key.rsplit(".", 1)[0] for key in KEYS}
FREE_FORM = "job"  # the [job] table, handed to a user TrainingJob as it is

# Keys whose field default is None or "": unset, the value comes from somewhere else or
# there is none. Each document must say where, by naming this word in the key's entry.
UNSET = {
    "daemon.device_id": "host name",
    "daemon.state_dir": "STATE_DIRECTORY",
    "source.path": "readings.db",
    "source.dsn": "libpq",
    "source.password_file": "pg-password",
    "source.order_column": "rowid",
    "source.partition_column": "one model",
    "publish.kafka.security_protocol": "PLAINTEXT",
    "publish.kafka.sasl_mechanism": None,
    "publish.kafka.sasl_username": None,
    "publish.kafka.sasl_password_file": "kafka-password",
    "publish.kafka.ssl_ca_location": None,
    "publish.mqtt.ca_file": None,
    "publish.mqtt.username": None,
    "publish.mqtt.password_file": "mqtt-password",
    "metrics.textfile": None,
}
# A default the environment replaces: the entry must name the variable.
OVERRIDES = {"publish.kafka.bootstrap_servers": "KAFKA_BROKER_URL"}
# Dotted names that look like keys and are not: files, and a field of metadata.json.
NOT_KEYS = {"model.onnx", "metrics.conf", "metrics.val_loss"}


def test_the_unset_keys_are_those_without_a_default():
    # training.max_gap's and training.networks' None is their default "auto", and
    # model.accept_after's its default "off", which the documents write.
    words = {"training.max_gap", "training.networks", "model.accept_after"}
    unset = {key for key, f in KEYS.items() if f.default in (None, "")} - words
    assert unset == set(UNSET), "update UNSET above and the documents"


# --- what each document says: key -> Entry


class Entry:
    """One key as a document gives it: its default as a TOML value (None: no value given,
    only words), the text around it, and whether it is commented out (the conffile)."""

    def __init__(self, literal: str | None, text: str, commented: bool = False):
        self.literal, self.text, self.commented = literal, text, commented


def _toml_value(text: str) -> Any:
    """`text` as a TOML value; raises ValueError if it is none."""
    return tomllib.loads(f"v = {text}")["v"]


def _is_toml_value(text: str) -> bool:
    try:
        _toml_value(text)
    except ValueError:
        return False
    return True


def _section(markdown: str, heading: str) -> str:
    """The text under the `## heading` line, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match[1]


def _markdown_table(text: str) -> dict[str, Entry]:
    """The rows of a `| key | default | ... |` table whose first cell is one `key`; the
    default is a TOML value when it is one `code span` holding one."""
    entries: dict[str, Entry] = {}
    for line in text.splitlines():
        match = re.match(r"\| `([\w.]+)` \|([^|]*)\|", line)
        if not match:
            continue
        key, default = match[1], match[2].strip()
        value = re.fullmatch(r"`([^`]+)`", default)
        literal = value[1] if value and _is_toml_value(value[1]) else None
        assert key not in entries, f"{key} listed twice"
        entries[key] = Entry(literal, line)
    return entries


def readme_entries() -> dict[str, Entry]:
    return _markdown_table(_section(README.read_text(), "Configuration"))


def contract_entries() -> dict[str, Entry]:
    return _markdown_table(_section(CONTRACT.read_text(), "Configuration"))


_ROFF = {r"\-": "-", r"\(dq": '"', r"\(+-": "±", r"\(em": "—", r"\&": "", r"\ ": " "}


def _unroff(text: str) -> str:
    """The few roff escapes the man page uses, as the reader sees them."""
    text = re.sub(r"\\f[BIRP]", "", text)
    for escape, char in _ROFF.items():
        text = text.replace(escape, char)
    return text.replace(r"\e", "\\")


def _roff_args(line: str) -> list[str]:
    """The arguments of a macro line, as roff splits them (double quotes group)."""
    return [m[1] if m[1] is not None else m[2] for m in re.finditer(r'"([^"]*)"|(\S+)', line)]


def man_entries() -> dict[str, Entry]:
    """`.TP` items under `.SH CONFIGURATION`, grouped by `.SS [table]`; the tag is
    `.BR key " = value"`, or `.B key` for a key without a default."""
    page = MAN.read_text()
    match = re.search(r"^\.SH CONFIGURATION\n(.*?)(?=^\.SH )", page, re.M | re.S)
    assert match, "no CONFIGURATION section"
    entries: dict[str, Entry] = {}
    table = None
    lines = match[1].splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SS "):
            table = _unroff(" ".join(_roff_args(line[4:]))).strip("[]")
        elif line == ".TP" and table:
            tag = lines[i + 1]
            macro, _, args = tag.partition(" ")
            assert macro in (".B", ".BR"), f"unexpected tag {tag!r}"
            name, _, value = _unroff("".join(_roff_args(args))).partition(" = ")
            body = []
            for follow in lines[i + 1 :]:
                if follow.startswith((".TP", ".SS", ".SH", ".PP")) and body:
                    break
                body.append(follow)
            key = f"{table}.{name}"
            assert key not in entries, f"{key} listed twice"
            entries[key] = Entry(value or None, _unroff("\n".join(body)))
    return entries


def conffile_entries() -> dict[str, Entry]:
    """Every `key = value` line, set or commented out, under its [table] header, with the
    comment lines just above it."""
    entries: dict[str, Entry] = {}
    table = None
    above: list[str] = []
    for line in CONFFILE.read_text().splitlines():
        commented = line.startswith("#")
        text = line.lstrip("#").strip()
        header = re.match(r"\[([\w.]+)\]", text)
        if header:
            table = header[1]
            continue
        try:
            parsed = tomllib.loads(text)
        except ValueError:
            parsed = {}
        if len(parsed) != 1:
            above = [*above, line] if commented else []
            continue
        (name,) = parsed
        value = re.match(r"[\w]+\s*=\s*", text)
        assert value, line
        key = f"{table}.{name}"
        assert key not in entries, f"{key} listed twice"
        # The value is the text after '=' up to the comment: what TOML parsed.
        literal = text[value.end() :].split(" #")[0].strip()
        entries[key] = Entry(literal, "\n".join([*above, line]), commented)
        above = []
    return entries


DOCUMENTS = {
    "README.md": readme_entries,
    "docs/contract.md": contract_entries,
    "packaging/smocsd.1": man_entries,
    "conf/smocsd.toml": conffile_entries,
}


def _default_problems(entries: dict[str, Entry], *, examples: bool) -> list[str]:
    """Where `entries` disagree with the code. `examples`: a key without a default may
    show an example value, commented out (the conffile)."""
    problems = [f"{key}: missing" for key in KEYS.keys() - entries.keys()]
    problems += [
        f"{key}: no such key"
        for key in entries.keys() - KEYS.keys()
        if key.partition(".")[0] != FREE_FORM
    ]
    for key in KEYS.keys() & entries.keys():
        entry, f = entries[key], KEYS[key]
        if key in UNSET:
            if examples and entry.literal is not None and not entry.commented:
                problems.append(f"{key}: has no default, so it must be commented out")
            elif not examples and entry.literal is not None:
                problems.append(f"{key}: has no default, the document gives {entry.literal}")
            word = UNSET[key]
            if word and word not in entry.text:
                problems.append(f"{key}: does not say where its value comes from ({word!r})")
        elif entry.literal is None:
            problems.append(f"{key}: no default given (the code's is {f.default!r})")
        else:
            # Through the key's own parser, so that "10m" and 600, [32, 8] and (32, 8),
            # "auto" and None compare as the loader sees them.
            try:
                value = f.metadata["parse"](_toml_value(entry.literal))
            except ValueError as exc:
                problems.append(f"{key}: {entry.literal} is not a valid value: {exc}")
                continue
            if value != f.default:
                problems.append(f"{key}: {entry.literal}, the code's default is {f.default!r}")
        if key in OVERRIDES and OVERRIDES[key] not in entry.text:
            problems.append(f"{key}: does not name {OVERRIDES[key]}, which overrides it")
    return sorted(problems)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_key_is_documented_with_the_codes_default(document):
    entries = DOCUMENTS[document]()
    assert _default_problems(entries, examples=document.endswith(".toml")) == []


def test_the_entry_parsers_read_what_the_documents_write():
    """The parsers above, on the forms they must tell apart."""
    entries = _markdown_table(
        '| `a.b` | `"60s"` | x |\n| `a.c` | host name | x |\n| `a.d` | `rowid` | x |\n'
    )
    assert [entries[k].literal for k in ("a.b", "a.c", "a.d")] == ['"60s"', None, None]
    assert _unroff(r"\(dqif\-better\(dq") == '"if-better"'
    assert (
        "".join(_roff_args(r'check_interval " = \(dq60s\(dq"')) == r"check_interval = \(dq60s\(dq"
    )


def _mentioned_keys(text: str) -> set[str]:
    """Dotted names of config tables in `text` (`training.max_rows`, source.path)."""
    sections = "|".join(config._SECTIONS)
    return set(re.findall(rf"(?<![\w.])(?:{sections})(?:\.[a-z_]+)+\b", text))


@pytest.mark.parametrize("path", [README, CONTRACT, MAN, CONFFILE], ids=lambda p: p.name)
def test_no_document_names_a_key_the_code_lacks(path):
    text = _unroff(path.read_text()) if path == MAN else path.read_text()
    known = KEYS.keys() | TABLES | config.DEPRECATED.keys() | NOT_KEYS
    assert sorted(_mentioned_keys(text) - known) == []


# --- the generated parts: packaging/config_docs.py writes them from smocsd/common/config.py


def test_the_generated_key_documentation_is_current():
    """Each key's default, range and description live in smocsd/common/config.py only; the four
    documents carry what the generator makes of them, not an edit by hand."""
    stale = [str(path.relative_to(ROOT)) for path in config_docs.stale()]
    assert stale == [], f"regenerate them: {config_docs.COMMAND}"


def test_each_documented_value_is_what_the_parser_reads():
    """A default is written by its parser's `show`, and a key without one (KeyDoc.unset)
    gives an example for the conffile: each reads back through the key's own parser."""
    problems = []
    for key, f in KEYS.items():
        doc, parse = f.metadata["doc"], f.metadata["parse"]
        written = doc.example if doc.unset else parse.show(f.default)
        try:
            value = parse(_toml_value(written))
        except ValueError as exc:
            problems.append(f"{key}: {written!r}: {exc}")
            continue
        if doc.unset and f.default not in (None, ""):
            problems.append(f"{key}: says what holds when unset, but defaults to {f.default!r}")
        elif not doc.unset and value != f.default:
            problems.append(f"{key}: {written} reads as {value!r}, not {f.default!r}")
    assert problems == []


def test_the_man_page_formats_without_warnings():
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-Tutf8", str(MAN)], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stderr) == (0, "")


# --- the rest of the contract in docs/contract.md


def _cli(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple]:
    """(command path, its options) for the parser and every subcommand under it."""
    options = {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
        if option.startswith("--")
    }
    found = [(path, options)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _cli(sub, (*path, name))
    return found


def test_the_contract_covers_the_whole_command_line():
    text = CONTRACT.read_text()
    commands = _cli(cli._parser())
    assert len(commands) > 10
    for command, options in commands:
        assert " ".join(("smocsd", *command)) in text, command
        for option in options:
            assert option in text, (command, option)


def test_the_contract_gives_every_exit_code():
    table = _section(CONTRACT.read_text(), "Exit codes")
    for code in (cli.EX_OK, cli.EX_FAIL, cli.EX_USAGE, cli.EX_CONFIG):
        assert re.search(rf"^\| `{code}` \|", table, re.M), code


def _built_keys(path: Path, function: str) -> set[str]:
    """The string keys of the dict literal(s) that `function` in `path` builds, and of
    `name["key"] = ...` assignments in it: the fields of a message or of metadata.json."""
    tree = ast.parse(path.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    assert len(found) == 1, f"{path.name}: no single {function}()"
    keys = set()
    for node in ast.walk(found[0]):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.slice, ast.Constant)
        ):
            keys.add(node.slice.value)
    return keys


def _heading_section(markdown: str, fragment: str) -> str:
    """The text under the heading (any level) containing `fragment`, up to the next
    heading of the same or a higher level."""
    match = re.search(rf"^(#+) [^\n]*{re.escape(fragment)}[^\n]*\n", markdown, re.M)
    assert match, f"no heading with {fragment!r}"
    level = len(match[1])
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(markdown, match.end())
    return markdown[match.end() : end.start() if end else len(markdown)]


SMOCSD = ROOT / "smocsd"


@pytest.mark.parametrize(
    ("schema", "path", "function", "extra"),
    [
        (
            schemas.RESULT_SCHEMA,
            SMOCSD / "training" / "result.py",
            "message",
            {outbox.DROPPED_FIELD},
        ),
        (schemas.ALARM_SCHEMA, SMOCSD / "app" / "live.py", "message", {outbox.DROPPED_FIELD}),
        (schemas.LABEL_SCHEMA, SMOCSD / "common" / "labels.py", "message", {outbox.DROPPED_FIELD}),
        (schemas.MODEL_FORMAT, SMOCSD / "training" / "autoencoder.py", "_metadata", set()),
    ],
)
def test_the_contract_gives_every_field(schema, path, function, extra):
    """Every field the code writes into a message or metadata.json is described under
    the contract's heading that names its schema."""
    section = _heading_section(CONTRACT.read_text(), f"`{schema}`")
    missing = [k for k in sorted(_built_keys(path, function) | extra) if f"`{k}`" not in section]
    assert missing == []


@pytest.mark.parametrize("name", schemas.FILES)
def test_the_contract_names_every_schema_and_its_fields(name):
    """The JSON Schemas are the machine-readable half of the contract: each is listed
    with its file and $id, and each of its top-level fields is described."""
    text = CONTRACT.read_text()
    table = _section(text, "JSON Schemas")
    schema = schemas.load(name)
    for mention in (f"`{name}`", schemas.FILES[name], schema["$id"], "/usr/share/smocsd/schemas/"):
        assert mention in table, mention
    section = _heading_section(text, f"`{name}`")
    assert [k for k in schema["properties"] if f"`{k}`" not in section] == []


def test_the_contract_lists_every_metric_and_no_other(tmp_path):
    """The metrics as the daemon renders them with every condition met: a cycle, a
    current model, an outbox, live scoring."""
    cfg = config.parse("", env={"STATE_DIRECTORY": str(tmp_path)})
    version = tmp_path / "models/autoencoder/v000001"
    version.mkdir(parents=True)
    (version / "metadata.json").write_text(json.dumps(model_meta(b"")))
    (version.parent / "current").symlink_to(version.name)
    tally = metrics.Tally()
    tally.cycle_ended("autoencoder", result.Outcome.PROMOTED, 1.0)
    tally.scored("autoencoder", 0, False, False, scoring=True)
    scoring = SimpleNamespace(
        scorers={"autoencoder": SimpleNamespace(position=SimpleNamespace(event=None))},
        lag_rows=lambda name: 0,
    )
    box = outbox.Outbox(tmp_path / "outbox.db")
    try:
        snapshot = metrics.Metrics(cfg, tally).snapshot(lambda: box, scoring, [cfg])
        rendered = {s.name for f in snapshot.collect() for s in f.samples}
    finally:
        box.close()
    documented = set(
        re.findall(r"^\| `(smocsd_\w+)` \|", _section(CONTRACT.read_text(), "Metrics"), re.M)
    )
    assert len(rendered) >= 20
    assert sorted(rendered - documented) == []
    assert sorted(documented - rendered) == []


# --- links


def _without_code(markdown: str) -> str:
    """`markdown` without fenced blocks and code spans, where `[x](y)` is no link and
    `# x` no heading."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


def _anchors(markdown: str) -> set[str]:
    """The ids GitHub gives the headings: lowercased, punctuation but '-' and '_'
    dropped, spaces to '-', a repeated one suffixed -1, -2, ..."""
    anchors: set[str] = set()
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", text, re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def _links(markdown: str) -> list[str]:
    """Targets of inline links and images, `[text](target)` and `![alt](target)`, and of
    reference definitions, `[name]: target`."""
    text = _without_code(markdown)
    inline = re.findall(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return inline + re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.M)


def _ignored(path: Path) -> bool:
    """Whether git ignores `path` (a link into .venv or .state works here, not in a
    clone). False where there is no git or no repository, as in a source tarball."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], capture_output=True
        )
    except FileNotFoundError:
        return False
    return proc.returncode == 0


def _link_problem(document: Path, target: str) -> str | None:
    """Why `target`, linked from `document`, is not a file or heading of the repository."""
    if re.match(r"[a-zA-Z][\w+.-]*:", target) or target.startswith("//"):
        return "leaves the repository (a URL): link a file of the repository instead"
    file, _, anchor = target.partition("#")
    path = (document.parent / file).resolve() if file else document
    if not path.is_relative_to(ROOT):
        return "points outside the repository"
    if not path.exists():
        return "no such file"
    if _ignored(path):
        return "ignored by git: not in a clone"
    if anchor:
        if path.suffix != ".md":
            return "an anchor into a file that is not Markdown"
        if anchor not in _anchors(path.read_text()):
            return f"no heading #{anchor} in {path.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("document", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(document):
    links = _links(document.read_text())
    assert links, "no links found: is the link pattern still right?"
    problems = [
        f"{target}: {problem}"
        for target in links
        if (problem := _link_problem(document, target)) is not None
    ]
    assert problems == []


def test_the_link_checker_refuses_what_it_must():
    assert _links('[a](b.md) ![c](d.png "t") `[e](f)`\n```\n[g](h)\n```\n[i]: j.md\n') == [
        "b.md",
        "d.png",
        "j.md",
    ]
    assert _anchors("# A `b` c\n## A b c\n### Ünïcode, (x) & y_z\n") == {
        "a-b-c",
        "a-b-c-1",
        "ünïcode-x--y_z",
    }
    for target, problem in [
        ("../shared/DESIGN.md", "outside"),
        ("https://example.org/smocsd/README.md", "URL"),
        ("mailto:ops@example.org", "URL"),
        ("docs/nothing.md", "no such file"),
        ("#no-such-heading", "no heading"),
        ("docs/contract.md#no-such-heading", "no heading"),
        ("conf/smocsd.toml#x", "not Markdown"),
    ]:
        assert problem in (_link_problem(README, target) or ""), target
    assert _link_problem(README, "docs/contract.md#exit-codes") is None
