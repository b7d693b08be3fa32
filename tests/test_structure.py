"""The import rules that keep each part lean and replaceable, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import write_config

PACKAGE = Path(__file__).resolve().parent.parent / "smocsd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_by(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (a function's, TYPE_CHECKING's), as
    absolute names; `from m import x` counts as m and as m.x (x may be a module)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_by(p) for p in sorted(PACKAGE.rglob("*.py"))}


def of_smocsd(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names for p in prefixes if n == p or n.startswith(f"{p}.")}


def test_no_part_imports_the_daemon() -> None:
    """The daemon composes the parts; only the command line starts it."""
    imports = graph()
    assert "smocsd.daemon" in imports["smocsd.cli"]  # the parse sees lazy imports
    importers = {m for m, names in imports.items() if of_smocsd(names, "smocsd.daemon")}
    assert importers == {"smocsd.cli"}


def test_the_trainers_import_nothing_else_of_smocsd() -> None:
    """The training backends take arrays and a spec: they know no config, store or job."""
    trainers = {m: names for m, names in graph().items() if of_smocsd({m}, "smocsd.trainers")}
    assert "smocsd.trainers.numpy" in trainers
    assert of_smocsd(trainers["smocsd.trainers.numpy"], "smocsd.trainers")  # they are seen
    for module, names in trainers.items():
        outside = of_smocsd(names, "smocsd") - of_smocsd(names, "smocsd.trainers")
        assert not outside, f"{module} imports {sorted(outside)}"


def test_smocsd_score_loads_no_broker_client(tmp_path: Path) -> None:
    """`smocsd score` scores; it sends nothing, so it must not pay for the Kafka and MQTT
    clients (a schema name used to bring them in through publish.py)."""
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state")
    code = (
        "import sys\n"
        "from smocsd.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(status, sorted(loaded & {'confluent_kafka', 'paho', 'numpy'}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "score", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # No model yet: the command fails after its imports (numpy: they were made).
    assert "no current model" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "1 ['numpy']", proc.stderr
