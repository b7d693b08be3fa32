"""docs/RELIABILITY.md names a test for every fault class: each one must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_test_named_in_the_reliability_table_exists():
    doc = (ROOT / "docs/RELIABILITY.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "::" in line]
    assert len(rows) >= 30
    missing = []
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row.rsplit("|", 2)[-2])
        assert named, f"a row without a test: {row}"
        for path, name in named:
            tree = ast.parse((ROOT / path).read_text())
            tests = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
            if name not in tests:
                missing.append(f"{path}::{name}")
    assert not missing, missing
