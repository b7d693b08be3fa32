"""kill -9 at any instant never leaves `current` broken or partial."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import smocsd, write_config

from smocsd.store import ModelStore


def assert_current_is_whole(models: Path) -> int | None:
    """`current` is absent or points at a complete version whose files match metadata.json."""
    store = ModelStore(models, 100)
    link = models / "current"
    if not os.path.lexists(link):
        return None
    version = store.current()
    assert version is not None, f"current -> {os.readlink(link)} is dangling"
    meta = json.loads((link / "metadata.json").read_text())
    assert meta["version"] == version
    for name, entry in meta["files"].items():
        data = (link / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
    return version


@pytest.fixture
def plant(plant):
    """conftest's plant, training 3 epochs."""
    state, _ = plant
    return state, write_config(state.parent / "smocsd.toml", state, training={"epochs": 3})


def test_kill_9_at_random_instants_of_train_once(plant):
    state, cfg = plant
    models = state / "models" / "autoencoder"
    rng = random.Random(1234)
    started = time.monotonic()
    smocsd("train-once", "--force", config=cfg, check=True)
    duration = time.monotonic() - started
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-m", "smocsd", "train-once", "--force", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, duration * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_current_is_whole(models)
    # the next run cleans up what the kills left and trains normally
    result = json.loads(smocsd("train-once", "--force", config=cfg, check=True).stdout)
    assert result["outcome"] in ("promoted", "rejected")
    assert not [p for p in models.iterdir() if p.name.startswith(".tmp-")]
    assert assert_current_is_whole(models) is not None


# sitecustomize for the training child, which saves the version: a fresh interpreter,
# so the counting wrappers are installed at start-up and count in that process only.
CRASH_AT = """
import multiprocessing, os, shutil
import smocsd.common.files as files
import smocsd.store as store
calls = {"n": 0}
crash_at = int(os.environ["CRASH_AT"])
def counted(fn):
    def wrapper(*a, **kw):
        if multiprocessing.current_process().name == "smocsd-cycle":
            calls["n"] += 1
            if calls["n"] == crash_at:
                os._exit(137)  # as abrupt as kill -9: no cleanup, no flush
        return fn(*a, **kw)
    return wrapper
# write_atomic's call (.last_version) and the store's own, which it imported by name.
files.fsync_path = store.fsync_path = counted(files.fsync_path)
store.os.rename = counted(os.rename)
store.os.replace = counted(os.replace)
store.os.symlink = counted(os.symlink)
store.shutil.rmtree = counted(shutil.rmtree)
"""


def test_a_crash_at_every_step_of_the_save_protocol(tmp_path, plant):
    """Dies right before each fsync, rename, symlink and delete of a save, in turn."""
    state, cfg = plant
    models = state / "models" / "autoencoder"
    cfg.write_text(cfg.read_text() + "\n[model]\nkeep_versions = 1\npromote = 'always'\n")
    smocsd("train-once", "--force", config=cfg, check=True)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASH_AT)
    step = 1
    while True:
        before = assert_current_is_whole(models)
        proc = smocsd(
            "train-once",
            "--force",
            config=cfg,
            env={"CRASH_AT": str(step), "PYTHONPATH": f"{site}:{Path(__file__).parent}"},
        )
        after = assert_current_is_whole(models)
        allocated = int((models / ".last_version").read_text())
        assert after in (before, allocated), (step, before, after)
        if proc.returncode == 0:
            break  # past the last step: the save completed
        error = json.loads(proc.stdout)["error"]
        assert error == "training process exited with status 137", proc.stderr
        step += 1
    assert step > 8  # every fsync, both renames, the symlink swap and the prune were crossed
