#!/usr/bin/env python3
"""Build a signed apt repository from smocsd's .debs, so a fleet installs and upgrades
smocsd with apt instead of copying .deb files around.

    python3 packaging/apt_repo.py --out REPO [--gnupghome DIR] [--key KEYID] DIST_DIR

DIST_DIR holds one folder per codename (bookworm, trixie, jammy, noble...) with that
codename's .debs, as packaging/build_deb.py writes them. REPO gets pool/ (the .debs),
dists/<codename>/ (Packages indexes and Release, signed as InRelease and Release.gpg)
and smocsd-archive-keyring.gpg (the signing key's public part). Serve REPO over HTTP(S)
as it is. Without --key the repository is unsigned, and apt refuses it.

On a gateway, copy the keyring to /usr/share/keyrings/smocsd-archive-keyring.gpg and
write /etc/apt/sources.list.d/smocsd.sources:

    Types: deb
    URIs: https://packages.example.com/smocsd
    Suites: bookworm
    Components: main
    Signed-By: /usr/share/keyrings/smocsd-archive-keyring.gpg

then `apt update && apt install smocsd`; `apt update && apt upgrade` takes new versions
(unattended-upgrades too, with the origin pattern "origin=smocsd,codename=bookworm").

Needs only Python's standard library, dpkg-deb and gpg (with gpg-agent, Debian's gnupg):
apt-ftparchive and reprepro are not installed on the build hosts.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

ORIGIN = "smocsd"  # Origin and Label of every Release: what apt pinning and u-u match
COMPONENT = "main"
KEYRING = "smocsd-archive-keyring.gpg"
# The fields apt-get checks a downloaded .deb against; a deb's own control never has them.
INDEX_FIELDS = ("Filename", "Size", "MD5sum", "SHA256")
# Codenames, package and architecture names become paths (and a codename the Suite that
# sources.list repeats); a .deb's file name goes into the Filename field as it is.
NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*")
DEB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]*\.deb")


class AptRepoError(Exception):
    """The repository cannot be built as asked (one line saying why)."""


@dataclass(frozen=True)
class Deb:
    """One .deb as the indexes describe it."""

    source: Path
    control: str  # the control stanza as dpkg-deb prints it: fields in the package's order
    package: str
    version: str
    arch: str
    size: int
    md5: str
    sha256: str

    @property
    def filename(self) -> str:
        """Its path in the repository, as the Packages index names it."""
        prefix = self.package[:4] if self.package.startswith("lib") else self.package[0]
        return f"pool/{COMPONENT}/{prefix}/{self.package}/{self.source.name}"

    def stanza(self) -> str:
        return (
            f"{self.control.rstrip()}\nFilename: {self.filename}\nSize: {self.size}\n"
            f"MD5sum: {self.md5}\nSHA256: {self.sha256}\n"
        )


def control_fields(text: str) -> dict[str, str]:
    """The first line of each field of a deb822 stanza (enough for the one-line ones)."""
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and line[:1] not in (" ", "\t"):
            fields[name] = value.strip()
    return fields


def read_deb(path: Path) -> Deb:
    if not DEB_NAME.fullmatch(path.name):
        raise AptRepoError(f"{path}: not a .deb file name for an index (letters, digits, .+~_-)")
    try:
        proc = subprocess.run(["dpkg-deb", "--field", str(path)], capture_output=True)
    except FileNotFoundError:
        raise AptRepoError("dpkg-deb not found (Debian's dpkg)") from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines() or ["failed"]
        raise AptRepoError(f"{path}: dpkg-deb: {why[-1]}")
    try:
        control = proc.stdout.decode()
    except UnicodeDecodeError:
        raise AptRepoError(f"{path}: control file is not UTF-8") from None
    fields = control_fields(control)
    for name in ("Package", "Version", "Architecture"):
        if not fields.get(name):
            raise AptRepoError(f"{path}: control file has no {name}")
    for name in ("Package", "Architecture"):
        if not NAME.fullmatch(fields[name]):
            raise AptRepoError(f"{path}: bad {name} {fields[name]!r}")
    for name in INDEX_FIELDS:
        if name in fields:
            raise AptRepoError(f"{path}: control file has an index field {name}")
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return Deb(
        path,
        control,
        fields["Package"],
        fields["Version"],
        fields["Architecture"],
        size,
        md5.hexdigest(),
        sha256.hexdigest(),
    )


def collect(debs: dict[str, list[Path]]) -> tuple[dict[str, Deb], dict[str, dict[str, list[Deb]]]]:
    """The pool (path -> deb) and the indexes (codename -> arch -> debs), checked."""
    if not debs:
        raise AptRepoError("no packages given")
    pool: dict[str, Deb] = {}
    indexes: dict[str, dict[str, list[Deb]]] = {}
    for codename, paths in sorted(debs.items()):
        if not NAME.fullmatch(codename):
            raise AptRepoError(f"{codename!r}: not a codename (lower-case letters, digits, .+-)")
        if not paths:
            raise AptRepoError(f"{codename}: no packages given")
        for path in paths:
            deb = read_deb(Path(path))
            if deb.arch == "all":
                # smocsd bundles compiled wheels; an `all` package would need listing in
                # every binary-<arch> index, which nothing here needs.
                raise AptRepoError(f"{path}: Architecture: all is not supported")
            known = pool.setdefault(deb.filename, deb)
            if known.sha256 != deb.sha256:
                raise AptRepoError(
                    f"two different files named {deb.source.name}: {known.source} and {path}"
                )
            listed = indexes.setdefault(codename, {}).setdefault(deb.arch, [])
            same = [d for d in listed if (d.package, d.version) == (deb.package, deb.version)]
            if any(d.sha256 != deb.sha256 for d in same):
                raise AptRepoError(
                    f"{codename}: {deb.package} {deb.version} {deb.arch} given twice, "
                    f"as {same[0].source} and {path}"
                )
            if not same:
                listed.append(deb)
    return pool, indexes


def packages_index(debs: list[Deb]) -> bytes:
    # apt chooses the candidate by version, not by order; sorting only makes the index
    # reproducible.
    ordered = sorted(debs, key=lambda d: (d.package, d.version, d.filename))
    return "\n".join(d.stanza() for d in ordered).encode()


def release(codename: str, arches: list[str], files: dict[str, bytes]) -> str:
    """The Release file: what apt trusts, through its signature, for every index's hash.

    No Valid-Until: a fleet's repository is re-signed when a version is published, not on
    a schedule, and gateways must keep working between releases."""
    lines = [
        f"Origin: {ORIGIN}",
        f"Label: {ORIGIN}",
        f"Suite: {codename}",
        f"Codename: {codename}",
        f"Date: {formatdate(usegmt=True)}",
        f"Architectures: {' '.join(sorted(arches))}",
        f"Components: {COMPONENT}",
        f"Description: smocsd packages for {codename}",
    ]
    for field, algo in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        lines.append(f"{field}:")
        lines += [
            f" {hashlib.new(algo, data).hexdigest()} {len(data):>16} {name}"
            for name, data in sorted(files.items())
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Signer:
    """A key in a GnuPG home (None: gpg's default one), run without a terminal."""

    home: Path | None
    key: str

    def gpg(self, *args: str) -> bytes:
        cmd = ["gpg", "--batch", "--yes"]
        if self.home is not None:
            cmd += ["--homedir", str(self.home)]
        try:
            proc = subprocess.run([*cmd, *args], capture_output=True)
        except FileNotFoundError:
            raise AptRepoError("gpg not found (Debian's gnupg)") from None
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["failed"]
            raise AptRepoError(f"gpg: {lines[-1].removeprefix('gpg: ')} (key {self.key})")
        return proc.stdout

    def sign(self, release: Path) -> None:
        """InRelease (what apt fetches first) and Release.gpg (for older clients)."""
        # apt refuses SHA-1 signatures: ask for SHA-512 whatever the key's preferences say.
        mine = ["--local-user", self.key, "--digest-algo", "SHA512"]
        inrelease, detached = release.with_name("InRelease"), release.with_name("Release.gpg")
        self.gpg(*mine, "--clearsign", "--output", str(inrelease), str(release))
        self.gpg(*mine, "--armor", "--detach-sign", "--output", str(detached), str(release))

    def public_key(self) -> bytes:
        """The key's public part, a binary keyring for apt's Signed-By and gpgv."""
        public = self.gpg("--export", "--export-options", "export-minimal", self.key)
        if not public:
            raise AptRepoError(f"gpg: no public key {self.key}")
        return public


def write_dist(
    dist: Path, codename: str, by_arch: dict[str, list[Deb]], signer: Signer | None
) -> None:
    files: dict[str, bytes] = {}
    for arch, debs in sorted(by_arch.items()):
        index = packages_index(debs)
        rel = f"{COMPONENT}/binary-{arch}/Packages"
        files[rel] = index
        files[f"{rel}.gz"] = gzip.compress(index, 9, mtime=0)
    for rel, data in files.items():
        (dist / rel).parent.mkdir(parents=True, exist_ok=True)
        (dist / rel).write_bytes(data)
    (dist / "Release").write_text(release(codename, list(by_arch), files))
    if signer is not None:
        signer.sign(dist / "Release")


def build(
    debs: dict[str, list[Path]],
    out: Path,
    *,
    gnupghome: Path | None = None,
    key: str | None = None,
) -> None:
    """Build the repository in out from debs (codename -> .deb files), signed by key.

    The repository is rebuilt from exactly these debs: an older version stays listed (and
    apt can upgrade from it) only if it is passed again. Everything is written into a
    staging folder inside out and moved into place only once it is complete and signed,
    so a failure leaves the previous repository as it was; the pool goes first, so new
    indexes never name a file that is not there yet."""
    if gnupghome is not None and key is None:
        raise AptRepoError("a GnuPG home without a key to sign with")
    pool, indexes = collect(debs)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        for rel, deb in pool.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(deb.source, staging / rel)
        signer = None if key is None else Signer(gnupghome, key)
        for codename, by_arch in indexes.items():
            write_dist(staging / "dists" / codename, codename, by_arch, signer)
        if signer is not None:
            (staging / KEYRING).write_bytes(signer.public_key())
        # A web server running as another user serves it, whatever this umask is.
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        for name in ("pool", "dists", KEYRING):
            if (out / name).exists() or (out / name).is_symlink():
                (out / name).rename(staging / f"old-{name}")
            if (staging / name).exists():
                (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_debs(dist: Path) -> dict[str, list[Path]]:
    """DIST_DIR/<codename>/*.deb, as build_deb.py lays them out."""
    if not dist.is_dir():
        raise AptRepoError(f"{dist}: not a directory")
    stray = sorted(dist.glob("*.deb"))
    if stray:
        raise AptRepoError(f"{stray[0]}: not in a codename folder ({dist}/<codename>/*.deb)")
    debs = {d.name: sorted(d.glob("*.deb")) for d in sorted(dist.iterdir()) if d.is_dir()}
    debs = {codename: paths for codename, paths in debs.items() if paths}
    if not debs:
        raise AptRepoError(f"{dist}: no <codename>/*.deb")
    return debs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path, metavar="DIST_DIR", help="<codename>/*.deb folders")
    parser.add_argument("--out", type=Path, required=True, help="the repository folder")
    parser.add_argument("--gnupghome", type=Path, help="GnuPG home holding the signing key")
    parser.add_argument("--key", help="signing key (fingerprint); unsigned without it")
    args = parser.parse_args(argv)
    try:
        debs = find_debs(args.dist)
        build(debs, args.out, gnupghome=args.gnupghome, key=args.key)
    except (AptRepoError, OSError) as exc:
        print(f"apt_repo: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    for codename, paths in debs.items():
        print(f"apt_repo: {args.out}/dists/{codename}: {len(paths)} package(s)")
    if args.key is None:
        print("apt_repo: unsigned: apt refuses it without [trusted=yes]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
