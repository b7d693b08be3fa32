"""The arm64 packages of Debian 12 and 13 (Raspberry Pi OS uses them) on each release's own
arm64 python3, under qemu-user: demo data, one cycle with backend auto, which must pick
numpy and score with the bundled plain onnxruntime, and scores equal to amd64's for the
same model.

Needs root, debootstrap, systemd-container and qemu-user-static with its binfmt_misc
registration (tests/provision); under CI (CI=true) a missing one fails instead of skipping.
There is no booted arm64 systemd here (qemu-user runs single programs, not a booted
system), so the unit's sandbox is proven on amd64 only (tests/test_systemd.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import smocsd, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packaging"))
import build_deb
import testbed

SMOCSD = ("/usr/bin/python3", "-I", "/usr/bin/smocsd", "--config", "/srv/smocsd/smocsd.toml")


@pytest.mark.parametrize("suite", testbed.SUITES)
def test_arm64_package_trains_and_scores_like_amd64(
    suite: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    missing = testbed.missing_tools("arm64")
    if missing:
        testbed.unavailable(f"arm64 testbed needs: {', '.join(missing)}")
    try:
        lower = testbed.rootfs("arm64", suite)
    except testbed.TestbedError as exc:
        testbed.unavailable(str(exc))
    deb = testbed.package(suite, "arm64", tmp_path_factory.getbasetemp() / "debs")
    python = build_deb.TARGETS[suite].python
    with testbed.overlay(lower) as root:
        subprocess.run(["dpkg-deb", "--extract", str(deb), str(root)], check=True)
        lib = root / build_deb.LIB
        # Plain onnxruntime only: no training wheel exists for aarch64.
        (ort,) = [p.stem.split("-")[1] for p in lib.glob("onnxruntime-*.dist-info")]
        assert not list(lib.glob("onnxruntime_training*"))
        state = root / "srv/smocsd"
        state.mkdir(parents=True)
        write_config(state / "smocsd.toml", Path("/srv/smocsd"), {"training": {"backend": "auto"}})

        proc = testbed.run_arm64(
            root, "/usr/bin/python3", "-c", "import platform; print(platform.machine())"
        )
        assert proc.stdout.strip() == "aarch64", proc
        proc = testbed.run_arm64(root, "/usr/bin/python3", "--version")
        assert proc.stdout.split()[1].startswith(f"{python}."), proc.stdout  # the target's
        proc = testbed.run_arm64(root, *SMOCSD, "demo", "--rows", "3000")
        assert proc.returncode == 0, proc.stderr
        proc = testbed.run_arm64(root, *SMOCSD, "train-once", "--force")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["outcome"] == "promoted", result
        meta = result["model_meta"]
        assert meta["backend"] == "numpy"
        assert meta["software"]["onnxruntime"] == ort
        assert (state / "models/autoencoder/current/model.onnx").is_file()

        proc = testbed.run_arm64(root, *SMOCSD, "score", "--json")
        assert proc.returncode == 0, proc.stderr
        arm = [json.loads(line) for line in proc.stdout.splitlines()]
        # The same model and readings scored here, on amd64, by the test venv's onnxruntime.
        host = write_config(tmp_path / "host.toml", state, {"training": {"backend": "auto"}})
        proc = smocsd("score", "--json", config=host, check=True)
        amd = [json.loads(line) for line in proc.stdout.splitlines()]

    assert len(arm) == len(amd) > 2000
    assert [r["order"] for r in arm] == [r["order"] for r in amd]
    a, b = (np.array([r["score"] for r in rows]) for rows in (arm, amd))
    # float32 kernels differ between NEON and AVX in the last bits, not more.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    flips = sum(x["anomalous"] != y["anomalous"] for x, y in zip(arm, amd, strict=True))
    assert flips <= len(arm) // 1000, flips
