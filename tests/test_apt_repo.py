"""The apt repository of packaging/apt_repo.py, read by the host's real apt.

Tiny fake smocsd .debs (control and one file) make a signed repository; apt-get and
apt-cache then run on a private state (their own sources, status, lists, cache and keys,
none of the host's configuration) to fetch it, choose the newer version, refuse it
unsigned, wrongly signed or tampered with. No network, no root-owned state.

Needs dpkg-deb, apt-ftparchive (apt-utils), gpg with gpg-agent (Debian's gnupg), gpgv and
apt; under CI (CI=true) a missing one fails instead of skipping.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from helpers import gpg_test_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "packaging"))
import apt_repo

REPO = Path(__file__).resolve().parent.parent
TOOLS = (
    *("dpkg-deb", "apt-ftparchive", "gpg", "gpg-agent", "gpgconf", "gpgv"),
    *("apt-get", "apt-cache"),
)
# (codename, version, arch): two versions to upgrade between, another arch, another codename
DEBS = (
    ("bookworm", "1.0-1~deb12", "amd64"),
    ("bookworm", "1.0-2~deb12", "amd64"),
    ("bookworm", "1.0-2~deb12", "arm64"),
    ("trixie", "1.0-1~deb13", "amd64"),
)
CONTROL = """\
Package: smocsd
Version: {version}
Architecture: {arch}
Maintainer: smocsd tests <test@invalid>
Installed-Size: 1
Section: misc
Priority: optional
Description: fake smocsd for the apt repository tests
 Only a control file and {note}.
 .
 The blank line above is part of the description.
"""


def need_tools() -> None:
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        reason = f"missing: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def fake_deb(out: Path, version: str, arch: str, note: str = "one file") -> Path:
    """smocsd_<version>_<arch>.deb in out: the control and usr/share/doc/smocsd/note."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "DEBIAN").mkdir()
        (root / "DEBIAN/control").write_text(CONTROL.format(version=version, arch=arch, note=note))
        (root / "usr/share/doc/smocsd").mkdir(parents=True)
        (root / "usr/share/doc/smocsd/note").write_text(f"{version} {arch} {note}\n")
        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"smocsd_{version}_{arch}.deb"
        build = ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", tmp, str(deb)]
        subprocess.run(build, check=True, capture_output=True, timeout=60)
    return deb


@dataclass(frozen=True)
class Key:
    home: Path
    fingerprint: str


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[Key, Key]]:
    """The repository's signing key and a stranger's, each in its own short GnuPG home."""
    need_tools()
    homes = [Path(tempfile.mkdtemp(prefix="smocsd-gpg-", dir="/tmp")) for _ in range(2)]
    try:
        yield Key(homes[0], gpg_test_key(homes[0])), Key(homes[1], gpg_test_key(homes[1]))
    finally:
        for home in homes:
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], timeout=30)
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<codename>/*.deb, as build_deb.py lays them out."""
    need_tools()
    dist = tmp_path_factory.mktemp("dist")
    for codename, version, arch in DEBS:
        fake_deb(dist / codename, version, arch)
    return dist


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, dist: Path, keys: tuple[Key, Key]) -> Path:
    out = tmp_path_factory.mktemp("repo")
    key = keys[0]
    apt_repo.build(apt_repo.find_debs(dist), out, gnupghome=key.home, key=key.fingerprint)
    return out


def stanzas(text: str) -> list[dict[str, str]]:
    """deb822 paragraphs; a field's continuation lines joined with newlines."""
    result = []
    for paragraph in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t"):
                fields[name] += "\n" + line
            else:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        result.append(fields)
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release_hashes(release: Path, field: str) -> dict[str, tuple[str, int]]:
    (fields,) = stanzas(release.read_text())
    rows = [line.split() for line in fields[field].splitlines() if line.strip()]
    return {name: (digest, int(size)) for digest, size, name in rows}


class Apt:
    """The host's apt-get and apt-cache on a private state in root.

    APT_CONFIG is read before /etc/apt/apt.conf.d, and it points Dir::Etc::parts at an
    empty folder: none of the host's configuration counts (its sources, keys, pins, nor
    hooks such as APT::Update::Post-Invoke). Dir::Etc::trusted(parts) are empty, so only
    the Signed-By keyring can make a repository trusted. APT::Sandbox::User root: the
    _apt user could not read a test's private temporary folders (apt warns, and then
    reads them as root anyway)."""

    def __init__(self, root: Path, arch: str = "amd64"):
        self.root = root
        for folder in ("parts", "trusted.gpg.d", "preferences.d", "lists/partial"):
            (root / folder).mkdir(parents=True)
        (root / "cache/archives/partial").mkdir(parents=True)
        self.sources = root / "sources.list"
        self.status = root / "status"
        self.status.write_text("")
        self.conf = root / "apt.conf"
        self.conf.write_text(
            f"""\
Dir::Etc::main "/dev/null";
Dir::Etc::parts "{root}/parts";
Dir::Etc::sourcelist "{self.sources}";
Dir::Etc::sourceparts "-";
Dir::Etc::trusted "{root}/trusted.gpg";
Dir::Etc::trustedparts "{root}/trusted.gpg.d";
Dir::Etc::preferences "{root}/preferences";
Dir::Etc::preferencesparts "{root}/preferences.d";
Dir::State "{root}";
Dir::State::lists "{root}/lists";
Dir::State::status "{self.status}";
Dir::Cache "{root}/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "{root}/log";
APT::Architecture "{arch}";
APT::Architectures {{ "{arch}"; }};
APT::Sandbox::User "root";
APT::Get::List-Cleanup "false";
Acquire::Languages "none";
"""
        )

    def source(self, repo: Path, suite: str = "bookworm", keyring: Path | None = None) -> None:
        keyring = keyring or repo / apt_repo.KEYRING
        self.sources.write_text(f"deb [signed-by={keyring}] file:{repo} {suite} main\n")

    def installed(self, deb: Path) -> None:
        """dpkg's status file says deb is installed, as dpkg would: its control, plus Status."""
        control = subprocess.run(["dpkg-deb", "--field", str(deb)], capture_output=True, check=True)
        self.status.write_bytes(b"Status: install ok installed\n" + control.stdout)

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "APT_CONFIG": str(self.conf), "LC_ALL": "C"}
        return subprocess.run(
            args, capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False
        )

    def ok(self, *args: str, cwd: Path | None = None) -> str:
        proc = self.run(*args, cwd=cwd)
        assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        assert "\nW: " not in "\n" + proc.stderr, proc.stderr
        return proc.stdout


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_layout(repo: Path, dist: Path) -> None:
    pool = "pool/main/s/smocsd"
    dists = {
        f"dists/{codename}/{name}"
        for codename in ("bookworm", "trixie")
        for name in ("Release", "InRelease", "Release.gpg")
    }
    indexes = {
        f"dists/{codename}/main/binary-{arch}/{name}"
        for codename, _, arch in DEBS
        for name in ("Packages", "Packages.gz")
    }
    debs = {f"{pool}/smocsd_{version}_{arch}.deb" for _, version, arch in DEBS}
    assert files(repo) == {*dists, *indexes, *debs, apt_repo.KEYRING}
    for codename, version, arch in DEBS:
        name = f"smocsd_{version}_{arch}.deb"
        assert (repo / pool / name).read_bytes() == (dist / codename / name).read_bytes()
    # served by a web server as another user
    for path in repo.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_packages_list_every_version_with_the_pool_files_hashes(repo: Path) -> None:
    expected: dict[str, set[str]] = {}
    for codename, version, arch in DEBS:
        expected.setdefault(f"{codename}/main/binary-{arch}", set()).add(version)
    for index, versions in expected.items():
        packages = repo / "dists" / index / "Packages"
        assert gzip.decompress((repo / "dists" / index / "Packages.gz").read_bytes()) == (
            packages.read_bytes()
        )
        listed = stanzas(packages.read_text())
        assert {s["Version"] for s in listed} == versions
        for stanza in listed:
            # the deb's control fields and the index's own, with Debian's archive's hashes
            assert set(stanza) == {
                *("Package", "Version", "Architecture", "Maintainer", "Installed-Size"),
                *("Section", "Priority", "Description"),
                *("Filename", "Size", "MD5sum", "SHA256"),
            }
            assert stanza["Description"].endswith(
                "\n .\n The blank line above is part of the description."
            )
            assert stanza["Architecture"] == index.rsplit("-", 1)[1]
            deb = repo / stanza["Filename"]
            assert stanza["Filename"] == (
                f"pool/main/s/smocsd/smocsd_{stanza['Version']}_{stanza['Architecture']}.deb"
            )
            assert int(stanza["Size"]) == deb.stat().st_size
            assert stanza["SHA256"] == sha256(deb)
            assert stanza["MD5sum"] == hashlib.md5(deb.read_bytes()).hexdigest()


@pytest.mark.parametrize("codename", ["bookworm", "trixie"])
def test_release_lists_every_index_with_its_hashes(repo: Path, codename: str) -> None:
    dist = repo / "dists" / codename
    (release,) = stanzas((dist / "Release").read_text())
    arches = sorted({arch for c, _, arch in DEBS if c == codename})
    assert release["Origin"] == release["Label"] == "smocsd"
    assert release["Suite"] == release["Codename"] == codename
    assert release["Components"] == "main"
    assert release["Architectures"] == " ".join(arches)
    assert release["Description"]
    assert "SHA1" not in release  # apt distrusts it; Debian's archive has none
    date = parsedate_to_datetime(release["Date"])
    assert date.utcoffset() is not None and date.utcoffset().total_seconds() == 0
    indexes = {f"main/binary-{a}/{n}" for a in arches for n in ("Packages", "Packages.gz")}
    for field, algo in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        listed = release_hashes(dist / "Release", field)
        assert set(listed) == indexes
        for name, (digest, size) in listed.items():
            data = (dist / name).read_bytes()
            assert (digest, size) == (hashlib.new(algo, data).hexdigest(), len(data))


def test_a_tampered_packages_no_longer_matches_the_release(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    packages = copy / "dists/bookworm/main/binary-amd64/Packages"
    packages.write_text(
        packages.read_text().replace("Version: 1.0-1~deb12", "Version: 9.9-1~deb12")
    )
    digest, size = release_hashes(copy / "dists/bookworm/Release", "SHA256")[
        "main/binary-amd64/Packages"
    ]
    assert size == packages.stat().st_size  # same length: only the hash tells
    assert digest != sha256(packages)


def gpgv(home: Path, keyring: Path, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = ["gpgv", "--homedir", str(home), "--keyring", str(keyring), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_signatures_verify_with_the_exported_keyring(
    repo: Path, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    key, stranger = keys
    keyring = repo / apt_repo.KEYRING
    shown = subprocess.run(
        ["gpg", "--homedir", str(key.home), "--with-colons", "--show-keys", str(keyring)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [line.split(":")[9] for line in shown.splitlines() if line[:4] == "fpr:"] == [
        key.fingerprint
    ]
    assert not [line for line in shown.splitlines() if line[:4] in ("sec:", "ssb:")]
    # gpgv in the stranger's home: only the exported keyring can vouch for the signatures
    home = stranger.home
    for codename in ("bookworm", "trixie"):
        dist = repo / "dists" / codename
        signed = tmp_path / f"{codename}-signed"
        proc = gpgv(home, keyring, "--output", signed, dist / "InRelease")
        assert proc.returncode == 0, proc.stderr
        assert signed.read_bytes() == (dist / "Release").read_bytes()
        proc = gpgv(home, keyring, dist / "Release.gpg", dist / "Release")
        assert proc.returncode == 0, proc.stderr
        assert "Good signature" in proc.stderr
        assert "Hash: SHA512" in (dist / "InRelease").read_text()
    # a changed Release (say, with a tampered index's hash) fails the detached signature
    forged = tmp_path / "Release"
    forged.write_text((repo / "dists/bookworm/Release").read_text().replace("amd64", "i386"))
    proc = gpgv(home, keyring, repo / "dists/bookworm/Release.gpg", forged)
    assert proc.returncode != 0 and "BAD signature" in proc.stderr


def test_apt_installs_the_newest_and_upgrades_to_it(repo: Path, tmp_path: Path) -> None:
    apt = Apt(tmp_path / "apt")
    apt.source(repo)
    apt.ok("apt-get", "update")
    policy = apt.ok("apt-cache", "policy", "smocsd")
    assert "Installed: (none)" in policy
    assert "Candidate: 1.0-2~deb12" in policy
    table = policy.split("Version table:")[1]
    assert table.index("1.0-2~deb12") < table.index("1.0-1~deb12")
    shown = stanzas(apt.ok("apt-cache", "show", "smocsd"))
    assert sorted(s["Version"] for s in shown) == ["1.0-1~deb12", "1.0-2~deb12"]
    # apt-get fetches each version from the pool and checks it against the index's hashes
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for version in ("1.0-1~deb12", "1.0-2~deb12"):
        apt.ok("apt-get", "download", f"smocsd={version}", cwd=downloads)
        name = f"smocsd_{version}_amd64.deb"
        pool = repo / "pool/main/s/smocsd" / name
        assert (downloads / name).read_bytes() == pool.read_bytes()
    install = apt.ok("apt-get", "--simulate", "install", "smocsd")
    assert "Inst smocsd (1.0-2~deb12 smocsd:bookworm [amd64])" in install
    apt.installed(repo / "pool/main/s/smocsd/smocsd_1.0-1~deb12_amd64.deb")
    upgrade = apt.ok("apt-get", "--simulate", "upgrade")
    assert "Inst smocsd [1.0-1~deb12] (1.0-2~deb12 smocsd:bookworm [amd64])" in upgrade
    apt.installed(repo / "pool/main/s/smocsd/smocsd_1.0-2~deb12_amd64.deb")
    assert "Installed: 1.0-2~deb12" in apt.ok("apt-cache", "policy", "smocsd")
    assert "0 upgraded" in apt.ok("apt-get", "--simulate", "upgrade")


@pytest.mark.parametrize(
    ("codename", "arch", "version"),
    [("bookworm", "arm64", "1.0-2~deb12"), ("trixie", "amd64", "1.0-1~deb13")],
)
def test_apt_sees_each_codename_and_architecture(
    repo: Path, tmp_path: Path, codename: str, arch: str, version: str
) -> None:
    apt = Apt(tmp_path / "apt", arch)
    apt.source(repo, codename)
    apt.ok("apt-get", "update")
    policy = apt.ok("apt-cache", "policy", "smocsd")
    assert f"Candidate: {version}" in policy
    assert policy.count("Packages") == 1  # this codename's one version for this arch


def test_apt_takes_the_detached_signature_without_inrelease(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    (copy / "dists/bookworm/InRelease").unlink()
    apt = Apt(tmp_path / "apt")
    apt.source(copy)
    assert "Release.gpg" in apt.ok("apt-get", "update")
    assert "Candidate: 1.0-2~deb12" in apt.ok("apt-cache", "policy", "smocsd")


def apt_update_fails(apt: Apt) -> str:
    proc = apt.run("apt-get", "update")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "\nE: " in "\n" + proc.stderr
    assert "Candidate: 1.0" not in apt.run("apt-cache", "policy", "smocsd").stdout
    return proc.stdout + proc.stderr


def test_apt_refuses_an_unsigned_repository(dist: Path, repo: Path, tmp_path: Path) -> None:
    unsigned = tmp_path / "unsigned"
    apt_repo.build(apt_repo.find_debs(dist), unsigned)
    assert not (unsigned / "dists/bookworm/InRelease").exists()
    assert not (unsigned / apt_repo.KEYRING).exists()
    apt = Apt(tmp_path / "apt")
    apt.source(unsigned, keyring=repo / apt_repo.KEYRING)
    assert "is not signed" in apt_update_fails(apt)


def test_apt_refuses_a_repository_signed_by_another_key(
    dist: Path, repo: Path, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    stranger = keys[1]
    forged = tmp_path / "forged"
    apt_repo.build(
        apt_repo.find_debs(dist), forged, gnupghome=stranger.home, key=stranger.fingerprint
    )
    apt = Apt(tmp_path / "apt")
    apt.source(forged, keyring=repo / apt_repo.KEYRING)
    assert f"NO_PUBKEY {stranger.fingerprint[-16:]}" in apt_update_fails(apt)


def test_apt_refuses_a_tampered_packages_index(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    index = copy / "dists/bookworm/main/binary-amd64"
    text = (index / "Packages").read_text().replace("Version: 1.0-1~deb12", "Version: 9.9-1~deb12")
    (index / "Packages").write_text(text)
    (index / "Packages.gz").write_bytes(gzip.compress(text.encode()))
    apt = Apt(tmp_path / "apt")
    apt.source(copy)
    assert "Hash Sum mismatch" in apt_update_fails(apt)


def test_a_rebuild_lists_only_the_debs_given(
    dist: Path, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    key = keys[0]
    out = tmp_path / "repo"
    old, new = (dist / "bookworm" / f"smocsd_1.0-{n}~deb12_amd64.deb" for n in (1, 2))
    apt_repo.build({"bookworm": [old, new]}, out, gnupghome=key.home, key=key.fingerprint)
    (out / "index.html").write_text("not the repository's\n")
    # a version passed again from the pool itself stays
    kept = out / "pool/main/s/smocsd" / new.name
    apt_repo.build({"bookworm": [kept]}, out, gnupghome=key.home, key=key.fingerprint)
    assert files(out) == {
        f"pool/main/s/smocsd/{new.name}",
        *(f"dists/bookworm/{n}" for n in ("Release", "InRelease", "Release.gpg")),
        *(f"dists/bookworm/main/binary-amd64/{n}" for n in ("Packages", "Packages.gz")),
        apt_repo.KEYRING,
        "index.html",
    }
    (listed,) = stanzas((out / "dists/bookworm/main/binary-amd64/Packages").read_text())
    assert listed["Version"] == "1.0-2~deb12"
    # a build that fails (here: signing) leaves the previous repository as it was
    before = {name: (out / name).read_bytes() for name in files(out)}
    with pytest.raises(apt_repo.AptRepoError, match=r"^gpg: "):
        apt_repo.build({"bookworm": [old]}, out, gnupghome=key.home, key="no-such-key@invalid")
    assert {name: (out / name).read_bytes() for name in files(out)} == before
    assert not any(p.name.startswith(".staging-") for p in out.iterdir())


def test_one_file_name_shared_by_two_codenames(dist: Path, tmp_path: Path) -> None:
    deb = dist / "bookworm" / "smocsd_1.0-1~deb12_amd64.deb"
    same = tmp_path / "copy" / deb.name
    same.parent.mkdir()
    shutil.copyfile(deb, same)
    out = tmp_path / "repo"
    apt_repo.build({"bookworm": [deb], "trixie": [same]}, out)
    assert files(out / "pool") == {f"main/s/smocsd/{deb.name}"}
    for codename in ("bookworm", "trixie"):
        (listed,) = stanzas((out / f"dists/{codename}/main/binary-amd64/Packages").read_text())
        assert listed["Filename"] == f"pool/main/s/smocsd/{deb.name}"
    other = fake_deb(tmp_path / "other", "1.0-1~deb12", "amd64", note="other contents")
    with pytest.raises(apt_repo.AptRepoError) as error:
        apt_repo.build({"bookworm": [deb], "trixie": [other]}, tmp_path / "refused")
    assert str(error.value) == f"two different files named {deb.name}: {deb} and {other}"
    assert not (tmp_path / "refused" / "pool").exists()


def test_a_deb_apt_ftparchive_would_leave_out_fails_the_build(dist: Path, tmp_path: Path) -> None:
    """apt-ftparchive exits 0 with a .deb left out of its index; the build must fail."""
    deb = dist / "bookworm" / "smocsd_1.0-1~deb12_amd64.deb"
    # it picks a binary-amd64 index's files by name, *_amd64.deb
    renamed = tmp_path / "renamed" / "smocsd_1.0-1~deb12_arm64.deb"
    # dpkg-deb reads the control member only; apt-ftparchive wants a data member it knows
    broken = tmp_path / "broken" / deb.name
    for path in (renamed, broken):
        path.parent.mkdir()
    shutil.copyfile(deb, renamed)
    broken.write_bytes(deb.read_bytes().replace(b"data.tar.gz", b"data.tar.zz", 1))
    for bad, message in (
        (renamed, f"{renamed}: Architecture amd64, but not named *_amd64.deb"),
        (broken, "apt-ftparchive: This is not a valid DEB archive, missing 'data.tar' member"),
    ):
        out = tmp_path / f"repo-{bad.parent.name}"
        with pytest.raises(apt_repo.AptRepoError, match=f"^{re.escape(message)}$"):
            apt_repo.build({"bookworm": [bad]}, out)
        assert not out.exists() or not list(out.iterdir())


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "packaging/apt_repo.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(dist: Path, keys: tuple[Key, Key], tmp_path: Path) -> None:
    key = keys[0]
    out = tmp_path / "repo"
    proc = cli("--out", out, "--gnupghome", key.home, "--key", key.fingerprint, dist)
    assert proc.returncode == 0, proc.stderr
    assert (out / "dists/bookworm/InRelease").exists()
    assert (out / "dists/trixie/InRelease").exists()
    assert proc.stdout.splitlines() == [
        f"apt_repo: {out}/dists/bookworm: 3 package(s)",
        f"apt_repo: {out}/dists/trixie: 1 package(s)",
    ]
    # errors: one line, exit 1
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(dist / "trixie/smocsd_1.0-1~deb13_amd64.deb", flat)
    garbage = tmp_path / "garbage"
    (garbage / "bookworm").mkdir(parents=True)
    (garbage / "bookworm/smocsd_1_amd64.deb").write_text("not a deb\n")
    for args, message in (
        ((flat,), "not in a codename folder"),
        ((tmp_path / "missing",), "not a directory"),
        ((tmp_path / "garbage",), "dpkg-deb: "),
        (("--gnupghome", key.home, "--key", "nobody@invalid", dist), "gpg: "),
        (("--gnupghome", key.home, dist), "without a key"),
    ):
        proc = cli("--out", tmp_path / "failed", *args)
        assert proc.returncode == 1, proc.stderr
        assert proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
        assert proc.stderr.startswith("apt_repo: ")
