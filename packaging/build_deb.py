#!/usr/bin/env python3
"""Build smocsd_<version>_<arch>.deb for amd64 and arm64 on any Linux host, with dpkg-deb.

    python3 packaging/build_deb.py [amd64|arm64|all] [--out DIR] [--version V] [--fast]

The Python dependencies are manylinux wheels for the target's CPU and Debian 12's Python
3.11, downloaded by pip (`--platform`/`--python-version`/`--only-binary`, cached under
~/.cache/smocsd-build) from the explicit list BUNDLE below, each with `--no-deps`: only what
smocsd imports at run time goes in, so onnxruntime-training's sympy, h5py, packaging,
coloredlogs... stay out. They are installed with smocsd's own sources under /usr/lib/smocsd,
so the package installs without network. Prints each bundled distribution's download and
installed size.
"""

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LIB = "usr/lib/smocsd"
PYTHON = "3.11"  # Debian 12's /usr/bin/python3; the wheels' cp311 ABI ties the package to it
GLIBC_MINOR = 36  # Debian 12's glibc 2.36: every manylinux_2_N wheel with N <= 36 runs there


@dataclass(frozen=True)
class Arch:
    deb: str  # Debian architecture name
    machine: str  # manylinux platform suffix, as uname -m says
    elf_machine: int  # e_machine of its ELF files


ARCHES = {
    "amd64": Arch("amd64", "x86_64", 62),
    "arm64": Arch("arm64", "aarch64", 183),
}

# Exactly what smocsd imports at run time (tests/test_systemd.py runs the daemon on only
# these; tests/test_deb.py runs the arm64 payload). Versions are the ones the test suite runs.
BUNDLE: dict[str, tuple[str, ...]] = {
    "all": (
        "numpy==2.4.6",
        "onnx==1.17.0",  # builds the network graph; ORT's training artifacts need it too
        "protobuf==7.36.2",  # onnx's model format
        "threadpoolctl==3.8.0",  # the numpy trainer caps BLAS threads with it
        "confluent-kafka==2.16.1",  # bundles librdkafka
        "paho-mqtt==2.2.0",
        # psycopg without psycopg-binary: it loads Debian's libpq5 (Depends:), which gets
        # Debian's security updates and costs ~0 bytes here instead of ~10 MB per arch.
        "psycopg==3.3.9",
        "typing_extensions==4.16.0",  # imported by psycopg on Python < 3.13
        # `smocsd demo` writes through sqlite-utils; these are what importing it loads
        # (its CLI-only click-default-group and tabulate are left out).
        "sqlite-utils==4.2.1",
        "click==8.5.1",
        "pluggy==1.7.0",
        "python-dateutil==4.0.0",
        "sqlite-fts4==1.0.3",
    ),
    # On-device training API. Its other dependencies (sympy, packaging, coloredlogs) are
    # not imported by it at run time; flatbuffers is, by onnxruntime.training.artifacts.
    "amd64": ("onnxruntime-training-cpu==1.19.2", "flatbuffers==25.12.19"),
    # No training wheel exists for aarch64: plain ORT scores, the numpy backend trains.
    "arm64": ("onnxruntime==1.19.2",),
}

# Test suites inside the wheels: never imported at run time, a third of the payload.
PRUNE = ("onnx/backend/test", "numpy/**/tests", "bin")

# Shared libraries the wheels link against but do not bundle -> the Debian package that has
# them. A NEEDED entry found neither here nor among the bundled files fails the build.
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


def run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def platform_args(arch: Arch) -> list[str]:
    tags = [f"manylinux_2_{n}_{arch.machine}" for n in range(17, GLIBC_MINOR + 1)]
    tags.append(f"manylinux2014_{arch.machine}")
    args = [a for tag in tags for a in ("--platform", tag)]
    return [*args, "--python-version", PYTHON, "--implementation", "cp", "--only-binary=:all:"]


def download_wheels(arch: Arch) -> list[Path]:
    """The BUNDLE's wheels for arch, each exactly pinned, cached between builds."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    dest = cache / "smocsd-build" / "wheels" / arch.deb
    dest.mkdir(parents=True, exist_ok=True)
    reqs = [*BUNDLE["all"], *BUNDLE[arch.deb]]
    run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--dest",
        dest,
        *platform_args(arch),
        *reqs,
    )
    wheels = []
    for req in reqs:
        name, version = req.split("==")
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem))
        if not found:
            raise BuildError(f"no wheel for {req} in {dest}")
        wheels.append(found[-1])
    return wheels


def install_payload(arch: Arch, wheels: list[Path], lib: Path) -> None:
    """Unpack the wheels and smocsd's sources into lib, then prune what never runs."""
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-index",
        "--no-compile",
        "--target",
        lib,
        *platform_args(arch),
        *wheels,
    )
    shutil.copytree(
        REPO / "smocsd", lib / "smocsd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for pattern in PRUNE:
        for path in list(lib.glob(pattern)):
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


def elf_machine(path: Path) -> int:
    """e_machine of a little-endian ELF file (both targets are little-endian)."""
    with path.open("rb") as f:
        return int.from_bytes(f.read(20)[18:20], "little")


def needed(path: Path) -> list[str]:
    out = run("readelf", "-d", path, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def library_depends(arch: Arch, lib: Path) -> set[str]:
    """Debian packages for the NEEDED libraries the payload does not carry itself."""
    files = list(elf_files(lib))
    bundled = {p.name for p in files}
    packages: set[str] = set()
    for path in files:
        if elf_machine(path) != arch.elf_machine:
            raise BuildError(f"{path}: not a {arch.machine} ELF file")
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


def changelog(version: str) -> bytes:
    """packaging/changelog, with an entry for version on top if it is not the newest."""
    text = (HERE / "changelog").read_text()
    top = re.match(r"smocsd \(([^)]+)\)", text)
    if top is None:
        raise BuildError("packaging/changelog: first line is not 'smocsd (VERSION) ...'")
    if top.group(1) != version:
        date = subprocess.run(
            ["date", "-R"], capture_output=True, text=True, check=True
        ).stdout.strip()
        text = (
            f"smocsd ({version}) unstable; urgency=medium\n\n"
            f"  * Rebuild of {top.group(1)} as {version}.\n\n"
            f" -- {MAINTAINER}  {date}\n\n" + text
        )
    return text.encode()


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


def installed_size_kib(root: Path) -> int:
    """As dpkg-gencontrol counts it: each file rounded up to KiB, plus one per directory."""
    total = 0
    for path in root.rglob("*"):
        if path.is_symlink() or path.is_dir():
            total += 1
        else:
            total += -(-path.stat().st_size // 1024)
    return total


def control(arch: Arch, version: str, depends: Iterable[str], size_kib: int) -> str:
    deps = ", ".join(
        [
            "adduser",
            "init-system-helpers (>= 1.54~)",
            f"python3 (>= {PYTHON})",
            f"python3 (<< 3.{int(PYTHON.split('.')[1]) + 1})",
            "libpq5",
            "procps",  # /bin/kill, the unit's ExecReload=
            *sorted(depends),
        ]
    )
    return f"""\
Package: smocsd
Version: {version}
Architecture: {arch.deb}
Maintainer: {MAINTAINER}
Installed-Size: {size_kib}
Depends: {deps}
Section: misc
Priority: optional
Description: on-device training of sensor anomaly-detection models
 smocsd is a small daemon for edge gateways. On a timer it reads the sensor
 readings other software writes into a local SQLite (or PostgreSQL) database,
 trains an autoencoder on the device with ONNX Runtime (or numpy), keeps
 versioned ONNX models with an atomically swapped "current" pointer, and
 publishes each result to Kafka, falling back to MQTT and a durable outbox.
 .
 It runs as the systemd service smocsd.service, configured by
 /etc/smocsd/smocsd.toml. Its Python dependencies are bundled under
 /usr/lib/smocsd.
"""


def build(arch_name: str, out: Path, version: str | None = None, fast: bool = False) -> Path:
    """Build one package into out; return its path. fast = quick compression (tests)."""
    arch = ARCHES[arch_name]
    version = version or default_version()
    wheels = download_wheels(arch)
    with tempfile.TemporaryDirectory(prefix=f"smocsd-deb-{arch.deb}-") as tmp:
        root = Path(tmp) / "root"
        lib = root / LIB
        install_payload(arch, wheels, lib)
        depends = library_depends(arch, lib)
        depends.add(f"libc6 (>= {glibc_floor(wheels)})")
        depends.discard("libc6")

        put(root, "usr/bin/smocsd", HERE / "launcher", 0o755)
        put(root, "usr/lib/systemd/system/smocsd.service", REPO / "systemd" / "smocsd.service")
        put(root, "etc/smocsd/smocsd.toml", REPO / "conf" / "smocsd.toml")
        doc = "usr/share/doc/smocsd"
        put(root, f"{doc}/copyright", HERE / "copyright")
        put(root, f"{doc}/README.Debian", HERE / "README.Debian")
        put(root, f"{doc}/changelog.Debian.gz", gzip_n(changelog(version)))
        for example in sorted((REPO / "systemd" / "examples").glob("*.conf")):
            put(root, f"{doc}/examples/{example.name}", example)
        put(root, "usr/share/man/man1/smocsd.1.gz", gzip_n((HERE / "smocsd.1").read_bytes()))
        put(root, "usr/share/lintian/overrides/smocsd", HERE / "lintian-overrides")

        size = installed_size_kib(root)
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
        put(root, "DEBIAN/control", control(arch, version, depends, size).encode())
        executables = {root / "usr/bin/smocsd", *debian.glob("p*")}
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or path in executables else 0o644)

        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"smocsd_{version}_{arch.deb}.deb"
        compress = ["-Zgzip", "-z1"] if fast else ["-Zxz", "-z9"]
        run(
            "dpkg-deb",
            "--root-owner-group",
            *compress,
            "--build",
            root,
            deb,
            stdout=subprocess.DEVNULL,
        )
        print_sizes(deb, wheel_sizes(wheels, lib), size)
    return deb


def print_sizes(deb: Path, rows: list[tuple[str, int, int]], size_kib: int) -> None:
    mib = 1024 * 1024
    print(f"\n{deb.name}")
    print(f"  {'bundled distribution':<34} {'download MiB':>12} {'installed MiB':>14}")
    for name, down, inst in rows:
        print(f"  {name:<34} {down / mib:>12.1f} {inst / mib:>14.1f}")
    print(
        f"  {'total':<34} {sum(r[1] for r in rows) / mib:>12.1f} "
        f"{sum(r[2] for r in rows) / mib:>14.1f}"
    )
    print(f"  .deb {deb.stat().st_size / mib:.1f} MiB, Installed-Size {size_kib / 1024:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", nargs="?", default="all", choices=[*ARCHES, "all"])
    parser.add_argument(
        "--out", type=Path, default=REPO / "dist", help="output folder (default: dist/)"
    )
    parser.add_argument("--version", help="package version (default: smocsd's, plus -1)")
    parser.add_argument(
        "--fast", action="store_true", help="gzip -1 instead of xz -9: for tests, not for shipping"
    )
    args = parser.parse_args(argv)
    try:
        for arch in ARCHES if args.arch == "all" else [args.arch]:
            build(arch, args.out, args.version, args.fast)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
