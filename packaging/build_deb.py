#!/usr/bin/env python3
"""Build one smocsd .deb per distribution release and architecture, on any Linux host.

    python3 packaging/build_deb.py [--target CODENAME|all] [amd64|arm64|all] [--out DIR]
                                   [--version V] [--fast]

writes DIR/<codename>/smocsd_<version><suffix>_<arch>.deb (DIR defaults to dist/; one
folder per codename, as an apt repository tool takes them) for each release in TARGETS
(Debian 12 bookworm, Debian 13 trixie, Ubuntu 22.04 jammy, Ubuntu 24.04 noble; Raspberry
Pi OS uses Debian's packages) and each architecture in ARCHES, then prints one table of
their sizes.

Why one package per release, and not one per architecture for all of them: the Python
dependencies are bundled as manylinux wheels, and numpy, onnx, onnxruntime and
confluent-kafka publish one build per CPython version (cp310..cp313), none as abi3; so a
package either carries the wheels of one Python, which ties it to the release whose
/usr/bin/python3 that is, or of all four. A "fat" per-architecture package with per-Python
wheel sets was measured at 3x the installed size of one of these. Each release's package
instead carries exactly its Python's wheels, and its Depends name what that release ships
(python3 within one minor version, its glibc, its systemd).

The wheels are downloaded by pip (`--platform`/`--python-version`/`--only-binary`, only
platform tags the release's glibc runs: manylinux_2_17 up to manylinux_2_<glibc_minor>),
cached per Python version and architecture under ~/.cache/smocsd-build, from the explicit
pins in BUNDLE and Target.pins, each with `--no-deps`: only what smocsd imports at run time
goes in, so onnxruntime-training's sympy, h5py, packaging, coloredlogs... stay out. They
are installed with smocsd's own sources under /usr/lib/smocsd, so the package installs
without network. The training backend follows the platform: ONNX Runtime's training wheel
exists for x86_64 and Python <= 3.12 only; everywhere else the numpy backend trains and
plain onnxruntime scores (backend()).

The systemd unit is shipped as systemd/smocsd.service where the release's systemd knows
every directive in it (per SYSTEMD_DIRECTIVES and SYSTEMD_FORMS); lines it does not know
are left out, with a comment saying what to do instead (unit_for()).
"""

# What comes from Debian's tools, and why the rest is this file's own code:
# - dpkg-gencontrol writes DEBIAN/control (gencontrol()): the Version from the changelog's
#   top entry, the Architecture, the Installed-Size counted over the package tree, the
#   relation fields parsed. dpkg-deb builds the archive.
# - lintian checks each package (tests/test_deb.py): ELF files of another architecture, the
#   md5sums, permissions, the changelog, the man page; nothing here checks those again.
# - dpkg-shlibdeps is not used: it reads the shlibs and symbols files of the build host's
#   dpkg database, so it knows only the host's release and architecture (why at
#   SONAME_PACKAGES). The Depends are computed here (library_depends(), depends()).
# - No tool knows what else a bundle of wheels must fit: the release's Python and glibc
#   (check_payload()) and its systemd (unit_for()). The Debian changelog is rendered from
#   CHANGELOG.md (packaging/changelog.py), as no source package (debian/changelog) exists;
#   the md5sums are written here, as dh_md5sums would bring debhelper and a source tree.

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import changelog

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LIB = "usr/lib/smocsd"
UNIT = REPO / "systemd" / "smocsd.service"
SCHEMAS = "usr/share/smocsd/schemas"
PROMETHEUS_RULES = "prometheus/smocsd.rules.yml"  # under contrib/ and the doc's examples/


@dataclass(frozen=True)
class Arch:
    deb: str  # Debian architecture name
    machine: str  # manylinux platform suffix, as uname -m says


ARCHES = {
    "amd64": Arch("amd64", "x86_64"),
    "arm64": Arch("arm64", "aarch64"),
}


@dataclass(frozen=True)
class Target:
    """A distribution release that gets its own package."""

    codename: str  # "bookworm"
    name: str  # "Debian 12"
    python: str  # its /usr/bin/python3: the wheels' cpXY ABI ties the package to it
    glibc_minor: int  # its glibc 2.N: every manylinux_2_M wheel with M <= N runs there
    suffix: str  # appended to the package version: ordered by release, below a plain one
    systemd: int  # its systemd's version: the unit may use nothing newer
    pins: tuple[str, ...]  # the wheels that differ between Python versions
    # The versions of the packages the .deb depends on that the release ships, so the
    # Depends: can be checked against them (tests/test_deb.py); every dependency must be here.
    known: dict[str, str] = field(hash=False, repr=False)

    @property
    def python_minor(self) -> int:
        return int(self.python.split(".")[1])

    @property
    def cpython_tag(self) -> str:
        return "cp" + self.python.replace(".", "")


# Wheels whose build or version depends on the Python version. Each pin is checked with
# `pip download --python-version X.Y`, which refuses wheels whose Requires-Python excludes it.
PINS_PY310 = (
    "numpy==2.2.6",  # numpy >= 2.3 needs Python >= 3.11
    "onnx==1.17.0",
    "tomli==2.5.0",  # smocsd.common.config imports it where tomllib (3.11) is absent
    "python-dateutil==2.9.0.post0",  # 4.x needs Python >= 3.11; 2.9 imports six
    "six==1.17.0",
)
PINS_PY311 = ("numpy==2.4.6", "onnx==1.17.0", "python-dateutil==4.0.0")
# onnx 1.17.0 has no cp313 wheels; 1.18.0 is the lowest with them. It stamps a newer IR
# version by default, which ORT 1.19 (the training wheel) could not load; Python 3.13 gets
# plain ORT 1.20.1 only, and smocsd/training/trainers/graph.py sets its graph's ir_version itself.
PINS_PY313 = ("numpy==2.4.6", "onnx==1.18.0", "python-dateutil==4.0.0")

# Known package versions of each release: Debian's from `apt-cache madison` on a Debian 12
# host (bookworm, bookworm-updates, bookworm-security; trixie's lists read through a
# scratch sources.list with `apt-get -o Dir::Etc::sourcelist=...`) on 2026-11-28: the
# current point release's, which a gateway has after `apt upgrade`. No Ubuntu mirror is
# reachable from here: Ubuntu's are from knowledge of the release pockets (jammy, noble,
# before -updates), NOT verified with apt; only their systemd versions agree with a
# source seen here, manpages.ubuntu.com ("Provided by: systemd_249.11-0ubuntu3.12_amd64",
# "systemd_255.4-1ubuntu8.4_amd64": -updates builds of the same upstream versions).
TARGETS: dict[str, Target] = {
    "bookworm": Target(
        codename="bookworm",
        name="Debian 12",
        python="3.11",
        glibc_minor=36,
        suffix="~deb12",
        systemd=252,
        pins=PINS_PY311,
        known={
            "python3": "3.11.2-1+b1",
            "libc6": "2.36-9+deb12u14",
            "init-system-helpers": "1.65.2+deb12u1",
            "systemd": "252.39-1~deb12u2",
            "libpq5": "15.18-0+deb12u1",
            "adduser": "3.134",
            "procps": "2:4.0.2-3",
            "libstdc++6": "12.2.0-14+deb12u1",
            "libgcc-s1": "12.2.0-14+deb12u1",
            "zlib1g": "1:1.2.13.dfsg-1",
        },
    ),
    "trixie": Target(
        codename="trixie",
        name="Debian 13",
        python="3.13",
        glibc_minor=41,
        suffix="~deb13",
        systemd=257,
        pins=PINS_PY313,
        known={
            "python3": "3.13.5-1",
            "libc6": "2.41-12+deb13u5",
            "init-system-helpers": "1.69~deb13u1",
            "systemd": "257.13-1~deb13u1",
            "libpq5": "17.12-0+deb13u1",
            "adduser": "3.152",
            "procps": "2:4.0.4-9",
            "libstdc++6": "14.2.0-19",
            "libgcc-s1": "14.2.0-19",
            "zlib1g": "1:1.3.dfsg+really1.3.1-1+deb13u1",
        },
    ),
    "jammy": Target(
        codename="jammy",
        name="Ubuntu 22.04",
        python="3.10",
        glibc_minor=35,
        suffix="~ubuntu22.04",
        systemd=249,
        pins=PINS_PY310,
        known={  # from knowledge, not verified with apt (see above)
            "python3": "3.10.6-1~22.04",
            "libc6": "2.35-0ubuntu3",
            "init-system-helpers": "1.62",
            "systemd": "249.11-0ubuntu3",
            "libpq5": "14.2-1ubuntu1",
            "adduser": "3.118ubuntu5",
            "procps": "2:3.3.17-6ubuntu2",
            "libstdc++6": "12-20220319-1ubuntu1",
            "libgcc-s1": "12-20220319-1ubuntu1",
            "zlib1g": "1:1.2.11.dfsg-2ubuntu9",
        },
    ),
    "noble": Target(
        codename="noble",
        name="Ubuntu 24.04",
        python="3.12",
        glibc_minor=39,
        suffix="~ubuntu24.04",
        systemd=255,
        pins=PINS_PY311,  # the same pins have cp312 wheels
        known={  # from knowledge, not verified with apt (see above)
            "python3": "3.12.3-0ubuntu1",
            "libc6": "2.39-0ubuntu8",
            "init-system-helpers": "1.66ubuntu1",
            "systemd": "255.4-1ubuntu8",
            "libpq5": "16.2-1ubuntu4",
            "adduser": "3.137ubuntu1",
            "procps": "2:4.0.4-4ubuntu3",
            "libstdc++6": "14-20240412-0ubuntu1",
            "libgcc-s1": "14-20240412-0ubuntu1",
            "zlib1g": "1:1.3.dfsg-3.1ubuntu2",
        },
    ),
}

# Exactly what smocsd imports at run time, besides Target.pins (tests/test_systemd.py runs
# the daemon on only these; tests/test_arm64.py runs the arm64 payloads). Versions are the
# ones the test suite runs.
BUNDLE: dict[str, tuple[str, ...]] = {
    "all": (
        "protobuf==7.36.2",  # onnx's model format (cp310-abi3)
        "threadpoolctl==3.8.0",  # the numpy trainer caps BLAS threads with it
        "confluent-kafka==2.16.1",  # bundles librdkafka
        "paho-mqtt==2.2.0",
        "prometheus-client==0.26.0",  # writes the metrics file (py3-none-any)
        # psycopg without psycopg-binary: it loads the release's libpq5 (Depends:), which
        # gets its security updates and costs ~0 bytes here instead of ~10 MB per package.
        "psycopg==3.3.9",
        # imported by psycopg on Python < 3.13, by confluent-kafka on < 3.11, and required
        # by onnx 1.18
        "typing_extensions==4.16.0",
        # `smocsd demo` writes through sqlite-utils; these are what importing it loads
        # (its CLI-only click-default-group and tabulate are left out).
        "sqlite-utils==4.2.1",
        "click==8.5.1",
        "pluggy==1.7.0",
        "sqlite-fts4==1.0.3",
    ),
    # On-device training API, where its wheel exists (x86_64, cp38..cp312). Its other
    # dependencies (sympy, packaging, coloredlogs) are not imported by it at run time;
    # flatbuffers is, by onnxruntime.training.artifacts.
    "ort-training": ("onnxruntime-training-cpu==1.19.2", "flatbuffers==25.12.19"),
    # Elsewhere plain ORT scores and the numpy backend trains. Not newer: `import
    # onnxruntime` of 1.32 segfaults under qemu-aarch64 7.2 (tests/test_arm64.py); 1.20.1
    # has cp310..cp313 manylinux_2_27 wheels for x86_64 and aarch64.
    "ort": ("onnxruntime==1.20.1",),
}

# Never imported at run time: the wheels' test suites (a third of the payload), numpy's
# build-time distutils (Python < 3.12 only; it comes with a __pycache__ of its own) and byte
# code in general (the postinst compiles it for the release's python3).
PRUNE = ("onnx/backend/test", "numpy/**/tests", "numpy/distutils", "bin", "**/__pycache__")

# Shared libraries the wheels link against but do not bundle -> the Debian package that has
# them. A NEEDED entry found neither here nor among the bundled files fails the build.
# Not dpkg-shlibdeps: it finds each library's package and minimum version in the shlibs and
# symbols files of the build host's dpkg database, which has them for the host's release and
# architecture only. Tried on a bookworm amd64 host: for arm64 it fails ("cannot find
# library libc.so.6 needed by .../cimpl.cpython-311-aarch64-linux-gnu.so"), and for trixie,
# jammy and noble it answers from bookworm's files; it would fit one package of eight.
# Without symbols files the libc6 version comes from the wheels' manylinux tags instead
# (glibc_floor()), checked against every ELF file's symbol versions (check_payload()).
SONAME_PACKAGES = {
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "libdl.so.2": "libc6",
    "libpthread.so.0": "libc6",
    "librt.so.1": "libc6",
    "ld-linux-x86-64.so.2": "libc6",
    "ld-linux-aarch64.so.1": "libc6",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
    "libz.so.1": "zlib1g",
}

# The systemd version that introduced each directive systemd/smocsd.service (and the
# drop-ins in systemd/examples/) use, so each release's unit has none its systemd lacks; a
# directive missing here fails the build (and tests/test_deb.py).
# Sources: "man N" = "Added in version N." in the man pages of systemd 257 (Debian 13's
# systemd 257.13 package: systemd.unit(5), systemd.service(5), systemd.exec(5),
# systemd.resource-control(5)); "NEWS N" = systemd's NEWS (Debian 12's
# /usr/share/doc/systemd/NEWS.gz, up to 252), "CHANGES WITH N". BEFORE_187: the man pages
# annotate no version for it, and they annotate from 187 on: it is older.
BEFORE_187 = 186
SYSTEMD_DIRECTIVES: dict[str, tuple[int, str]] = {
    # [Unit], [Install]
    "Description": (201, "man 201"),
    "Documentation": (201, "man 201"),
    "After": (201, "man 201"),
    "WantedBy": (201, "man 201"),
    # [Service]: systemd.service(5)
    "Type": (BEFORE_187, "man: unannotated"),
    "NotifyAccess": (BEFORE_187, "man: unannotated"),
    "ExecStart": (BEFORE_187, "man: unannotated"),
    "ExecReload": (BEFORE_187, "man: unannotated"),
    "WatchdogSec": (BEFORE_187, "man: unannotated"),
    "Restart": (BEFORE_187, "man: unannotated"),
    "RestartSec": (BEFORE_187, "man: unannotated"),
    "RestartPreventExitStatus": (189, "man 189"),
    "TimeoutStopSec": (188, "man 188"),
    # systemd.exec(5)
    "User": (BEFORE_187, "man: unannotated"),
    "Group": (BEFORE_187, "man: unannotated"),
    # The man page's 211 is RuntimeDirectory='s, with which it shares its entry.
    "StateDirectory": (235, "NEWS 235: 'Units gained new options StateDirectory=...'"),
    "StateDirectoryMode": (235, "NEWS 235, with StateDirectory="),
    "UMask": (BEFORE_187, "man: unannotated"),
    "LoadCredential": (247, "man 247; NEWS 247"),
    "ProtectSystem": (214, "man 214"),
    "ProtectHome": (214, "man 214"),
    "PrivateTmp": (BEFORE_187, "man: unannotated"),
    "PrivateDevices": (209, "man 209"),
    "PrivateMounts": (239, "man 239; NEWS 239"),
    "DevicePolicy": (208, "man 208"),
    "RestrictAddressFamilies": (211, "man 211"),
    "NoNewPrivileges": (187, "man 187"),
    "CapabilityBoundingSet": (BEFORE_187, "man: unannotated"),
    "AmbientCapabilities": (229, "man 229"),
    "ProtectKernelTunables": (232, "man 232; NEWS 232"),
    "ProtectKernelModules": (232, "man 232; NEWS 232"),
    "ProtectKernelLogs": (244, "man 244; NEWS 244"),
    "ProtectControlGroups": (232, "man 232; NEWS 232"),
    "ProtectClock": (245, "man 245; NEWS 245"),
    "ProtectHostname": (242, "man 242; NEWS 242"),
    "ProtectProc": (247, "man 247; NEWS 247"),
    "RestrictNamespaces": (233, "man 233; NEWS 233"),
    "RestrictRealtime": (231, "man 231; NEWS 231"),
    "RestrictSUIDSGID": (242, "man 242; NEWS 242"),
    "LockPersonality": (235, "man 235; NEWS 235"),
    "MemoryDenyWriteExecute": (231, "man 231; NEWS 231"),
    "KeyringMode": (235, "man 235; NEWS 235"),
    "RemoveIPC": (232, "man 232"),
    "PrivateIPC": (248, "man 248; NEWS 248"),
    "SystemCallArchitectures": (209, "man 209"),
    "SystemCallFilter": (187, "man 187"),
    "SystemCallErrorNumber": (209, "man 209"),
    "Nice": (BEFORE_187, "man: unannotated"),
    "CPUSchedulingPolicy": (BEFORE_187, "man: unannotated"),
    "IOSchedulingClass": (BEFORE_187, "man: unannotated"),
    "OOMScoreAdjust": (BEFORE_187, "man: unannotated"),
    # Only in the drop-ins of systemd/examples/, which operators copy on every release.
    "SupplementaryGroups": (BEFORE_187, "man: unannotated"),
    "ReadWritePaths": (231, "man 231; NEWS 231 (renamed from ReadWriteDirectories=)"),
    # systemd.resource-control(5)
    "CPUWeight": (232, "man 232"),
    "IOWeight": (230, "man 230"),
    "MemoryMax": (231, "man 231"),
    "TasksMax": (227, "man 227"),
}

CREDENTIALS_INSTEAD = """\
systemd < 251 does not look credentials up in /etc/credstore/: the ID-only form
(LoadCredential=ID, no path) only passes on a credential that PID 1 itself received
(from a container manager), so secrets put in /etc/credstore/ would be silently
ignored. Pass each secret you have with a drop-in naming its path instead, as in
/usr/share/doc/smocsd/examples/credentials.conf (`systemctl edit smocsd`):
  [Service]
  LoadCredential=pg-password:/etc/smocsd/secrets/pg-password
A path that does not exist fails the start (243/CREDENTIALS): list only those you have.
"""


@dataclass(frozen=True)
class Form:
    """A value form of a directive that came later than the directive itself."""

    directive: str
    value: str  # regular expression the whole value matches
    since: int
    source: str
    instead: str = ""  # what an operator of an older systemd does instead


SYSTEMD_FORMS = (
    # The form the unit uses. It is parsed since 249 (systemd issue #19178 / PR #19184:
    # "Single-param LoadCredential= ... causes systemd v247/v248 to assert when parsing"),
    # but looked up in /etc/credstore/, /run/credstore/ only since 251 (NEWS 251:
    # "LoadCredential= will now automatically look for credentials in the /etc/credstore/,
    # /run/credstore/, /usr/lib/credstore/ directories if the argument is not an absolute
    # path"); a missing one is skipped (verified on 252 by tests/test_systemd.py).
    Form("LoadCredential", r"[^:]+", 251, "NEWS 251; systemd#19178", CREDENTIALS_INSTEAD),
    Form("ProtectSystem", r"strict", 232, "NEWS 232: 'gained a new value \"strict\"'"),
    Form("ProtectProc", r"invisible", 247, "NEWS 247, with ProtectProc="),
    Form("SystemCallFilter", r"~?.*@.*", 231, "NEWS 231: named system call filter sets"),
    # NEWS 241 drops mincore() from the group, which existed then (introduced in 239, from
    # git history as remembered, not verified here): 241 is an upper bound.
    Form("SystemCallFilter", r".*@system-service.*", 241, "NEWS 241"),
)


class BuildError(Exception):
    """The package cannot be built as it should be (one line saying why)."""


MAINTAINER = "smocsd maintainers <maintainers@users.noreply.r-seed-e14bee72.example>"


def upstream_version() -> str:
    """smocsd.__version__, read without importing smocsd (its dependencies may be absent)."""
    tree = ast.parse((REPO / "smocsd" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise BuildError("smocsd/__init__.py: no __version__")


def default_version() -> str:
    """The package version of this source tree: smocsd's, Debian revision 1."""
    return f"{upstream_version()}-1"


def package_version(codename: str, version: str | None = None) -> str:
    """version (default: default_version()) for codename's package: plus the release's
    suffix, so "0.1.0-1~deb12" < "0.1.0-1~deb13" and a release upgrade upgrades smocsd."""
    suffix = TARGETS[codename].suffix
    version = version or default_version()
    return version if version.endswith(suffix) else version + suffix


def trains_with_ort(codename: str, arch_name: str) -> bool:
    """Whether onnxruntime-training-cpu has a wheel for the release's Python on arch."""
    target = TARGETS[codename]
    return ARCHES[arch_name].machine == "x86_64" and target.python_minor <= 12


def backend(codename: str, arch_name: str) -> str:
    """The backend `training.backend = "auto"` picks with this package: ort or numpy."""
    return "ort" if trains_with_ort(codename, arch_name) else "numpy"


def bundle(codename: str, arch_name: str) -> tuple[str, ...]:
    """The exact pins (name==version) of every wheel in codename's package for arch."""
    ort = "ort-training" if trains_with_ort(codename, arch_name) else "ort"
    return (*BUNDLE["all"], *TARGETS[codename].pins, *BUNDLE[ort])


def run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def platform_tags(target: Target, arch: Arch) -> list[str]:
    tags = [f"manylinux_2_{n}_{arch.machine}" for n in range(17, target.glibc_minor + 1)]
    return [*tags, f"manylinux2014_{arch.machine}"]


def pip(command: str, target: Target, arch: Arch, *args: str | Path) -> None:
    """pip for the release's Python and glibc on arch, without any dependency not pinned."""
    cmd = [sys.executable, "-m", "pip", command, "--quiet", "--disable-pip-version-check"]
    cmd += [a for tag in platform_tags(target, arch) for a in ("--platform", tag)]
    cmd += ["--python-version", target.python, "--implementation", "cp", "--only-binary=:all:"]
    run(*cmd, "--no-deps", *args)


def wheel_tags(filename: str) -> set[tuple[str, str, str]]:
    """(python, abi, platform) tags of a wheel file name, compressed tag sets expanded."""
    py, abi, plat = filename.removesuffix(".whl").split("-")[-3:]
    return {(p, a, pl) for p in py.split(".") for a in abi.split(".") for pl in plat.split(".")}


def tag_fits(tag: tuple[str, str, str], target: Target, arch: Arch) -> bool:
    """Whether a wheel tag runs on the release's python3 and glibc on arch."""
    py, abi, plat = tag
    if plat != "any" and plat not in platform_tags(target, arch):
        return False
    if abi == target.cpython_tag:
        return py == target.cpython_tag
    if abi == "abi3":
        return bool(re.fullmatch(r"cp3(\d+)", py)) and int(py[3:]) <= target.python_minor
    return abi == "none" and py in ("py3", f"py3{target.python_minor}", target.cpython_tag)


def wheel_fits(filename: str, target: Target, arch: Arch) -> bool:
    return any(tag_fits(tag, target, arch) for tag in wheel_tags(filename))


def wheel_cache(target: Target, arch: Arch) -> Path:
    """Cached wheels, one folder per Python version and architecture."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "smocsd-build" / "wheels" / f"{target.cpython_tag}-{arch.deb}"


def _cached(req: str, dest: Path, target: Target, arch: Arch) -> Path | None:
    name, version = req.split("==")
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = sorted(
        p
        for p in dest.glob("*.whl")
        if p.name.lower().startswith(stem) and wheel_fits(p.name, target, arch)
    )
    return found[-1] if found else None


def download_wheels(target: Target, arch: Arch, reqs: Iterable[str]) -> list[Path]:
    """The wheels of reqs (each exactly pinned) for the release and arch; pip runs only for
    those not cached yet."""
    dest = wheel_cache(target, arch)
    dest.mkdir(parents=True, exist_ok=True)
    reqs = list(reqs)
    missing = [r for r in reqs if _cached(r, dest, target, arch) is None]
    if missing:
        pip("download", target, arch, "--dest", dest, *missing)
    wheels = []
    for req in reqs:
        wheel = _cached(req, dest, target, arch)
        if wheel is None:
            raise BuildError(f"no wheel for {req} in {dest} fits {target.name} {arch.deb}")
        wheels.append(wheel)
    return wheels


def install_payload(target: Target, arch: Arch, wheels: list[Path], lib: Path) -> None:
    """Unpack the wheels and smocsd's sources into lib, then prune what never runs."""
    pip("install", target, arch, "--no-index", "--no-compile", "--target", lib, *wheels)
    shutil.copytree(
        REPO / "smocsd", lib / "smocsd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for pattern in PRUNE:
        for path in list(lib.glob(pattern)):
            if path.exists():  # not inside a tree removed before
                shutil.rmtree(path)


def wheel_sizes(wheels: list[Path], lib: Path) -> list[tuple[str, int, int]]:
    """(distribution, wheel bytes, installed bytes) per wheel, from each RECORD."""
    rows = []
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        record = lib / f"{name}-{version}.dist-info" / "RECORD"
        installed = 0
        for entry in csv.reader(record.read_text().splitlines()):
            path = lib / entry[0]
            if path.is_file() and lib in path.resolve().parents:
                installed += path.stat().st_size
        rows.append((f"{name}=={version}", wheel.stat().st_size, installed))
    return rows


def elf_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


def needed(path: Path) -> list[str]:
    out = run("readelf", "-d", path, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def glibc_versions(path: Path) -> set[tuple[int, int]]:
    """The GLIBC_2.N symbol versions an ELF file needs (readelf's version needs)."""
    out = run("readelf", "-V", "-W", path, capture_output=True, text=True).stdout
    needs = out.partition("Version needs section")[2]
    return {(int(a), int(b)) for a, b in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", needs)}


def extension_abis(lib: Path) -> set[str]:
    """The CPython ABIs that the compiled extension modules in lib are built for, from their
    names: "cpython-311" for foo.cpython-311-x86_64-linux-gnu.so, "abi3" for foo.abi3.so."""
    abis = set()
    for path in lib.rglob("*.so"):
        if m := re.search(r"\.(cpython-3\d+)-[^.]*\.so$", path.name):
            abis.add(m.group(1))
        elif path.name.endswith(".abi3.so"):
            abis.add("abi3")
    return abis


def library_depends(lib: Path) -> set[str]:
    """Debian packages for the NEEDED libraries the payload does not carry itself."""
    files = list(elf_files(lib))
    bundled = {p.name for p in files}
    packages: set[str] = set()
    for path in files:
        for soname in needed(path):
            if soname in bundled:
                continue
            if soname not in SONAME_PACKAGES:
                raise BuildError(f"{path.relative_to(lib)} needs {soname}: no package known")
            packages.add(SONAME_PACKAGES[soname])
    return packages


def glibc_floor(wheels: Iterable[Path]) -> str:
    """The glibc the wheels need, as x.y: a wheel tagged manylinux_2_27.manylinux_2_28 runs
    on glibc >= 2.27 (its lowest tag); the package needs the highest of those."""
    floors = [
        min(int(m) for m in minors)
        for w in wheels
        if (minors := re.findall(r"manylinux_2_(\d+)_", w.name))
    ]
    return f"2.{max(floors, default=17)}"


def check_payload(target: Target, arch: Arch, lib: Path, floor: str) -> None:
    """Every extension module is for the release's Python, and no ELF file needs a glibc
    symbol newer than floor, which the release's glibc must have."""
    abis = extension_abis(lib) - {"abi3", f"cpython-{target.cpython_tag[2:]}"}
    if abis:
        raise BuildError(f"{target.name} has Python {target.python}: found {sorted(abis)}")
    floor_minor = int(floor.split(".")[1])
    if floor_minor > target.glibc_minor:
        raise BuildError(f"the wheels need glibc {floor}; {target.name} has 2.{target.glibc_minor}")
    for path in elf_files(lib):
        newest = max(glibc_versions(path), default=(2, 0))
        if newest > (2, floor_minor):
            raise BuildError(f"{path.relative_to(lib)} needs GLIBC_{newest[0]}.{newest[1]}")


def systemd_needed(directive: str, value: str) -> tuple[int, str]:
    """(first systemd version, source) of a unit line directive=value."""
    if directive not in SYSTEMD_DIRECTIVES:
        raise BuildError(
            f"systemd/smocsd.service: {directive}= is not in build_deb.SYSTEMD_DIRECTIVES;"
            " add the systemd version that introduced it"
        )
    since, source = SYSTEMD_DIRECTIVES[directive]
    for form in SYSTEMD_FORMS:
        if form.directive == directive and re.fullmatch(form.value, value) and form.since > since:
            since, source = form.since, form.source
    return since, source


def unit_directives(text: str) -> Iterator[tuple[str, str, str]]:
    """(line, directive, value) of each assignment in a unit file."""
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;[":
            continue
        if stripped.endswith("\\"):
            raise BuildError(f"unit line continuation is not supported here: {stripped}")
        directive, sep, value = stripped.partition("=")
        if not sep:
            raise BuildError(f"not a unit assignment: {stripped}")
        yield line, directive.strip(), value.strip()


def unit_for(codename: str) -> str:
    """systemd/smocsd.service for the release: without the lines its systemd does not know.
    A dropped line's comment block above it goes too, replaced by one that says what was
    dropped and what to do instead."""
    target = TARGETS[codename]
    lines = UNIT.read_text().splitlines(keepends=True)
    out: list[str] = []
    run_: list[tuple[str, int, str]] = []  # the current run of dropped lines

    def close_run() -> None:
        if not run_:
            return
        while out and out[-1].lstrip().startswith("#"):
            out.pop()  # the comment explains the dropped form, not what replaces it
        out.append(
            f"# Left out for {target.name}, whose systemd {target.systemd} is older than these"
            " need\n# (packaging/build_deb.py: SYSTEMD_DIRECTIVES, SYSTEMD_FORMS):\n"
        )
        instead = []
        for line, since, source in run_:
            out.append(f"#   {line.strip():<40} systemd >= {since}: {source}\n")
            directive, _, value = line.strip().partition("=")
            instead += [
                form.instead
                for form in SYSTEMD_FORMS
                if form.directive == directive
                and re.fullmatch(form.value, value)
                and form.instead
                and form.instead not in instead
            ]
        out.extend(f"# {text}".rstrip() + "\n" for block in instead for text in block.splitlines())
        run_.clear()

    known_lines = {line: (d, v) for line, d, v in unit_directives("".join(lines))}
    for line in lines:
        if line in known_lines:
            since, source = systemd_needed(*known_lines[line])
            if since > target.systemd:
                run_.append((line, since, source))
                continue
        close_run()
        out.append(line)
    close_run()
    return "".join(out)


def debian_changelog(codename: str, version: str) -> str:
    """CHANGELOG.md as the Debian changelog of codename's package at version (before the
    suffix). Each older release's entry is at the package version codename got then,
    "<release>-1" and the suffix: apt-listchanges shows an upgrade's entries down to the
    installed version, and an older entry without the suffix ("0.1.0-1" > "0.1.0-1~deb12")
    would be shown as new again."""
    upstream = upstream_version()
    return changelog.debian(
        changelog.read(),
        upstream,
        lambda v: package_version(codename, version if v == upstream else f"{v}-1"),
        codename,
        MAINTAINER,
        source_date(),
    )


def source_date() -> datetime:
    """When a development build's changes were made: SOURCE_DATE_EPOCH if set, as a
    reproducible build sets it (dpkg-deb clamps the files' mtimes to it too), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", str(int(time.time())))
    if not epoch.isdigit():
        raise BuildError(f"SOURCE_DATE_EPOCH={epoch!r}: not a number of seconds")
    return datetime.fromtimestamp(int(epoch), timezone.utc)


def gzip_n(data: bytes) -> bytes:
    """gzip -9n: no name, no timestamp, so the output is reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(data)
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes | Path, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.read_bytes() if isinstance(data, Path) else data)
    path.chmod(mode)


def depends(target: Target, libraries: Iterable[str]) -> list[str]:
    """The Depends: relations of the release's package."""
    return [
        "adduser",
        "init-system-helpers (>= 1.54~)",
        f"python3 (>= {target.python})",
        f"python3 (<< 3.{target.python_minor + 1})",
        "libpq5",
        "procps",  # /bin/kill, the unit's ExecReload=
        *sorted(libraries),
    ]


def gencontrol(
    target: Target, arch: Arch, deps: Iterable[str], log: str, root: Path, work: Path
) -> None:
    """DEBIAN/control of the package tree root, by dpkg-gencontrol in work/, from a
    debian/control of this one package and log as debian/changelog."""
    (work / "debian").mkdir()
    (work / "debian" / "changelog").write_text(log)
    (work / "debian" / "control").write_text(f"""\
Source: smocsd
Section: misc
Priority: optional
Maintainer: {MAINTAINER}

Package: smocsd
Architecture: any
Depends: {", ".join(deps)}
Description: on-device training of sensor anomaly-detection models
 smocsd is a small daemon for edge gateways. On a timer it reads the sensor
 readings other software writes into a local SQLite (or PostgreSQL) database,
 trains an autoencoder on the device with ONNX Runtime (or numpy), keeps
 versioned ONNX models with an atomically swapped "current" pointer, and
 publishes each result to Kafka, falling back to MQTT and a durable outbox.
 .
 It runs as the systemd service smocsd.service, configured by
 /etc/smocsd/smocsd.toml. Its Python dependencies are bundled under
 /usr/lib/smocsd, built for the Python {target.python} of {target.name}.
""")
    # "Architecture: any" becomes the host's: the one built for (dpkg-architecture(1)).
    run("dpkg-gencontrol", f"-P{root}", cwd=work, env={**os.environ, "DEB_HOST_ARCH": arch.deb})


def build(
    codename: str, arch_name: str, out: Path, version: str | None = None, fast: bool = False
) -> Path:
    """Build codename's package for arch into out; return its path. version: the Debian
    version before the release's suffix (default: default_version()). fast = quick
    compression (tests)."""
    if codename not in TARGETS:
        raise BuildError(f"unknown target {codename!r}: one of {', '.join(TARGETS)}")
    target, arch = TARGETS[codename], ARCHES[arch_name]
    base = version or default_version()
    version = package_version(codename, base)
    unit = unit_for(codename)
    wheels = download_wheels(target, arch, bundle(codename, arch_name))
    with tempfile.TemporaryDirectory(prefix=f"smocsd-deb-{codename}-{arch.deb}-") as tmp:
        root = Path(tmp) / "root"
        lib = root / LIB
        install_payload(target, arch, wheels, lib)
        floor = glibc_floor(wheels)
        check_payload(target, arch, lib, floor)
        libraries = library_depends(lib)
        libraries.discard("libc6")
        libraries.add(f"libc6 (>= {floor})")
        deps = depends(target, libraries)

        put(root, "usr/bin/smocsd", HERE / "launcher", 0o755)
        put(root, "usr/lib/systemd/system/smocsd.service", unit.encode())
        put(root, "etc/smocsd/smocsd.toml", REPO / "conf" / "smocsd.toml")
        doc = "usr/share/doc/smocsd"
        put(root, f"{doc}/copyright", HERE / "copyright")
        put(root, f"{doc}/README.Debian", HERE / "README.Debian")
        log = debian_changelog(codename, base)
        put(root, f"{doc}/changelog.Debian.gz", gzip_n(log.encode()))
        for example in sorted((REPO / "systemd" / "examples").glob("*.conf")):
            put(root, f"{doc}/examples/{example.name}", example)
        put(root, f"{doc}/examples/{PROMETHEUS_RULES}", REPO / "contrib" / PROMETHEUS_RULES)
        put(root, "usr/share/man/man1/smocsd.1.gz", gzip_n((HERE / "smocsd.1").read_bytes()))
        # The JSON Schemas of the messages and metadata.json, where a consumer on the
        # gateway finds them without knowing the private library path.
        for schema in sorted((REPO / "smocsd" / "schemas").glob("*.schema.json")):
            put(root, f"{SCHEMAS}/{schema.name}", schema)
        put(root, "usr/share/lintian/overrides/smocsd", HERE / "lintian-overrides")

        debian = root / "DEBIAN"
        for script in ("postinst", "prerm", "postrm"):
            put(root, f"DEBIAN/{script}", HERE / script, 0o755)
        put(root, "DEBIAN/conffiles", b"/etc/smocsd/smocsd.toml\n")
        md5 = []
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink() and debian not in path.parents:
                digest = hashlib.md5(path.read_bytes()).hexdigest()
                md5.append(f"{digest}  {path.relative_to(root)}\n")
        put(root, "DEBIAN/md5sums", "".join(md5).encode())
        executables = {root / "usr/bin/smocsd", *debian.glob("p*")}
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or path in executables else 0o644)
        gencontrol(target, arch, deps, log, root, Path(tmp))

        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"smocsd_{version}_{arch.deb}.deb"
        compress = ["-Zgzip", "-z1"] if fast else ["-Zxz", "-z9"]
        run("dpkg-deb", "--root-owner-group", *compress, "-b", root, deb, stdout=subprocess.DEVNULL)
        print_sizes(deb, wheel_sizes(wheels, lib))
    return deb


MIB = 1024 * 1024


def installed_size_kib(deb: Path) -> int:
    return int(run("dpkg-deb", "-f", deb, "Installed-Size", capture_output=True, text=True).stdout)


def print_sizes(deb: Path, rows: list[tuple[str, int, int]]) -> None:
    print(f"\n{deb.name}")
    print(f"  {'bundled distribution':<34} {'download MiB':>12} {'installed MiB':>14}")
    for name, down, inst in rows:
        print(f"  {name:<34} {down / MIB:>12.1f} {inst / MIB:>14.1f}")
    print(
        f"  {'total':<34} {sum(r[1] for r in rows) / MIB:>12.1f} "
        f"{sum(r[2] for r in rows) / MIB:>14.1f}"
    )
    size = installed_size_kib(deb) / 1024
    print(f"  .deb {deb.stat().st_size / MIB:.1f} MiB, Installed-Size {size:.1f} MiB")


def size_table(built: list[tuple[str, str, Path]]) -> str:
    """One row per package: release, arch, .deb and installed size, training backend."""
    lines = [
        f"{'codename':<10} {'arch':<6} {'.deb MiB':>9} {'Installed-Size MiB':>19}  backend",
    ]
    for codename, arch_name, deb in built:
        lines.append(
            f"{codename:<10} {arch_name:<6} {deb.stat().st_size / MIB:>9.1f} "
            f"{installed_size_kib(deb) / 1024:>19.1f}  {backend(codename, arch_name)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", nargs="?", default="all", choices=[*ARCHES, "all"])
    parser.add_argument(
        "--target",
        default="all",
        choices=[*TARGETS, "all"],
        help="release codename (default: all of them)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "dist",
        help="output folder, one subfolder per codename (default: dist/)",
    )
    parser.add_argument(
        "--version", help="package version before the release's suffix (default: smocsd's-1)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="gzip -1 instead of xz -9: for tests, not for shipping"
    )
    args = parser.parse_args(argv)
    built = []
    try:
        for codename in TARGETS if args.target == "all" else [args.target]:
            for arch in ARCHES if args.arch == "all" else [args.arch]:
                deb = build(codename, arch, args.out / codename, args.version, args.fast)
                built.append((codename, arch, deb))
    except (BuildError, changelog.ChangelogError, subprocess.CalledProcessError) as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    print(f"\n{size_table(built)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
