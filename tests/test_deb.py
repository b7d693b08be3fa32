"""The .deb packages: what they bundle, lintian, the unit's sandbox rating, the man page,
and the arm64 payload running under qemu-user in a Debian 12 arm64 rootfs.

Needs root, lintian, systemd (systemd-analyze), debootstrap, systemd-container and
qemu-user-static; under CI (CI=true) a missing one fails instead of skipping.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import write_config
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packaging"))
import build_deb
import testbed

REPO = build_deb.REPO

ARCHES = sorted(build_deb.ARCHES)
# Pulled in by dependencies' metadata but never imported by smocsd at run time; the
# systemd and qemu tests below run the daemon without them.
NEVER_BUNDLED = {"sympy", "h5py", "coloredlogs", "packaging", "psycopg-binary", "tabulate"}


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        testbed.unavailable(f"missing: {', '.join(missing)}")


@pytest.fixture(scope="module", params=ARCHES)
def deb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("dpkg-deb", "readelf")
    return testbed.package(request.param, tmp_path_factory.getbasetemp() / "debs")


def unpacked(deb: Path, dest: Path) -> Path:
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(dest)], check=True)
    return dest


def bundled(arch: str) -> dict[str, str]:
    return {
        canonicalize_name(name): version
        for name, version in (
            r.split("==") for r in (*build_deb.BUNDLE["all"], *build_deb.BUNDLE[arch])
        )
    }


@pytest.mark.parametrize("arch", ARCHES)
def test_bundle_has_every_runtime_dependency_of_pyproject(arch: str) -> None:
    """pyproject's dependencies that apply on Debian 12 (Python 3.11) for arch, at versions
    it allows; so a dependency added to smocsd cannot be forgotten in the package."""
    machine = build_deb.ARCHES[arch].machine
    env = {"platform_machine": machine, "python_version": build_deb.PYTHON}
    env |= {"platform_system": "Linux", "sys_platform": "linux", "implementation_name": "cpython"}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    have = bundled(arch)
    for req in map(Requirement, deps):
        if req.marker and not Marker(str(req.marker)).evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in have, f"{req} is not in build_deb.BUNDLE for {arch}"
        assert req.specifier.contains(have[name], prereleases=True), (req, have[name])
    assert not NEVER_BUNDLED & set(have)


def test_contents_control_and_conffile(deb: Path, tmp_path: Path) -> None:
    root = unpacked(deb, tmp_path / "x")
    for path in (
        "usr/bin/smocsd",
        "usr/lib/systemd/system/smocsd.service",
        "etc/smocsd/smocsd.toml",
        "usr/share/doc/smocsd/copyright",
        "usr/share/doc/smocsd/README.Debian",
        "usr/share/doc/smocsd/changelog.Debian.gz",
        "usr/share/doc/smocsd/examples/shared-sqlite.conf",
        "usr/share/doc/smocsd/examples/credentials.conf",
        "usr/share/man/man1/smocsd.1.gz",
        "usr/lib/smocsd/smocsd/cli.py",
    ):
        assert (root / path).is_file(), path
    assert (root / "etc/smocsd/smocsd.toml").read_text() == (REPO / "conf/smocsd.toml").read_text()
    assert (root / "DEBIAN/conffiles").read_text() == "/etc/smocsd/smocsd.toml\n"
    control = (root / "DEBIAN/control").read_text()
    assert "python3 (>= 3.11), python3 (<< 3.12)" in control
    top = {p.name.split("-")[0].lower() for p in (root / "usr/lib/smocsd").iterdir()}
    assert not {n.replace("-", "_") for n in NEVER_BUNDLED} & top, top
    assert not list(root.rglob("__pycache__")), "byte code is compiled by the postinst"


def test_elf_files_are_for_the_package_architecture(deb: Path, tmp_path: Path) -> None:
    arch = build_deb.ARCHES[deb.name.rsplit("_", 1)[1].removesuffix(".deb")]
    elves = list(build_deb.elf_files(unpacked(deb, tmp_path / "x")))
    assert len(elves) > 20  # numpy, onnxruntime, onnx, confluent-kafka, protobuf
    wrong = [p for p in elves if build_deb.elf_machine(p) != arch.elf_machine]
    assert not wrong, wrong


def test_lintian_reports_no_error_or_warning(deb: Path) -> None:
    need("lintian")
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--pedantic", str(deb)],
        capture_output=True,
        text=True,
    )
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWP]: ", line)]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_unit_exposure_is_at_most_2() -> None:
    need("systemd-analyze")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(REPO / "systemd/smocsd.service")],
        capture_output=True,
        text=True,
    )
    level = re.search(r"Overall exposure level for smocsd.service: (\d+\.\d)", proc.stdout)
    assert level, proc.stdout + proc.stderr
    assert float(level.group(1)) <= 2.0, proc.stdout


def _cli_help(*command: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "smocsd", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _commands(*command: str) -> list[tuple[tuple[str, ...], set[str]]]:
    """(command path, its --options) for command and every subcommand under it."""
    text = _cli_help(*command)
    found = [(command, set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)))]
    for sub in re.findall(r"^    ([a-z][\w-]*)", text, re.M):
        found += _commands(*command, sub)
    return found


def test_man_page_covers_the_whole_cli() -> None:
    page = (REPO / "packaging/smocsd.1").read_text()
    page = re.sub(r"\\f[BIR]", "", page).replace("\\-", "-").replace('"', "")
    commands = _commands()
    assert len(commands) > 10
    for command, options in commands:
        assert " ".join(command) in page, command
        for option in options:
            assert option in page, (command, option)


def test_arm64_payload_trains_under_qemu(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The arm64 package's files on Debian 12 arm64's own python3: demo data, then one
    cycle with backend auto, which must pick numpy and score with plain onnxruntime."""
    missing = testbed.missing_tools("arm64")
    if missing:
        testbed.unavailable(f"arm64 testbed needs: {', '.join(missing)}")
    deb = testbed.package("arm64", tmp_path_factory.getbasetemp() / "debs")
    try:
        lower = testbed.rootfs("arm64")
    except testbed.TestbedError as exc:
        testbed.unavailable(str(exc))
    with testbed.overlay(lower) as root:
        subprocess.run(["dpkg-deb", "--extract", str(deb), str(root)], check=True)
        state = root / "srv/smocsd"
        state.mkdir(parents=True)
        write_config(state / "smocsd.toml", Path("/srv/smocsd"), {"training": {"backend": "auto"}})
        smocsd = (
            "/usr/bin/python3",
            "-I",
            "/usr/bin/smocsd",
            "--config",
            "/srv/smocsd/smocsd.toml",
        )

        proc = testbed.run_arm64(
            root, "/usr/bin/python3", "-c", "import platform; print(platform.machine())"
        )
        assert proc.stdout.strip() == "aarch64", proc
        proc = testbed.run_arm64(root, *smocsd, "demo", "--rows", "3000")
        assert proc.returncode == 0, proc.stderr
        proc = testbed.run_arm64(root, *smocsd, "train-once", "--force")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["outcome"] == "promoted", result
        assert result["model_meta"]["backend"] == "numpy"
        assert result["model_meta"]["software"]["onnxruntime"] == "1.19.2"
        assert (state / "models/autoencoder/current/model.onnx").is_file()
