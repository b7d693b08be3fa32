"""The .deb packages, one per release in build_deb.TARGETS and architecture, checked
statically: what they bundle (for that release's Python and glibc), their Depends against
the versions the release ships, their changelog (CHANGELOG.md's), lintian (which also
checks every ELF file's architecture), the unit each release gets (only directives its
systemd knows) and its sandbox rating, the man page.

Each package is built once per session (testbed.package, quick compression) and shared by
the tests here and in the other modules. Running the payloads is for tests/test_systemd.py
(amd64, booted) and tests/test_arm64.py (qemu-user), on Debian; Ubuntu has no mirror here.

Needs dpkg-deb, dpkg-gencontrol, dpkg-parsechangelog, readelf, lintian and systemd-analyze;
under CI (CI=true) a missing one fails instead of skipping.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import tomllib
from helpers import find_python, write_config
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packaging"))
import build_deb
import changelog
import testbed

REPO = build_deb.REPO

PACKAGES = [(codename, arch) for codename in build_deb.TARGETS for arch in build_deb.ARCHES]
IDS = [f"{codename}-{arch}" for codename, arch in PACKAGES]
# Pulled in by dependencies' metadata but never imported by smocsd at run time; the
# systemd and qemu tests run the daemon without them.
NEVER_BUNDLED = {"sympy", "h5py", "coloredlogs", "packaging", "psycopg-binary", "tabulate"}


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        testbed.unavailable(f"missing: {', '.join(missing)}")


@dataclass(frozen=True)
class Package:
    codename: str
    arch: str
    deb: Path
    root: Path  # its contents and DEBIAN/, unpacked

    @property
    def target(self) -> build_deb.Target:
        return build_deb.TARGETS[self.codename]

    @property
    def lib(self) -> Path:
        return self.root / build_deb.LIB

    def control(self) -> dict[str, str]:
        text = (self.root / "DEBIAN/control").read_text()
        return dict(re.findall(r"^([\w-]+): (.*)$", text, re.M))


@pytest.fixture(scope="module", params=PACKAGES, ids=IDS)
def pkg(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Package]:
    """One package at a time (pytest runs all tests of one before the next), unpacked."""
    need("dpkg-deb", "dpkg-gencontrol", "readelf")
    codename, arch = request.param
    deb = testbed.package(codename, arch, tmp_path_factory.getbasetemp() / "debs")
    root = tmp_path_factory.mktemp(f"unpacked-{codename}-{arch}")
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(root)], check=True)
    yield Package(codename, arch, deb, root)
    shutil.rmtree(root)  # ~100 MiB each


def bundled(codename: str, arch: str) -> dict[str, str]:
    return {
        canonicalize_name(name): version
        for name, version in (r.split("==") for r in build_deb.bundle(codename, arch))
    }


def marker_env(codename: str, arch: str) -> dict[str, str]:
    return {
        "platform_machine": build_deb.ARCHES[arch].machine,
        "python_version": build_deb.TARGETS[codename].python,
        "platform_system": "Linux",
        "sys_platform": "linux",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }


@pytest.mark.parametrize(("codename", "arch"), PACKAGES, ids=IDS)
def test_bundle_has_every_runtime_dependency_of_pyproject(codename: str, arch: str) -> None:
    """pyproject's dependencies that apply to the release's Python on arch, at versions it
    allows; and every bundled distribution pyproject names is one that applies there (so
    e.g. the training wheel goes exactly where pyproject puts it)."""
    env = marker_env(codename, arch)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    applying = [r for r in reqs if not r.marker or Marker(str(r.marker)).evaluate(env)]
    have = bundled(codename, arch)
    for req in applying:
        name = canonicalize_name(req.name)
        assert name in have, f"{req} is not in build_deb.bundle({codename!r}, {arch!r})"
        assert req.specifier.contains(have[name], prereleases=True), (req, have[name])
    named = {canonicalize_name(r.name) for r in reqs}
    applies = {canonicalize_name(r.name) for r in applying}
    assert not (named & set(have)) - applies, "bundled where pyproject does not want it"
    assert not NEVER_BUNDLED & set(have)


def test_contents_control_and_conffile(pkg: Package) -> None:
    root = pkg.root
    for path in (
        "usr/bin/smocsd",
        "usr/lib/systemd/system/smocsd.service",
        "etc/smocsd/smocsd.toml",
        "usr/share/doc/smocsd/copyright",
        "usr/share/doc/smocsd/README.Debian",
        "usr/share/doc/smocsd/changelog.Debian.gz",
        "usr/share/doc/smocsd/examples/shared-sqlite.conf",
        "usr/share/doc/smocsd/examples/credentials.conf",
        "usr/share/doc/smocsd/examples/prometheus/smocsd.rules.yml",
        "usr/share/man/man1/smocsd.1.gz",
        "usr/share/smocsd/schemas/training-result-1.schema.json",
        "usr/share/smocsd/schemas/alarm-1.schema.json",
        "usr/share/smocsd/schemas/model-1.schema.json",
        "usr/lib/smocsd/smocsd/app/cli.py",
    ):
        assert (root / path).is_file(), path
    assert (root / "etc/smocsd/smocsd.toml").read_text() == (REPO / "conf/smocsd.toml").read_text()
    # Every JSON Schema of smocsd/schemas, as they are, where consumers look for them.
    schemas = sorted((REPO / "smocsd/schemas").glob("*.schema.json"))
    shipped = root / build_deb.SCHEMAS
    assert sorted(p.name for p in shipped.iterdir()) == [s.name for s in schemas]
    assert all((shipped / s.name).read_bytes() == s.read_bytes() for s in schemas)
    assert (root / "DEBIAN/conffiles").read_text() == "/etc/smocsd/smocsd.toml\n"
    control = pkg.control()
    assert control["Version"] == build_deb.package_version(pkg.codename)
    assert control["Architecture"] == pkg.arch
    assert pkg.deb.name == f"smocsd_{control['Version']}_{pkg.arch}.deb"
    py = pkg.target.python
    bounds = f"python3 (>= {py}), python3 (<< 3.{int(py.split('.')[1]) + 1})"
    assert bounds in control["Depends"], control["Depends"]
    top = {p.name.split("-")[0].lower() for p in pkg.lib.iterdir()}
    assert not {n.replace("-", "_") for n in NEVER_BUNDLED} & top, top
    assert not list(root.rglob("__pycache__")), "byte code is compiled by the postinst"


def test_extension_modules_and_wheels_are_for_the_release_python(pkg: Package) -> None:
    """Every compiled module is named for the release's CPython (or the stable ABI), and
    every bundled wheel's tags (dist-info/WHEEL) include one that runs there."""
    own = f"cpython-{pkg.target.cpython_tag[2:]}"
    modules = [p.name for p in pkg.lib.rglob("*.so")]
    tagged = [n for n in modules if re.search(r"\.(cpython-\d+|abi3)[-.]", n)]
    assert len(tagged) > 10, modules
    other = [n for n in tagged if f".{own}-" not in n and not n.endswith(".abi3.so")]
    assert not other, other
    assert build_deb.extension_abis(pkg.lib) <= {own, "abi3"}
    arch = build_deb.ARCHES[pkg.arch]
    wheels = list(pkg.lib.glob("*.dist-info/WHEEL"))
    assert len(wheels) == len(build_deb.bundle(pkg.codename, pkg.arch))
    for wheel in wheels:
        tags = re.findall(r"^Tag: (\S+)-(\S+)-(\S+)$", wheel.read_text(), re.M)
        assert tags, wheel
        assert any(build_deb.tag_fits(t, pkg.target, arch) for t in tags), (wheel.parent, tags)
        for py, abi, _ in tags:  # a wheel for CPython must be for this one
            if abi.startswith("cp"):
                assert py == abi == pkg.target.cpython_tag, (wheel.parent, tags)


def test_glibc_floor_is_what_the_release_has(pkg: Package) -> None:
    """Depends: libc6 (>= 2.N) with N <= the release's glibc, and no ELF file needs a
    GLIBC_2.M symbol version above that floor."""
    (floor,) = re.findall(r"libc6 \(>= 2\.(\d+)\)", pkg.control()["Depends"])
    assert int(floor) <= pkg.target.glibc_minor
    for path in build_deb.elf_files(pkg.lib):
        newest = max(build_deb.glibc_versions(path), default=(2, 0))
        assert newest <= (2, int(floor)), (path, newest)


def satisfied(version: str, op: str, bound: str) -> bool:
    ops = {">=": "ge", "<<": "lt", "<=": "le", ">>": "gt", "=": "eq"}
    proc = subprocess.run(["dpkg", "--compare-versions", version, ops[op], bound])
    return proc.returncode == 0


def test_depends_are_satisfied_by_what_the_release_ships(pkg: Package) -> None:
    """Each relation of Depends: holds for the version of that package the release ships
    (build_deb.TARGETS[...].known), as dpkg compares versions."""
    need("dpkg")
    known = pkg.target.known
    for relation in pkg.control()["Depends"].split(", "):
        assert "|" not in relation, relation
        m = re.fullmatch(r"([a-z0-9][a-z0-9.+-]*)(?: \((>=|<<|<=|>>|=) ([^)]+)\))?", relation)
        assert m, relation
        name, op, bound = m.groups()
        assert name in known, f"{pkg.target.name}: no known version of {name}"
        if op:
            assert satisfied(known[name], op, bound), (relation, known[name])


def test_known_versions_agree_with_the_target() -> None:
    for target in build_deb.TARGETS.values():
        known = target.known
        assert known["python3"].startswith(f"{target.python}."), target.codename
        assert re.match(rf"(\d+:)?2\.{target.glibc_minor}-", known["libc6"]), target.codename
        assert known["systemd"].startswith(f"{target.systemd}."), target.codename


def test_package_versions_order_releases() -> None:
    """A release upgrade (bookworm -> trixie, jammy -> noble) upgrades smocsd too, and a
    newer Debian revision is newer on each release."""
    need("dpkg")
    v = build_deb.package_version
    assert satisfied(v("bookworm"), "<<", v("trixie"))
    assert satisfied(v("jammy"), "<<", v("noble"))
    nxt = f"{build_deb.upstream_version()}-2"
    for codename in build_deb.TARGETS:
        assert satisfied(v(codename), "<<", v(codename, nxt))
        assert v(codename, v(codename)) == v(codename)


def test_training_backend_follows_the_platform(pkg: Package) -> None:
    """onnxruntime-training on x86_64 with Python <= 3.12 (where its wheel exists), plain
    onnxruntime everywhere else; never both (they own the same `onnxruntime` package)."""
    dists = {p.name.split("-")[0].lower() for p in pkg.lib.glob("*.dist-info")}
    ort = {d for d in dists if d.startswith("onnxruntime")}
    python = pkg.target.python_minor
    if build_deb.ARCHES[pkg.arch].machine == "x86_64" and python <= 12:
        assert ort == {"onnxruntime_training_cpu"}, ort
        assert (pkg.lib / "onnxruntime/training/api").is_dir()
        assert "flatbuffers" in dists
        assert build_deb.backend(pkg.codename, pkg.arch) == "ort"
    else:
        assert ort == {"onnxruntime"}, ort
        assert not (pkg.lib / "onnxruntime/training").exists()
        assert build_deb.backend(pkg.codename, pkg.arch) == "numpy"


def debian_changelog(text: str, tmp: Path) -> list[dict[str, str]]:
    """The fields of each entry of a Debian changelog, as dpkg-parsechangelog reads it; it
    must have nothing to warn about."""
    need("dpkg-parsechangelog")
    path = tmp / "changelog"
    path.write_text(text)
    proc = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(path), "--format", "rfc822", "--all"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert not proc.stderr, proc.stderr
    return [dict(re.findall(r"^(\w+): (.*)$", e, re.M)) for e in proc.stdout.split("\n\n")]


def test_changelog_is_changelog_md(pkg: Package, tmp_path: Path) -> None:
    """changelog.Debian.gz has every release of CHANGELOG.md (and its Unreleased items if
    the tree's version has no release yet) with their items, newest first, each at a
    version of this release's package; and is reproducible (gzip -n)."""
    data = (pkg.root / "usr/share/doc/smocsd/changelog.Debian.gz").read_bytes()
    assert not data[3] & 0x08 and data[4:8] == bytes(4), "gzip header: a file name or time"
    text = gzip.decompress(data).decode()
    entries = debian_changelog(text, tmp_path)
    log, upstream = changelog.read(), build_deb.upstream_version()
    released = log.releases[0].name == upstream
    sections = log.releases if released else [log.unreleased, *log.releases]
    assert len(entries) == len(sections)
    assert entries[0]["Version"] == pkg.control()["Version"]
    assert entries[0]["Distribution"] == (pkg.codename if released else "UNRELEASED")
    # Each with the suffix: see build_deb.debian_changelog().
    assert all(e["Version"].endswith(pkg.target.suffix) for e in entries), entries
    assert all(e["Distribution"] == pkg.codename for e in entries[1:]), entries
    for newer, older in itertools.pairwise(entries):
        assert satisfied(older["Version"], "<<", newer["Version"]), (older, newer)
    flat = [" ".join(e.split()) for e in re.split(r"^(?=smocsd \()", text, flags=re.M)[1:]]
    for section, entry in zip(sections, flat, strict=True):
        for item in (i for items in section.items.values() for i in items):
            assert " ".join(item.split()) in entry, (section.name, item)


CHANGELOG_MD = """\
# Changelog

## [Unreleased]

### Added
- The next thing, long enough for the Debian changelog to wrap it at eighty columns, where
  its continuation lines are indented under the first.

## [0.2.0] - 2026-12-10
### Fixed
- A fix.

## [0.1.0] - 2026-12-03
The first release.
### Added
- The daemon.
"""


@pytest.mark.parametrize(
    ("version", "top", "versions"),
    [
        ("0.3.0", "UNRELEASED", ["0.3.0-1~deb12", "0.2.0-1~deb12", "0.1.0-1~deb12"]),
        ("0.2.0", "bookworm", ["0.2.0-1~deb12", "0.1.0-1~deb12"]),
    ],
)
def test_debian_changelog_of_a_development_build_and_of_a_release(
    version: str, top: str, versions: list[str], tmp_path: Path
) -> None:
    """A tree whose version has no release yet puts its Unreleased items on top, for
    UNRELEASED at the time given; a released version's entry is its release's, at noon UTC
    of its date."""
    now = datetime(2026, 12, 24, 8, 30, tzinfo=timezone.utc)
    text = changelog.debian(
        changelog.parse(CHANGELOG_MD),
        version,
        lambda v: build_deb.package_version("bookworm", f"{v}-1"),
        "bookworm",
        build_deb.MAINTAINER,
        now,
    )
    entries = debian_changelog(text, tmp_path)
    assert [e["Version"] for e in entries] == versions
    assert [e["Distribution"] for e in entries] == [top] + ["bookworm"] * (len(versions) - 1)
    dates = ["Thu, 24 Dec 2026 08:30:00 +0000", "Thu, 10 Dec 2026 12:00:00 +0000"]
    assert entries[0]["Date"] == dates[top == "bookworm"]
    items = [line for line in text.splitlines() if line.startswith("  ")]
    assert max(len(line) for line in items) <= 80, items  # lintian's limit; not the trailer's
    assert ("  * Added: The next thing," in text) == (top == "UNRELEASED")
    assert "  * The first release.\n  * Added: The daemon.\n" in text


def test_releases_cut_on_one_day_are_dated_a_minute_apart(tmp_path: Path) -> None:
    """The newest entry must be dated after the one before it (lintian's
    latest-changelog-entry-without-new-date), and CHANGELOG.md dates releases by day."""
    md = CHANGELOG_MD.replace("## [0.1.0] - 2026-12-03", "## [0.1.0] - 2026-12-10")
    text = changelog.debian(
        changelog.parse(md),
        "0.2.0",
        lambda v: build_deb.package_version("bookworm", f"{v}-1"),
        "bookworm",
        build_deb.MAINTAINER,
        datetime.now(timezone.utc),
    )
    assert [e["Date"] for e in debian_changelog(text, tmp_path)] == [
        "Thu, 10 Dec 2026 12:01:00 +0000",
        "Thu, 10 Dec 2026 12:00:00 +0000",
    ]


@pytest.mark.parametrize("version", ["0.1.5", "0.1.0"])
def test_debian_changelog_refuses_a_version_below_the_newest_release(version: str) -> None:
    log = changelog.parse(CHANGELOG_MD)
    with pytest.raises(
        changelog.ChangelogError, match=rf"release 0\.2\.0 is newer than {re.escape(version)}"
    ):
        changelog.debian(log, version, str, "bookworm", build_deb.MAINTAINER, datetime.now())


def test_lintian_reports_no_error_or_warning(pkg: Package) -> None:
    """Among its errors: binary-from-other-architecture, an ELF file not for the package's
    architecture (build_deb.py does not check that itself)."""
    need("lintian")
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--pedantic", str(pkg.deb)],
        capture_output=True,
        text=True,
    )
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWP]: ", line)]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_directive_table_covers_the_unit_and_the_example_drop_ins() -> None:
    """Every directive of systemd/smocsd.service and of the example drop-ins has the
    systemd version that introduced it in build_deb.SYSTEMD_DIRECTIVES, so a new one
    cannot reach a release whose systemd lacks it unchecked; the drop-ins, which any
    release's operator may copy, work on the oldest systemd of all."""
    oldest = min(t.systemd for t in build_deb.TARGETS.values())
    unit = list(build_deb.unit_directives(build_deb.UNIT.read_text()))
    assert len(unit) > 50
    for _, directive, _ in unit:
        assert directive in build_deb.SYSTEMD_DIRECTIVES, directive
    for example in sorted((REPO / "systemd/examples").glob("*.conf")):
        for _, directive, value in build_deb.unit_directives(example.read_text()):
            assert directive in build_deb.SYSTEMD_DIRECTIVES, (example.name, directive)
            assert build_deb.systemd_needed(directive, value)[0] <= oldest, (example, directive)


def test_shipped_unit_uses_only_what_the_release_systemd_knows(pkg: Package) -> None:
    target = pkg.target
    text = (pkg.root / "usr/lib/systemd/system/smocsd.service").read_text()
    assert text == build_deb.unit_for(pkg.codename)
    for line, directive, value in build_deb.unit_directives(text):
        since, source = build_deb.systemd_needed(directive, value)
        assert since <= target.systemd, (target.name, line, source)
    if target.systemd >= 251:  # every directive and form of the unit is known there
        assert text == build_deb.UNIT.read_text()
    else:  # jammy: the ID-only LoadCredential= needs 251; a drop-in passes secrets instead
        assert "LoadCredential=" in build_deb.UNIT.read_text()
        assert not re.search(r"^LoadCredential=", text, re.M)
        assert "examples/credentials.conf" in text
        kept = [d for _, d, _ in build_deb.unit_directives(text)]
        assert kept == [
            d
            for _, d, _ in build_deb.unit_directives(build_deb.UNIT.read_text())
            if d != "LoadCredential"
        ]


@pytest.mark.parametrize("codename", build_deb.TARGETS)
def test_unit_exposure_is_at_most_2(codename: str, tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = tmp_path / "smocsd.service"
    unit.write_text(build_deb.unit_for(codename))
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
    )
    level = re.search(r"Overall exposure level for smocsd.service: (\d+\.\d)", proc.stdout)
    assert level, proc.stdout + proc.stderr
    assert float(level.group(1)) <= 2.0, proc.stdout


def test_wheel_cache_is_per_python_and_architecture() -> None:
    caches = {build_deb.wheel_cache(build_deb.TARGETS[c], build_deb.ARCHES[a]) for c, a in PACKAGES}
    pythons = {t.python for t in build_deb.TARGETS.values()}
    assert len(caches) == len(pythons) * len(build_deb.ARCHES)


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


@pytest.mark.parametrize("codename", [c for c in build_deb.TARGETS if c not in testbed.SUITES])
def test_ubuntu_amd64_payload_trains_on_its_python(
    codename: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No Ubuntu rootfs can be had here, but its Python can (pyenv on the CI image): the
    amd64 package's payload, on that Python, writes demo data, trains with the bundled
    onnxruntime-training and scores. What differs on Ubuntu itself (its libc, libpq and
    systemd) is checked statically above."""
    target = build_deb.TARGETS[codename]
    python = find_python(target.python)
    if python is None:
        testbed.unavailable(f"no Python {target.python} (pyenv) for the {codename} payload")
    deb = testbed.package(codename, "amd64", tmp_path_factory.getbasetemp() / "debs")
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(root)], check=True)
    # The launcher's own lines, with the unpacked library in place of /usr/lib/smocsd.
    launch = f"import sys; sys.path.insert(0, {str(root / build_deb.LIB)!r}); "
    launch += "from smocsd.app.cli import main; sys.exit(main())"
    config = write_config(tmp_path / "smocsd.toml", tmp_path / "state")
    (tmp_path / "state").mkdir()

    def smocsd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(python), "-I", "-c", launch, "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert smocsd("demo", "--rows", "3000").returncode == 0
    proc = smocsd("train-once", "--force")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outcome"] == "promoted", result
    assert result["model_meta"]["backend"] == build_deb.backend(codename, "amd64") == "ort"
    proc = smocsd("score", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) > 2000
