"""One version, released: smocsd.__version__ is the version everything states, and
packaging/release cuts a release from CHANGELOG.md and finds the commit of any of them.

`cut` runs for real, as an operator runs it, in clones of a clone holding this worktree
as one commit (so what is tested is the code here, committed or not), never in the
checkout itself. `build` takes minutes (eight packages), so only its refusals run here.

Needs git and this checkout's history (not a source tarball, not a shallow clone); under
CI (CI=true) their absence fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import smocsd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
import build_deb  # noqa: E402 - development tools, not part of the package
import changelog  # noqa: E402
import release  # noqa: E402

VERSION = smocsd.__version__
TITLE = re.compile(r'\.TH SMOCSD 1 "(?P<date>[\d-]+)" "smocsd (?P<version>[^"]+)" ')


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _need_history() -> None:
    """git, and this checkout's history down to 0.1.0's commit."""
    reason = None
    if not shutil.which("git"):
        reason = "missing: git"
    elif not (ROOT / ".git").exists():
        reason = f"{ROOT}: not a git checkout"
    elif subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{release.RELEASE_0_1_0}^{{commit}}"]
    ).returncode:
        reason = f"{ROOT}: no commit {release.RELEASE_0_1_0} (a shallow clone?)"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _identify(repo: Path) -> None:
    """A committer for `cut`'s commit and tag, whatever the host's git knows."""
    _git(repo, "config", "user.name", "release test")
    _git(repo, "config", "user.email", "release-test@example.org")


@pytest.fixture(scope="module")
def worktree(tmp_path_factory) -> Path:
    """A clone of this checkout whose HEAD is its worktree as it is, with something under
    Unreleased (right after a release there is nothing)."""
    _need_history()
    base = tmp_path_factory.mktemp("release") / "base"
    _git(ROOT, "clone", "-q", str(ROOT), str(base))
    _identify(base)
    listed = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for rel in filter(None, listed.split("\0")):
        source, copy = ROOT / rel, base / rel
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
        else:  # deleted in the worktree
            copy.unlink(missing_ok=True)
    if changelog.read(base / "CHANGELOG.md").unreleased.empty:
        _add_unreleased(base, "The change the test releases.")
    _git(base, "add", "-A")
    _git(base, "commit", "-q", "--allow-empty", "-m", "the worktree under test")
    return base


@pytest.fixture
def clone(worktree, tmp_path) -> Path:
    repo = tmp_path / "repo"
    _git(worktree, "clone", "-q", str(worktree), str(repo))
    _identify(repo)
    return repo


def _add_unreleased(repo: Path, item: str) -> None:
    path = repo / "CHANGELOG.md"
    path.write_text(
        path.read_text().replace(
            "## [Unreleased]\n", f"## [Unreleased]\n\n### Fixed\n- {item}\n", 1
        )
    )


def _release(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """The repository's own packaging/release, as an operator runs it."""
    return subprocess.run(
        [repo / "packaging" / "release", *args], capture_output=True, text=True, timeout=120
    )


def _next_minor(version: str) -> str:
    major, minor, _ = release.parse_version(version)
    return f"{major}.{minor + 1}.0"


# --- the versions agree


def test_every_version_stated_is_smocsds():
    proc = subprocess.run(
        [sys.executable, "-m", "smocsd", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.stdout.strip() == f"smocsd {VERSION}"
    assert build_deb.upstream_version() == VERSION
    for codename, target in build_deb.TARGETS.items():
        assert build_deb.package_version(codename) == f"{VERSION}-1{target.suffix}"
    title = TITLE.match((ROOT / "packaging/smocsd.1").read_text())
    assert title and title["version"] == VERSION


def test_the_contract_gives_every_package_version_form():
    text = (ROOT / "docs/contract.md").read_text()
    versions = text[text.index("\n## Versions\n") :]
    for target in build_deb.TARGETS.values():
        assert f"`{target.suffix}`" in versions, target.codename
    assert "`smocsd X.Y.Z`" in versions


def test_the_version_is_the_newest_release_or_above_it():
    releases = changelog.read().releases
    assert releases, "CHANGELOG.md: no release"
    newest = releases[0]
    assert release.parse_version(VERSION) >= release.parse_version(newest.name)
    # The man page's date: this version's release, or before it is cut the newest one's.
    title = TITLE.match((ROOT / "packaging/smocsd.1").read_text())
    assert title and title["date"] == str(newest.date)


# --- commit_of and previous on this repository


def test_a_release_is_found_by_its_tag_peeled(clone):
    parent = _git(clone, "rev-parse", "HEAD~1")
    _git(clone, "tag", "-a", "-m", "annotated", "v0.0.7", parent)
    assert release.commit_of("0.0.7", clone) == parent
    _tag_0_1_0(clone)
    assert release.tagged("0.1.0", clone) == release.RELEASE_0_1_0


def _tag_0_1_0(repo: Path) -> None:
    """The tag v0.1.0 as this checkout has it, or as a clone of a branch alone lacks it."""
    if not release.tagged("0.1.0", repo):
        _git(repo, "tag", "-a", "-m", "smocsd 0.1.0", "v0.1.0", release.RELEASE_0_1_0)


def test_without_tags_0_1_0_is_the_recorded_commit(worktree, tmp_path):
    repo = tmp_path / "untagged"
    _git(worktree, "clone", "-q", "--no-tags", str(worktree), str(repo))
    assert _git(repo, "tag") == ""
    assert release.commit_of("0.1.0", repo) == release.RELEASE_0_1_0
    with pytest.raises(release.ReleaseError, match=r"no tag v0\.0\.9 and no commit titled"):
        release.commit_of("0.0.9", repo)
    with pytest.raises(release.ReleaseError, match="not a version"):
        release.commit_of("v0.1.0", repo)


def test_previous_is_the_newest_release_below():
    newest = changelog.read().releases[0].name
    assert release.previous(_next_minor(newest)) == newest
    assert release.previous("0.1.1") == "0.1.0"
    with pytest.raises(release.ReleaseError, match=r"no release below 0\.1\.0"):
        release.previous("0.1.0")


# --- cut


def test_cut_makes_the_release_commit_and_tag(clone, tmp_path):
    old = changelog.read(clone / "CHANGELOG.md")
    version = _next_minor(old.releases[0].name)
    proc = _release(clone, "cut", version)
    assert proc.returncode == 0, proc.stderr
    today = datetime.now(timezone.utc).date()

    commit = _git(clone, "rev-parse", "HEAD")
    assert _git(clone, "log", "-1", "--format=%s") == f"release: {version}"
    assert _git(clone, "cat-file", "-t", f"v{version}") == "tag"  # annotated
    assert _git(clone, "rev-parse", f"v{version}^{{commit}}") == commit
    assert _git(clone, "status", "--porcelain") == ""

    new = changelog.read(clone / "CHANGELOG.md")
    assert new.unreleased.empty
    assert (new.releases[0].name, new.releases[0].date) == (version, today)
    assert new.releases[0].items == old.unreleased.items
    assert [s.name for s in new.releases[1:]] == [s.name for s in old.releases]
    init = (clone / "smocsd/__init__.py").read_text()
    assert f'\n__version__ = "{version}"\n' in init
    title = TITLE.match((clone / "packaging/smocsd.1").read_text())
    assert title and (title["version"], title["date"]) == (version, str(today))
    assert release.commit_of(version, clone) == commit

    # A clone of the branch alone finds the release by its commit's subject, and the
    # released tree's previous release is the one it was cut above.
    untagged = tmp_path / "untagged"
    _git(clone, "clone", "-q", "--no-tags", str(clone), str(untagged))
    assert release.commit_of(version, untagged) == commit
    proc = subprocess.run(
        [sys.executable, "-c", "import release; print(release.previous())"],
        cwd=clone / "packaging",
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == old.releases[0].name, proc.stderr


def test_versions_compare_as_numbers(clone):
    """0.x.10 is above 0.x.9: a comparison of strings would refuse it, and accept 0.x.9
    after it."""
    major, minor, _ = release.parse_version(_next_minor(VERSION))
    nine, ten = f"{major}.{minor}.9", f"{major}.{minor}.10"
    assert _release(clone, "cut", nine).returncode == 0
    _add_unreleased(clone, "Another change.")
    _git(clone, "commit", "-q", "-am", "another change")
    assert _release(clone, "cut", ten).returncode == 0
    proc = _release(clone, "cut", nine)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"release: {nine} is not above the newest release, {ten}\n",
    )


def _refusal(clone: Path, *args: str) -> str:
    """packaging/release's one line of refusal; nothing may have changed."""
    head = _git(clone, "rev-parse", "HEAD")
    status = _git(clone, "status", "--porcelain")
    proc = _release(clone, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert _git(clone, "rev-parse", "HEAD") == head
    assert _git(clone, "status", "--porcelain") == status
    return proc.stderr


def test_cut_refuses_a_dirty_worktree(clone):
    (clone / "notes.txt").write_text("not committed\n")
    assert "not clean" in _refusal(clone, "cut", _next_minor(VERSION))


def test_cut_refuses_a_version_not_above_the_newest_release(clone):
    newest = changelog.read(clone / "CHANGELOG.md").releases[0].name
    assert f"not above the newest release, {newest}" in _refusal(clone, "cut", newest)
    assert "not a version X.Y.Z" in _refusal(clone, "cut", "1.0")


def test_cut_refuses_an_empty_unreleased(clone):
    path = clone / "CHANGELOG.md"
    text = path.read_text()
    head, _, rest = text.partition("## [Unreleased]\n")
    path.write_text(head + "## [Unreleased]\n\n" + rest[rest.index("\n## [") + 1 :])
    _git(clone, "commit", "-q", "-am", "nothing unreleased")
    assert "nothing under ## [Unreleased]" in _refusal(clone, "cut", _next_minor(VERSION))


def test_cut_refuses_a_version_already_tagged(clone):
    version = _next_minor(VERSION)
    _git(clone, "tag", f"v{version}", "HEAD~1")
    assert f"the tag v{version} exists already" in _refusal(clone, "cut", version)


# --- build's refusals, before anything is built


def test_build_refuses_a_missing_tag(clone, tmp_path):
    out = tmp_path / "out"
    assert "no tag v9.9.9" in _refusal(clone, "build", "v9.9.9", "--out", str(out))
    assert not out.exists()


def test_build_refuses_a_tag_that_is_no_release_cut_here(clone, tmp_path):
    """v0.1.0's tree predates CHANGELOG.md; a tag on a commit whose CHANGELOG.md names
    another release is refused the same way, before the packages are built."""
    _tag_0_1_0(clone)
    line = _refusal(clone, "build", "v0.1.0", "--out", str(tmp_path / "out"))
    assert "v0.1.0: no CHANGELOG.md" in line
    newest = changelog.read(clone / "CHANGELOG.md").releases[0].name
    wrong = _next_minor(VERSION)
    _git(clone, "tag", f"v{wrong}")
    line = _refusal(clone, "build", f"v{wrong}", "--out", str(tmp_path / "out"))
    assert f"newest release is {newest}, not {wrong}" in line
