"""`pip install .` on the lowest and the highest Python smocsd supports, then the installed
`smocsd` command trains, scores and reports its backend.

Why: the .deb runs on Debian 12's Python 3.11 and the test suite on whatever `.venv` has,
but a source install may meet any Python from 3.10 (requires-python) to 3.13, and there
the dependencies differ: 3.10 needs tomli and a numpy that still supports it; 3.13 has no
onnxruntime-training wheel, so the numpy backend trains and plain onnxruntime scores.
3.11 and 3.12 lie between the two and are not installed here (too slow for what they would
add); what pyproject's markers pick for every Python and machine is checked without PyPI.

The interpreters come from pyenv on the CI image; a missing one skips the test, and fails
it under CI=true. Each case builds a venv and installs from PyPI (pip's cache makes a rerun
take 10-13 s a case); the build runs in a copy of the sources, so that setuptools' build/ and
*.egg-info are not left in the repository.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import find_python, write_config
from packaging.requirements import Requirement  # pytest's own dependency

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
# What `pip install .` reads: the package, its metadata, and the readme the metadata names.
SOURCES = ("smocsd", "pyproject.toml", "README.md")
# onnxruntime-training-cpu 1.19.2 has wheels for x86_64 Linux, cp310-cp312 only.
TRAINING_WHEEL = platform.system() == "Linux" and platform.machine() == "x86_64"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree's sources, as `pip install .` would read them."""
    root = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, root / name)
    return root


@pytest.mark.parametrize(
    ("version", "backend"),
    [("3.10", "ort" if TRAINING_WHEEL else "numpy"), ("3.13", "numpy")],
)
def test_pip_install_from_source_trains_and_scores(
    tmp_path: Path, sources: Path, version: str, backend: str
) -> None:
    python = find_python(version)
    if python is None:
        reason = f"no Python {version} (python{version} on PATH, or pyenv's)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

    state = tmp_path / "state"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SMOCSD_CONFIG")},
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "STATE_DIRECTORY": str(state),
    }
    venv = tmp_path / "venv"

    def run(*cmd: str | Path, timeout: float = 120) -> str:
        # cwd: not the repository, whose smocsd/ would shadow the installed one
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout
        )
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    run(python, "-m", "venv", venv)
    # Not editable: the installed copy is what runs, as on a gateway. --no-compile: byte-
    # compiling sympy, numpy and onnx is half the install's time, and each runs a few times.
    run(venv / "bin/python", "-m", "pip", "install", "-q", "--no-compile", sources, timeout=600)
    run(venv / "bin/python", "-m", "pip", "check")
    where = run(venv / "bin/python", "-c", "import smocsd; print(smocsd.__file__)")
    assert where.startswith(str(venv / "lib")), where

    def smocsd(*args: str) -> str:
        return run(venv / "bin/smocsd", "--config", config, *args)

    config = write_config(tmp_path / "smocsd.toml", state)
    smocsd("demo", "--rows", "3000")
    result = json.loads(smocsd("train-once", "--force"))
    assert result["outcome"] == "promoted", result
    meta = json.loads((state / "models/autoencoder/v000001/metadata.json").read_text())
    assert (meta["backend"], meta["software"]["python"].rsplit(".", 1)[0]) == (backend, version)

    # Scoring needs only an InferenceSession: the training build's on 3.10 x86_64, the
    # plain onnxruntime wheel's on 3.13.
    rows = [json.loads(line) for line in smocsd("score", "--from", "2901", "--json").splitlines()]
    assert rows and rows[-1]["order"] == 3000
    assert all(math.isfinite(r["score"]) and isinstance(r["anomalous"], bool) for r in rows)

    status = json.loads(smocsd("status", "--json"))
    assert (status["current_version"], status["training_backend"]) == (1, backend)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_dependency_markers_pick_one_onnxruntime(python: str, machine: str) -> None:
    """Both ONNX Runtime wheels own the `onnxruntime` package: exactly one per platform, the
    training build where its wheel exists, with the onnx its artifacts load; and nothing
    pins a version that has no wheel for that Python (ORT < 1.20, onnx < 1.18 on 3.13)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "platform_machine": machine,
        "platform_system": "Linux",
        "sys_platform": "linux",
    }
    picked = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            assert req.name not in picked, f"{req.name} twice for {env}"
            picked[req.name] = req.specifier
    minor = int(python.split(".")[1])
    training = machine == "x86_64" and minor < 13
    runtimes = {"onnxruntime", "onnxruntime-training-cpu"} & picked.keys()
    assert runtimes == {"onnxruntime-training-cpu" if training else "onnxruntime"}
    if training:
        assert (str(picked["onnxruntime-training-cpu"]), str(picked["onnx"])) == (
            "==1.19.2",
            "==1.17.0",
        )
    elif minor >= 13:
        assert not picked["onnxruntime"].contains("1.19.2") and "1.20" in picked["onnxruntime"]
        assert not picked["onnx"].contains("1.17.0") and "1.18" in picked["onnx"]
    assert ("tomli" in picked) == (minor < 11)
