"""contrib/prometheus/smocsd.rules.yml, the alerting rules an operator loads as they are.

Debian's promtool (package prometheus) checks them and runs their unit tests
(smocsd.rules.test.yml), which must show each alert both firing and silent. Those tests
feed hand-made series, so a rule could pass them over a metric or label the daemon does
not write and never fire on a gateway: the last test reads the names and labels the
rules use against a metrics file a real daemon wrote. Without promtool the first two
skip, under CI (CI=true) they fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import Running, write_config
from services import free_port

from smocsd.data import demo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
import testbed  # noqa: E402 - a development tool, not part of the package

RULES = ROOT / "contrib/prometheus/smocsd.rules.yml"
UNIT_TESTS = RULES.with_name("smocsd.rules.test.yml")
WAIT = 90.0  # generous: the suite runs on a loaded 2-core machine

# Labels every series gets from its scrape, whatever the file says.
SCRAPE_LABELS = {"instance", "job"}
# The one metric the rules read from node_exporter itself, with the label they use.
NODE_EXPORTER = {"node_textfile_mtime_seconds": {"file"}}
# The families a daemon writes last: once live scoring has caught up and polled its table.
LAST = ("smocsd_scoring_lag_rows", "smocsd_scoring_lag_seconds")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool's output; a missing promtool skips the test (fails it under CI)."""
    found = shutil.which("promtool")
    if found is None:
        testbed.unavailable("promtool not found (Debian's prometheus package: tests/provision)")
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=120)


def alerts(rules: str) -> dict[str, str]:
    """Each alert's rule as text, its comments left out: {alert name: rule}."""
    text = "\n".join(line for line in rules.splitlines() if not line.lstrip().startswith("#"))
    blocks = re.split(r"^\s*- alert: ", text, flags=re.M)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def test_promtool_checks_the_rules():
    found = promtool("check", "rules", str(RULES))
    assert found.returncode == 0, found.stdout + found.stderr
    assert f"SUCCESS: {len(alerts(RULES.read_text()))} rules found" in found.stdout


def test_every_alert_fires_and_stays_silent_where_its_unit_tests_say():
    found = promtool("test", "rules", str(UNIT_TESTS))
    assert found.returncode == 0, found.stdout + found.stderr
    # Each alert has a case where it fires and one where it must not, so that neither a
    # rule that never fires nor one that always does passes.
    cases = re.findall(r"alertname: (\S+)\n\s*exp_alerts:(.*)", UNIT_TESTS.read_text())
    for name in alerts(RULES.read_text()):
        silent = {expected.strip() == "[]" for alert, expected in cases if alert == name}
        assert silent == {True, False}, f"{name}: a unit test firing and one silent needed"


@dataclass
class Family:
    """What a metrics file says of one metric: its label names and their values."""

    labels: dict[str, set[str]] = field(default_factory=dict)


_SAMPLE = re.compile(r"(?P<name>\w+)(?:\{(?P<labels>.*)\})? \S+")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def families(text: str) -> dict[str, Family]:
    """The metrics of a file in the text format: {name: Family}."""
    found: dict[str, Family] = {}
    for line in text.splitlines():
        sample = _SAMPLE.fullmatch(line)
        if sample is None:
            assert line.startswith("# "), f"not a sample: {line!r}"
            continue
        family = found.setdefault(sample["name"], Family())
        for label, value in _LABEL.findall(sample["labels"] or ""):
            family.labels.setdefault(label, set()).add(value)
    return found


def written_by_a_daemon(tmp_path: Path) -> str:
    """The metrics file of a daemon that trained v1, scores live and cannot deliver (no
    broker listens): every family there is, each model metric with its `model`."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    textfile = tmp_path / "prom" / "smocsd.prom"
    textfile.parent.mkdir()
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        daemon={"check_interval": "1h"},
        scoring={"enabled": True},
        metrics={"textfile": str(textfile)},
        publish={"order": ["mqtt"]},
        **{"publish.mqtt": {"host": "127.0.0.1", "port": free_port()}},
    )
    last = [re.compile(rf"^{name}{{", re.M) for name in LAST]
    d = Running(cfg, tmp_path / "log")
    try:
        deadline = time.monotonic() + WAIT
        while True:
            text = textfile.read_text() if textfile.exists() else ""
            if all(p.search(text) for p in last):
                break
            assert d.proc.poll() is None, f"daemon exited:\n{d.text()}"
            assert time.monotonic() < deadline, f"no {LAST} after {WAIT:.0f}s:\n{d.text()}"
            time.sleep(0.2)
        assert d.stop() == 0
    finally:
        d.close()
    return text


def test_the_rules_name_only_metrics_and_labels_the_daemon_writes(tmp_path):
    real = families(written_by_a_daemon(tmp_path))
    rules = alerts(RULES.read_text())
    assert rules, f"no alert found in {RULES}"
    # Also the names in comments and annotations: an operator is told to look at them.
    for name in set(re.findall(r"\bsmocsd_[a-z_]+\b", RULES.read_text())):
        assert name in real, f"{RULES.name}: {name} is no metric smocsd writes"
    matched = grouped = 0
    for alert, rule in rules.items():
        used = set(re.findall(r"\b(?:smocsd|node)_[a-z_]+\b", rule))
        unknown = used - set(real) - set(NODE_EXPORTER)
        assert not unknown, (
            f"{alert}: {sorted(unknown)} written by neither smocsd nor node_exporter"
        )
        # The labels its result may carry: the scrape's and those of the metrics it reads.
        known = set(SCRAPE_LABELS)
        for name in used:
            known |= set(real[name].labels) if name in real else NODE_EXPORTER[name]
        for name, matchers in re.findall(r"\b(\w+)\{([^}]*)\}", rule):
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                matched += 1
                if name in NODE_EXPORTER:
                    assert label in NODE_EXPORTER[name], f"{alert}: {name}{{{label}}}"
                    continue
                values = real[name].labels.get(label, set())
                assert values, f"{alert}: {name} has no label {label!r}"
                if op == "=":
                    assert value in values, f"{alert}: {name}{{{label}={value!r}}}: {values}"
        lists = re.findall(
            r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", rule
        )
        named = {label.strip() for names in lists for label in names.split(",") if label.strip()}
        grouped += len(named)
        named |= set(re.findall(r"\$labels\.(\w+)", rule))
        assert named <= known, f"{alert}: labels {sorted(named - known)} are on none of {used}"
    # The patterns above still find what the rules hold.
    assert matched and grouped, (matched, grouped)
