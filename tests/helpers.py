"""Shared helpers for the tests of the core: small configs, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Small enough to train in a second or two, large enough to learn something.
FAST = {
    "training": {
        "window_size": 10,
        "min_training_samples": 2000,
        "min_new_samples": 500,
        "min_interval": 0,
        "max_rows": 4000,
        "epochs": 4,
        "batch_size": 64,
        "hidden": [16, 4],
    },
    "publish": {"order": []},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, state_dir: Path, sections: dict | None = None, **extra) -> Path:
    """A config file with FAST settings, `sections` merged over them."""
    merged: dict[str, dict] = {"daemon": {"state_dir": str(state_dir), "device_id": "gw-test"}}
    for source in (FAST, sections or {}, extra):
        for name, table in source.items():
            merged.setdefault(name, {}).update(table)
    lines = []
    for name, table in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def smocsd(
    *args: str,
    config: Path | None = None,
    check: bool = False,
    timeout: float = 120,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Runs `python -m smocsd ARGS` and captures its output."""
    cmd = [sys.executable, "-m", "smocsd", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    if config is not None:
        full_env.pop("SMOCSD_CONFIG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
