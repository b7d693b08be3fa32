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
    assert "smocsd.app.daemon" in imports["smocsd.app.cli"]  # the parse sees lazy imports
    importers = {m for m, names in imports.items() if of_smocsd(names, "smocsd.app.daemon")}
    assert importers == {"smocsd.app.cli"}


def test_the_trainers_import_nothing_else_of_smocsd() -> None:
    """The training backends take arrays and a spec: they know no config, store or job."""
    trainers = {
        m: names for m, names in graph().items() if of_smocsd({m}, "smocsd.training.trainers")
    }
    assert "smocsd.training.trainers.numpy" in trainers
    assert of_smocsd(
        trainers["smocsd.training.trainers.numpy"], "smocsd.training.trainers"
    )  # they are seen
    for module, names in trainers.items():
        outside = of_smocsd(names, "smocsd") - of_smocsd(names, "smocsd.training.trainers")
        assert not outside, f"{module} imports {sorted(outside)}"


def test_smocsd_score_loads_no_broker_client(tmp_path: Path) -> None:
    """`smocsd score` scores; it sends nothing, so it must not pay for the Kafka and MQTT
    clients (a schema name used to bring them in through publish.py)."""
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state")
    code = (
        "import sys\n"
        "from smocsd.app.cli import main\n"
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


# --- the layering: the folders are the parts, and imports only run down or sideways

# What each part may import besides itself. The models and scoring are the package's own
# modules (smocsd.store, smocsd.scoring, smocsd.report: the paths a user's job imports);
# smocsd.schemas, the messages' schema names, is common.
MAY_IMPORT = {
    "common": set(),
    "data": {"common"},
    "delivery": {"common"},
    "models": {"common", "data"},
    "training": {"common", "data", "models"},
    "app": {"common", "data", "delivery", "models", "training"},
}
ENTRY = {"smocsd", "smocsd.__main__"}  # __version__ and the public names; python -m smocsd


def part_of(module: str) -> str:
    name = module.split(".")
    if name[:2] == ["smocsd", "schemas"]:
        return "common"
    if len(name) > 2 or (PACKAGE / name[1]).is_dir():
        return name[1]
    return "models"


def modules_of(names: set[str], known: set[str]) -> set[str]:
    """The smocsd modules among `names` (`m.x` is module m when x is not one)."""
    found = set()
    for name in of_smocsd(names, "smocsd"):
        while name not in known:
            name = name.rpartition(".")[0]
        found.add(name)
    return found


def test_every_module_is_in_a_part() -> None:
    """A new module goes into a part's folder, or beside the models and scoring."""
    for module in set(graph()) - ENTRY:
        assert part_of(module) in MAY_IMPORT, f"{module}: in no part {sorted(MAY_IMPORT)}"
    models = {m for m in graph() if m not in ENTRY and part_of(m) == "models"}
    assert models == {"smocsd.modelfile", "smocsd.report", "smocsd.scoring", "smocsd.store"}


def test_imports_run_only_down_the_parts() -> None:
    """common at the bottom, data and delivery on it, the models and scoring on data,
    training on the models, the service (smocsd.app) on top; no import runs back up."""
    imports = graph()
    assert "smocsd.training.hooks" in imports["smocsd.app.child"]  # the parse sees them
    wrong = []
    for module, names in imports.items():
        if module in ENTRY:
            continue
        for target in modules_of(names, set(imports)) - ENTRY:
            if part_of(target) not in MAY_IMPORT[part_of(module)] | {part_of(module)}:
                wrong.append(f"{module} ({part_of(module)}) imports {target} ({part_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_package_itself_imports_only_the_public_job_api() -> None:
    """`import smocsd` (every part's `from .. import __version__`) loads TrainingJob and
    Saved, nothing that pulls in a part's dependencies."""
    imports = graph()
    assert modules_of(imports["smocsd"], set(imports)) == {"smocsd.training.job"}
    assert modules_of(imports["smocsd.__main__"], set(imports)) == {"smocsd.app.cli"}
