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

Debian's own tool makes the Packages indexes and the Release files: apt-ftparchive
(apt-utils). This script checks the .debs, lays out the pool and signs with gpg, which
apt-ftparchive does not do. apt-ftparchive rather than reprepro: it is stateless, so the
whole repository is made again from exactly the .debs given at every release, in a
staging folder swapped in at the end, with nothing kept between builds. reprepro keeps a
database beside the repository, which would have to travel with it from one build host
to the next, and it refuses a file of a version it already holds with other contents,
so a rebuilt package would need a new version or a wiped database.

Needs dpkg-deb, apt-ftparchive and gpg (with gpg-agent, Debian's gnupg).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ORIGIN = "smocsd"  # Origin and Label of every Release: what apt pinning and u-u match
COMPONENT = "main"
KEYRING = "smocsd-archive-keyring.gpg"
# Codenames, package and architecture names become paths (and a codename the Suite that
# sources.list repeats); a .deb's file name goes into the Filename field as it is.
NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*")
DEB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]*\.deb")
# The checksums of Debian's own archive: apt-ftparchive adds SHA1, which apt no longer
# trusts, and SHA512, which apt does not need, unless told not to.
CHECKSUMS = ("-o", "APT::FTPArchive::SHA1=false", "-o", "APT::FTPArchive::SHA512=false")
FIELDS = ("Package", "Version", "Architecture")  # of a .deb's control, read by dpkg-deb
WORK = "ftparchive"  # apt-ftparchive's config, file lists and cache, in the staging folder


class AptRepoError(Exception):
    """The repository cannot be built as asked (one line saying why)."""


@dataclass(frozen=True)
class Deb:
    """One .deb, as far as the pool and the choice of index need it."""

    source: Path
    package: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        """Its path in the repository, as the Packages index names it."""
        prefix = self.package[:4] if self.package.startswith("lib") else self.package[0]
        return f"pool/{COMPONENT}/{prefix}/{self.package}/{self.source.name}"


def read_deb(path: Path) -> Deb:
    if not DEB_NAME.fullmatch(path.name):
        raise AptRepoError(f"{path}: not a .deb file name for an index (letters, digits, .+~_-)")
    fmt = "".join(f"${{{name}}}\n" for name in FIELDS)
    try:
        proc = subprocess.run(
            ["dpkg-deb", "--show", "--showformat", fmt, str(path)], capture_output=True
        )
    except FileNotFoundError:
        raise AptRepoError("dpkg-deb not found (Debian's dpkg)") from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines() or ["failed"]
        raise AptRepoError(f"{path}: dpkg-deb: {why[-1]}")
    values = proc.stdout.decode(errors="replace").split("\n")[: len(FIELDS)]
    fields = dict(zip(FIELDS, values, strict=True))
    for name in FIELDS:
        if not fields[name]:
            raise AptRepoError(f"{path}: control file has no {name}")
    for name in ("Package", "Architecture"):
        if not NAME.fullmatch(fields[name]):
            raise AptRepoError(f"{path}: bad {name} {fields[name]!r}")
    deb = Deb(path, fields["Package"], fields["Version"], fields["Architecture"])
    # apt-ftparchive takes a binary-<arch> index's files by name, *_<arch>.deb, and leaves
    # any other out without a word.
    if not path.name.endswith(f"_{deb.arch}.deb"):
        raise AptRepoError(f"{path}: Architecture {deb.arch}, but not named *_{deb.arch}.deb")
    return deb


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
            if known is not deb and not filecmp.cmp(known.source, deb.source, shallow=False):
                raise AptRepoError(
                    f"two different files named {deb.source.name}: {known.source} and {path}"
                )
            listed = indexes.setdefault(codename, {}).setdefault(deb.arch, [])
            same = [d for d in listed if (d.package, d.version) == (deb.package, deb.version)]
            if any(not filecmp.cmp(d.source, deb.source, shallow=False) for d in same):
                raise AptRepoError(
                    f"{codename}: {deb.package} {deb.version} {deb.arch} given twice, "
                    f"as {same[0].source} and {path}"
                )
            if not same:
                listed.append(deb)
    return pool, indexes


def ftparchive(root: Path, *args: str) -> bytes:
    """apt-ftparchive's output, run in root; its first complaint as the error.

    It exits 0 after an error (a .deb it cannot read is left out of the index), so any
    message is taken as a failure: at -q=2 it prints nothing else."""
    try:
        proc = subprocess.run(
            ["apt-ftparchive", "-q=2", *CHECKSUMS, *args], cwd=root, capture_output=True
        )
    except FileNotFoundError:
        raise AptRepoError("apt-ftparchive not found (Debian's apt-utils)") from None
    complaints = proc.stderr.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or complaints:
        why = (complaints or [f"exited {proc.returncode}"])[0].removeprefix("E: ")
        raise AptRepoError(f"apt-ftparchive: {why}")
    return proc.stdout


def write_indexes(root: Path, indexes: dict[str, dict[str, list[Deb]]]) -> None:
    """dists/<codename>/main/binary-<arch>/Packages(.gz) for the pool already in root.

    One `generate` run with a file list per index: each codename lists only its own debs,
    though they share the pool. Paths are relative to root, so no path needs quoting in
    the config; its cache database stays in root's WORK folder, which is never published."""
    work = root / WORK
    work.mkdir()
    trees = []
    for codename, by_arch in indexes.items():
        for arch, debs in by_arch.items():
            # apt-ftparchive writes into the folders, it does not make them
            (root / "dists" / codename / COMPONENT / f"binary-{arch}").mkdir(parents=True)
            names = sorted(deb.filename for deb in debs)  # a reproducible index
            (work / f"{codename}_{arch}.list").write_text("".join(f"{n}\n" for n in names))
        trees.append(
            f'Tree "dists/{codename}" {{\n'
            f'  Sections "{COMPONENT}";\n'
            f'  Architectures "{" ".join(sorted(by_arch))}";\n'
            f'  FileList "{codename}_$(ARCH).list";\n'
            "};\n"
        )
    config = work / "generate.conf"
    config.write_text(
        f'Dir {{ ArchiveDir "."; CacheDir "{WORK}"; FileListDir "{WORK}"; }};\n'
        'Default { Packages::Compress ". gzip"; };\n' + "".join(trees)
    )
    ftparchive(root, "--no-contents", "generate", str(config.relative_to(root)))


def write_release(root: Path, codename: str, arches: list[str]) -> Path:
    """dists/<codename>/Release: what apt trusts, through its signature, for every index's
    hash.

    No Valid-Until: a fleet's repository is re-signed when a version is published, not on
    a schedule, and gateways must keep working between releases."""
    fields = {
        "Origin": ORIGIN,
        "Label": ORIGIN,
        "Suite": codename,
        "Codename": codename,
        "Architectures": " ".join(sorted(arches)),
        "Components": COMPONENT,
        "Description": f"smocsd packages for {codename}",
    }
    options = [f"APT::FTPArchive::Release::{name}={value}" for name, value in fields.items()]
    dist = Path("dists") / codename
    # written once apt-ftparchive is done: a Release already in dist would be hashed too
    release = ftparchive(root, *(f"--option={o}" for o in options), "release", str(dist))
    (root / dist / "Release").write_bytes(release)
    return root / dist / "Release"


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
        write_indexes(staging, indexes)
        signer = None if key is None else Signer(gnupghome, key)
        for codename, by_arch in indexes.items():
            release = write_release(staging, codename, list(by_arch))
            if signer is not None:
                signer.sign(release)
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
