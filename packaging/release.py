"""Cut a release of smocsd, build its packages and apt repository from its tag.

The commit of any release is found here too (commit_of, previous), for the upgrade test.

    packaging/release cut X.Y.Z
    packaging/release build vX.Y.Z --out DIR [--target CODENAME] [--gnupghome D --key K]

`cut` turns `## [Unreleased]` into `## [X.Y.Z] - <today, UTC>` under a new empty
Unreleased, sets smocsd.__version__, regenerates the documents that carry the version
(packaging/config_docs.py), commits "release: X.Y.Z" and tags it vX.Y.Z (annotated).
It refuses unless the worktree is clean, X.Y.Z is above the newest release and
Unreleased has items.

`build` builds from the tag alone, whatever the worktree holds: `git archive` of the tag
into a temporary folder, whose own packaging/build_deb.py makes DIR/dist/<codename>/*.deb,
then DIR/repo, the signed apt repository of exactly those packages (packaging/apt_repo.py).
It refuses a missing tag, a DIR that is not empty, and a tag whose CHANGELOG.md or
__version__ names another version.

Refusals exit 2, failures 1, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import apt_repo
import changelog

REPO = Path(__file__).resolve().parent.parent
TAG = re.compile(r"v(\d+\.\d+\.\d+)")
UNRELEASED = re.compile(r"^## \[Unreleased\][ \t]*$", re.M)
VERSION_LINE = re.compile(r'^__version__ = "[^"]*"$', re.M)

# 0.1.0 was tagged after the fact (fleets had installed that build from the apt repository
# before releases were cut), so no commit is titled "release: 0.1.0": a clone without tags
# finds it only by this record, the commit the tag v0.1.0 names.
RELEASE_0_1_0 = "db48fceff7b9bd6959434df44447afdea82f3e77"


class ReleaseError(Exception):
    """A release cannot be found, cut or built as asked (one line saying why)."""


class Refused(ReleaseError):
    """The request itself is wrong (exit 2): nothing was changed."""


def parse_version(text: str) -> tuple[int, int, int]:
    """ "X.Y.Z" as a tuple that compares as semantic versions do."""
    if not changelog.VERSION.fullmatch(text):
        raise Refused(f"{text!r}: not a version X.Y.Z")
    major, minor, patch = map(int, text.split("."))
    return major, minor, patch


def git(repo: Path, *args: str) -> str:
    """git's output in repo, stripped; ReleaseError with git's own message if it fails."""
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise ReleaseError(f"git {' '.join(args)}: {message}")
    return proc.stdout.strip()


def tagged(version: str, repo: Path = REPO) -> str | None:
    """The commit the tag v<version> names (through an annotated tag), None without it."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "-q", "--verify", f"refs/tags/v{version}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit_of(version: str, repo: Path = REPO) -> str:
    """The commit of release `version` in the clone at repo: its tag; without tags (a clone
    of a branch alone, as CI's fresh one), the commit `cut` titled "release: <version>";
    for 0.1.0, tagged after the fact, the recorded commit."""
    parse_version(version)
    commit = tagged(version, repo)
    if commit:
        return commit
    subject = f"release: {version}"
    log = git(repo, "log", "--format=%H %s", "HEAD")
    found = [line[:40] for line in log.splitlines() if line[41:] == subject]
    if len(found) > 1:
        raise ReleaseError(
            f"{repo}: {len(found)} commits titled {subject!r}, and no tag v{version}"
        )
    if found:
        return found[0]
    if version == "0.1.0":
        git(repo, "cat-file", "-e", f"{RELEASE_0_1_0}^{{commit}}")
        return RELEASE_0_1_0
    raise ReleaseError(f"{repo}: no tag v{version} and no commit titled {subject!r}")


def upstream_version(root: Path = REPO) -> str:
    """The tree's smocsd.__version__, as its own packaging/build_deb.py reads it for the
    packages it builds (so a tag is checked against what its packages will say)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import build_deb; print(build_deb.upstream_version())"],
        cwd=root / "packaging",
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ReleaseError(f"{root}/smocsd/__init__.py: no version read: {lines[-1]}")
    return proc.stdout.strip()


def previous(version: str | None = None) -> str:
    """The newest release in CHANGELOG.md strictly below `version` (default: this tree's
    smocsd.__version__): the one a fleet upgrades from."""
    version = version or upstream_version()
    below = [
        s.name for s in changelog.read().releases if parse_version(s.name) < parse_version(version)
    ]
    if not below:
        raise ReleaseError(f"CHANGELOG.md: no release below {version}")
    return max(below, key=parse_version)


# --- cut


def cut(version: str, repo: Path = REPO) -> str:
    """Cut release `version` in the clone at repo; returns its commit."""
    wanted = parse_version(version)
    if git(repo, "status", "--porcelain"):
        raise Refused(f"{repo}: the worktree is not clean (git status): commit the changes first")
    path = repo / "CHANGELOG.md"
    log = changelog.read(path)
    if log.releases and wanted <= parse_version(log.releases[0].name):
        raise Refused(f"{version} is not above the newest release, {log.releases[0].name}")
    if log.unreleased.empty:
        raise Refused(f"{path}: nothing under ## [Unreleased] to release")
    if tagged(version, repo):
        raise Refused(f"{repo}: the tag v{version} exists already")
    init = repo / "smocsd" / "__init__.py"
    source, found = VERSION_LINE.subn(f'__version__ = "{version}"', init.read_text())
    if found != 1:
        raise Refused(f'{init}: {found} lines `__version__ = "..."`, not 1')

    # The date of the release is the day it is cut, as UTC says: one answer wherever the
    # release manager sits, so the Debian changelog and the man page agree with it.
    today = datetime.now(timezone.utc).date().isoformat()
    heading = f"## [Unreleased]\n\n## [{version}] - {today}"
    path.write_text(UNRELEASED.sub(heading, path.read_text(), count=1))
    init.write_text(source)
    docs = subprocess.run(
        [sys.executable, str(repo / "packaging" / "config_docs.py")],
        capture_output=True,
        text=True,
    )
    if docs.returncode != 0:
        lines = docs.stderr.strip().splitlines() or [f"exit status {docs.returncode}"]
        raise ReleaseError(
            f"packaging/config_docs.py: {lines[-1]} (`git checkout -- .` undoes the edits)"
        )
    git(repo, "commit", "-q", "-a", "-m", f"release: {version}")
    git(repo, "tag", "-a", f"v{version}", "-m", f"smocsd {version}")
    return git(repo, "rev-parse", "HEAD")


# --- build


def extract(revision: str, dest: Path, repo: Path = REPO) -> None:
    """The tree of `revision` (a tag or a commit) in dest, by `git archive`: whatever the
    worktree holds, and the repository's worktrees stay as they are."""
    archive = dest / ".source.tar"
    git(repo, "archive", f"--output={archive}", revision)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    archive.unlink()


def build_packages(
    tree: Path, out: Path, target: str = "all", arch: str = "all", *extra: str, **run: Any
) -> subprocess.CompletedProcess:
    """The packages of the tree at `tree` into out/<codename>/, by that tree's own
    packaging/build_deb.py: what that commit builds, not what this checkout's packaging
    would make of its sources. `run` goes to subprocess.run (e.g. capture_output)."""
    build_deb = tree / "packaging" / "build_deb.py"
    command = [sys.executable, str(build_deb), arch, "--target", target, "--out", str(out)]
    return subprocess.run([*command, *extra], cwd=tree, check=False, **run)


def check_tree(root: Path, version: str, tag: str) -> None:
    """The tree of `tag` at root is release `version`: its CHANGELOG.md's newest release and
    its __version__ say so (a tag on the wrong commit is refused before a long build)."""
    try:
        log = changelog.read(root / "CHANGELOG.md")
    except FileNotFoundError:
        raise Refused(f"{tag}: no CHANGELOG.md in its tree: not cut by packaging/release") from None
    newest = log.releases[0].name if log.releases else "none"
    if newest != version:
        raise Refused(f"{tag}: its CHANGELOG.md's newest release is {newest}, not {version}")
    declared = upstream_version(root)
    if declared != version:
        raise Refused(f"{tag}: its smocsd/__init__.py says __version__ = {declared!r}")


def build(
    tag: str,
    out: Path,
    *,
    target: str = "all",
    gnupghome: Path | None = None,
    key: str | None = None,
    repo: Path = REPO,
) -> dict[str, list[Path]]:
    """Build release `tag`'s packages into out/dist and its apt repository into out/repo;
    returns the packages by codename."""
    match = TAG.fullmatch(tag)
    if not match:
        raise Refused(f"{tag!r}: not a release tag vX.Y.Z")
    version = match[1]
    if not tagged(version, repo):
        raise Refused(f"{repo}: no tag {tag} (packaging/release cut {version} makes it)")
    if out.exists() and any(out.iterdir()):
        raise Refused(f"{out}: not empty: the output of one release goes into a new folder")
    dist = out / "dist"
    with tempfile.TemporaryDirectory(prefix=f"smocsd-{version}-") as tmp:
        source = Path(tmp)
        extract(tag, source, repo)
        check_tree(source, version, tag)
        built = build_packages(source, dist.resolve(), target)
        if built.returncode != 0:
            raise ReleaseError(f"{tag}: packaging/build_deb.py failed (exit {built.returncode})")
    debs = {d.name: sorted(d.glob("*.deb")) for d in sorted(dist.iterdir()) if d.is_dir()}
    apt_repo.build(debs, out / "repo", gnupghome=gnupghome, key=key)
    return debs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packaging/release", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cut_ = commands.add_parser("cut", help="cut release X.Y.Z from CHANGELOG.md's Unreleased")
    cut_.add_argument("version", metavar="X.Y.Z")
    build_ = commands.add_parser("build", help="build tag vX.Y.Z's packages and apt repository")
    build_.add_argument("tag", metavar="vX.Y.Z")
    build_.add_argument("--out", type=Path, required=True, help="an empty or new folder")
    build_.add_argument(
        "--target", default="all", help="one codename instead of all (packaging/build_deb.py's)"
    )
    build_.add_argument("--gnupghome", type=Path, help="GnuPG home holding the signing key")
    build_.add_argument("--key", help="signing key (fingerprint); unsigned without it")
    args = parser.parse_args(argv)
    try:
        if args.command == "cut":
            commit = cut(args.version)
            print(f"release: cut {args.version} as {commit[:12]}, tagged v{args.version}")
            print(f"release: next: git push origin HEAD v{args.version}")
            print(f"release: then: packaging/release build v{args.version} --out DIR")
        else:
            debs = build(
                args.tag, args.out, target=args.target, gnupghome=args.gnupghome, key=args.key
            )
            for codename, paths in debs.items():
                print(f"release: {args.out}/repo/dists/{codename}: {len(paths)} package(s)")
            if args.key is None:
                print("release: the repository is unsigned: apt refuses it", file=sys.stderr)
    except (Refused, changelog.ChangelogError) as exc:
        print(f"release: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (ReleaseError, apt_repo.AptRepoError, OSError, subprocess.CalledProcessError) as exc:
        print(f"release: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0
