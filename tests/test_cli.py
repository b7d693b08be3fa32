"""The command line around the parts: check-config beyond parsing, reading commands that
create nothing, the switch to the state directory's owner, errors that name their file."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_forked, smocsd, write_config

from smocsd.data import demo
from smocsd.store import ModelStore

NOBODY = 65534
UNNAMED = 54321  # a uid with no passwd entry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

READERS = [
    ("status",),
    ("status", "--json"),
    ("models", "list"),
    ("models", "list", "--json"),
    ("models", "show", "1"),
    ("outbox", "list"),
    ("outbox", "list", "--json"),
    ("labels",),
    ("labels", "list", "--json"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with one trained version (v000001, current) whose result waits
    in the outbox (publish.order is empty)."""
    root = tmp_path_factory.mktemp("trained")
    state = root / "state"
    demo.write(state / "readings.db", 3000)
    smocsd("train-once", "--force", config=write_config(root / "c.toml", state), check=True)
    return state


def listing(root: Path) -> list[str]:
    """Every entry under `root` with its type, mode, owner, size and mtime."""
    out = subprocess.run(
        ["find", str(root), "-printf", r"%p %y %m %U:%G %s %T@\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(out.splitlines())


def chown_tree(root: Path, uid: int) -> None:
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(root)], check=True)


# --- check-config


def test_check_config_checks_the_table_and_columns(tmp_path):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 100)
    good = write_config(tmp_path / "good.toml", state)
    proc = smocsd("check-config", config=good)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{good}: ok\n", "")

    typo = write_config(tmp_path / "typo.toml", state, source={"channels": ["temperature", "vib"]})
    proc = smocsd("check-config", config=typo)
    assert (proc.returncode, proc.stdout) == (78, "")
    assert proc.stderr == (
        f'{typo}: source.channels: {state}/readings.db: no such column "vib" in table readings\n'
    )

    table = write_config(tmp_path / "table.toml", state, source={"table": "reading"})
    proc = smocsd("check-config", config=table)
    assert proc.returncode == 78
    assert proc.stderr.startswith(f"{table}: source.table: {state}/readings.db: no such table")


def test_check_config_checks_each_models_table_and_names_its_keys(tmp_path):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 100)
    cfg = write_config(tmp_path / "c.toml", state)
    cfg.write_text(
        cfg.read_text()
        + '[models.a.source]\ntable = "readings"\n'
        + '[models.b.source]\ntable = "readings"\npartition_column = "asset"\n'
        + '[models.c.source]\npath = "other.db"\n'
    )
    proc = smocsd("check-config", config=cfg)
    assert (proc.returncode, proc.stdout) == (78, "")
    assert proc.stderr.splitlines() == [
        f'{cfg}: models.b.source.partition_column: {state}/readings.db: no such column "asset" '
        "in table readings",
        f"{cfg}: models.c.source not checked: {state}/other.db: no such database file "
        "(source.path); waiting for the ingest to create it",
    ]


def test_check_config_notes_a_database_it_cannot_reach_without_failing(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    cfg = write_config(tmp_path / "c.toml", state)
    proc = smocsd("check-config", config=cfg)
    assert (proc.returncode, proc.stdout) == (0, "")  # "ok" only when everything was checked
    assert proc.stderr.startswith(
        f"{cfg}: source not checked: {state}/readings.db: no such database file"
    )

    source = {"kind": "postgres", "dsn": "postgresql://smocsd@127.0.0.1:1/plant"}
    pg = write_config(tmp_path / "pg.toml", state, source={**source, "order_column": "id"})
    proc = smocsd("check-config", config=pg)
    assert (proc.returncode, proc.stdout) == (0, "")
    assert proc.stderr.startswith(f"{pg}: source not checked: postgres: cannot connect")


def test_check_config_reports_secrets_ca_files_and_columns_at_once(tmp_path):
    state = tmp_path / "state"
    demo.write(state / "readings.db", 100)
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o640)
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        source={"channels": ["temperature", "vib"]},
        publish={"order": ["mqtt"]},
        **{
            "publish.mqtt": {
                "username": "gw",
                "password_file": str(secret),
                "tls": True,
                "ca_file": str(tmp_path / "ca.pem"),
            },
            "publish.kafka": {"sasl_password_file": str(tmp_path)},
        },
    )
    proc = smocsd("check-config", config=cfg)
    assert (proc.returncode, proc.stdout) == (78, "")
    assert proc.stderr.splitlines() == [
        f"{cfg}: publish.kafka.sasl_password_file: {tmp_path}: not a regular file",
        f"{cfg}: publish.mqtt.password_file: {secret}: accessible by group or others "
        f"(chmod go-rwx {secret})",
        f"{cfg}: publish.mqtt.ca_file: {tmp_path}/ca.pem: No such file or directory",
        f'{cfg}: source.channels: {state}/readings.db: no such column "vib" in table readings',
    ]
    secret.chmod(0o600)
    (tmp_path / "ca.pem").write_text("a certificate\n")
    fixed = write_config(
        tmp_path / "fixed.toml",
        state,
        **{"publish.mqtt": {"username": "gw", "password_file": str(secret)}},
    )
    proc = smocsd("check-config", config=fixed)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{fixed}: ok\n", "")


@needs_root
def test_check_config_run_by_root_judges_secrets_for_the_state_dirs_owner(tmp_path):
    """`sudo smocsd check-config`: a root-owned secret is one the daemon cannot read."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 100)
    os.chown(state, NOBODY, NOBODY)
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    cfg = write_config(
        tmp_path / "c.toml", state, **{"publish.mqtt": {"username": "gw", "password_file": secret}}
    )
    proc = smocsd("check-config", config=cfg)
    assert proc.returncode == 78
    assert proc.stderr == (
        f"{cfg}: publish.mqtt.password_file: {secret}: owned by root, not nobody "
        f"(chown nobody {secret})\n"
    )
    os.chown(secret, NOBODY, -1)
    assert smocsd("check-config", config=cfg).returncode == 0


@needs_root
def test_check_config_refuses_a_secret_another_user_owns_even_for_root(tmp_path):
    """Root reads any file, but the secret's owner (nobody here) could read it too; the
    daemon, run as root on root's state directory, refuses it as check-config does."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 100)
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    os.chown(secret, NOBODY, -1)
    cfg = write_config(
        tmp_path / "c.toml", state, **{"publish.mqtt": {"username": "gw", "password_file": secret}}
    )
    proc = smocsd("check-config", config=cfg)
    assert (proc.returncode, proc.stdout) == (78, "")
    assert proc.stderr == (
        f"{cfg}: publish.mqtt.password_file: {secret}: owned by nobody, not root "
        f"(chown root {secret})\n"
    )


def test_check_config_says_the_dsn_holds_a_password_and_never_prints_it(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    source = {"kind": "postgres", "order_column": "id"}
    cfg = write_config(
        tmp_path / "c.toml",
        state,
        source={**source, "dsn": "postgresql://smocsd:hunter2@127.0.0.1:1/plant"},
    )
    proc = smocsd("check-config", config=cfg)
    assert (proc.returncode, proc.stdout) == (0, "")  # the database is down: not checked
    warning, note = proc.stderr.splitlines()
    assert warning.endswith(
        f"WARNING smocsd: {cfg}: source.dsn: holds a password, which anyone who can read this "
        "file can read: move it to the file source.password_file names (or the systemd "
        "credential pg-password)"
    )
    assert note.startswith(f"{cfg}: source not checked: postgres: cannot connect")
    assert "hunter2" not in proc.stderr

    bad = write_config(tmp_path / "bad.toml", state, source={**source, "dsn": "password=hun ter2"})
    proc = smocsd("check-config", config=bad)
    assert (proc.returncode, proc.stdout) == (78, "")
    assert proc.stderr == (
        f"{bad}: source.dsn: not a libpq connection string (a URI or key=value pairs)\n"
    )


# --- the state directory


def test_a_state_dir_whose_parent_is_missing_is_refused_by_every_command_that_writes(tmp_path):
    """A typo higher up the path, or a disk not mounted yet: a state started afresh there
    would be one nobody looks at."""
    state = tmp_path / "stat" / "state"
    cfg = write_config(tmp_path / "c.toml", state)
    line = (
        f"{cfg}: daemon.state_dir: {state} does not exist, nor does {tmp_path}/stat "
        "(only the last component is created)"
    )
    for command in ("run", "train-once"):
        proc = smocsd(command, config=cfg)
        assert (proc.returncode, proc.stdout, proc.stderr) == (78, "", line + "\n"), command
    proc = smocsd("check-config", config=cfg)
    assert (proc.returncode, proc.stderr.splitlines()[0]) == (78, line)
    assert list(tmp_path.iterdir()) == [cfg]

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cfg = write_config(tmp_path / "c.toml", not_a_dir)
    proc = smocsd("train-once", config=cfg)
    assert (proc.returncode, proc.stderr) == (
        78,
        f"{cfg}: daemon.state_dir: {not_a_dir}: not a directory\n",
    )


def test_train_once_creates_only_the_last_component_and_says_so(tmp_path):
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "c.toml", state)
    proc = smocsd("train-once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "skipped"  # no readings yet
    assert (
        f"WARNING smocsd: created the state directory {state} (daemon.state_dir): no models yet"
        in proc.stderr
    )
    proc = smocsd("train-once", config=cfg)
    assert proc.returncode == 0 and "created" not in proc.stderr


def test_a_state_dir_that_cannot_be_created_is_a_configuration_error(tmp_path, readonly_state):
    """As under the unit's sandbox, where every path but StateDirectory='s is read-only."""
    state = readonly_state / "smocsdd"
    cfg = write_config(tmp_path / "c.toml", state)
    for command in ("run", "train-once"):
        proc = smocsd(command, config=cfg)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            78,
            "",
            f"{cfg}: daemon.state_dir: {state}: cannot create: Read-only file system\n",
        ), command


# --- integer options


HUGE = "99999999999999999999"  # beyond a signed 64-bit integer
ORDERS = (
    "an integer from -9223372036854775808 to 9223372036854775807 "
    "(signed 64 bits, as order values are)"
)
VERSIONS = "an integer from 1 to 9223372036854775807 (versions start at 1)"


@pytest.mark.parametrize(
    ("command", "option", "allowed", "value"),
    [
        (("score", "--from", HUGE), "--from", ORDERS, HUGE),
        (("score", "--to", "-" + HUGE), "--to", ORDERS, "-" + HUGE),
        (("score", "--version", "0"), "--version", VERSIONS, "0"),
        (("score", "--version", "-1"), "--version", VERSIONS, "-1"),
        (("score", "--version", HUGE), "--version", VERSIONS, HUGE),
        (("models", "show", "0"), "version", VERSIONS, "0"),
        (("models", "rollback", "-2"), "version", VERSIONS, "-2"),
        (("accept", "--from", HUGE), "--from", ORDERS, HUGE),
        (("exclude", "--from", "1", "--to", HUGE), "--to", ORDERS, HUGE),
        (
            ("labels", "remove", "0"),
            "id",
            "an integer from 1 to 9223372036854775807 (label ids start at 1)",
            "0",
        ),
        (("demo", "--rows", "-1"), "--rows", "an integer from 0 to 10000000", "-1"),
        (("demo", "--rows", HUGE), "--rows", "an integer from 0 to 10000000", HUGE),
        (("demo", "--follow", "--rate", "0"), "--rate", "an integer from 1 to 100000", "0"),
        (
            ("score", "--from", "9" * 5000),
            "--from",
            ORDERS,
            "99999999999999999999... (5000 characters)",
        ),
    ],
)
def test_an_integer_option_out_of_range_is_one_usage_line_naming_it(
    tmp_path, command, option, allowed, value
):
    state = tmp_path / "state"
    state.mkdir()
    proc = smocsd(*command, config=write_config(tmp_path / "c.toml", state))
    name = " ".join(command[:2] if command[0] in ("models", "labels") else command[:1])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines()[-1] == (
        f"smocsd {name}: error: argument {option}: must be {allowed}, got {value}"
    )
    assert list(state.iterdir()) == []


def test_score_from_the_smallest_order_value_scores_every_row(tmp_path, trained):
    cfg = write_config(tmp_path / "c.toml", trained)
    every = smocsd("score", "--json", config=cfg, check=True).stdout
    lowest = smocsd("score", "--from", "-9223372036854775808", "--json", config=cfg, check=True)
    assert lowest.stdout == every and every


# --- reading commands read only


@pytest.mark.parametrize("command", [*READERS, ("models", "rollback"), ("outbox", "flush")])
def test_a_missing_state_dir_is_reported_not_created(tmp_path, command):
    state = tmp_path / "stat"  # a typo of "state"
    proc = smocsd(*command, config=write_config(tmp_path / "c.toml", state))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"smocsd: state directory {state} does not exist (daemon.state_dir)\n"
    assert not state.exists()


@pytest.mark.parametrize("populated", [False, True], ids=["empty", "trained"])
def test_reading_commands_create_nothing_in_another_users_state_dir(tmp_path, trained, populated):
    state = tmp_path / "state"
    if populated:
        shutil.copytree(trained, state, symlinks=True)
    else:
        state.mkdir()
    if os.geteuid() == 0:
        chown_tree(state, NOBODY)
    cfg = write_config(tmp_path / "c.toml", state)
    before = listing(state)
    for command in READERS:
        proc = smocsd(*command, config=cfg)
        if command[:2] == ("models", "show") and not populated:
            assert proc.stderr == "smocsd: model version 1 does not exist\n"
        else:
            assert proc.returncode == 0, (command, proc.stderr)
            assert "running as" not in proc.stderr  # reading needs no switch
    assert listing(state) == before
    status = json.loads(smocsd("status", "--json", config=cfg).stdout)
    assert (status["current_version"], status["outbox_depth"]) == (
        (1, 1) if populated else (None, 0)
    )


@pytest.fixture
def readonly_state(tmp_path: Path, trained: Path) -> Iterator[Path]:
    """A copy of `trained` on a tmpfs mounted read-only: root ignores file modes, not that."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    state = tmp_path / "state"
    state.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "smocsd-test", str(state)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    try:
        shutil.copytree(trained, state, symlinks=True, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        yield state
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_reading_commands_work_on_a_read_only_state_dir(tmp_path, readonly_state):
    state = readonly_state
    cfg = write_config(tmp_path / "c.toml", state)
    before = listing(state)
    for command in READERS:
        proc = smocsd(*command, config=cfg)
        assert proc.returncode == 0, (command, proc.stderr)
    status = json.loads(smocsd("status", "--json", config=cfg).stdout)
    assert (status["current_version"], status["current_problem"]) == (1, None)
    assert status["outbox_depth"] == 1
    models = json.loads(smocsd("models", "list", "--json", config=cfg).stdout)
    assert [(m["version"], m["current"], m["problem"]) for m in models] == [(1, True, None)]
    assert json.loads(smocsd("models", "show", "1", "--json", config=cfg).stdout)["version"] == 1
    (waiting,) = json.loads(smocsd("outbox", "list", "--json", config=cfg).stdout)
    assert waiting["outcome"] == "promoted"
    assert listing(state) == before

    # A writing command cannot, and says which file it could not write.
    proc = smocsd("outbox", "flush", config=cfg)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"smocsd: {state}/outbox.db: "), proc.stderr
    proc = smocsd("demo", "--rows", "10", config=cfg)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"smocsd: {state}/readings.db: "), proc.stderr


def test_a_damaged_version_is_marked_in_status_and_models_list(tmp_path, trained):
    state = tmp_path / "state"
    shutil.copytree(trained, state, symlinks=True)
    cfg = write_config(tmp_path / "c.toml", state)
    model = state / "models" / "autoencoder" / "v000001" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    problem = ModelStore(model.parents[1], 5).check(1)
    assert problem and problem.startswith("v000001/model.onnx: ")

    status = smocsd("status", config=cfg, check=True).stdout.splitlines()
    assert f"current:     v000001 DAMAGED: {problem}" in status
    assert json.loads(smocsd("status", "--json", config=cfg).stdout)["current_problem"] == problem
    (row,) = json.loads(smocsd("models", "list", "--json", config=cfg).stdout)
    assert (row["version"], row["problem"]) == (1, problem)
    text = smocsd("models", "list", config=cfg, check=True).stdout.splitlines()
    assert text[1].startswith("*!v000001") and text[2] == f"    {problem}"


def test_a_dangling_current_link_is_named_by_status_and_models_list(tmp_path, trained):
    """`current` left pointing at a version removed by hand: nothing is current, and the
    reading commands say why instead of showing an empty store."""
    state = tmp_path / "state"
    shutil.copytree(trained, state, symlinks=True)
    cfg = write_config(tmp_path / "c.toml", state)
    models = state / "models" / "autoencoder"
    shutil.rmtree(models / "v000001")
    problem = f"{models}/current -> v000001: no such version directory (dangling link)"

    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert (status["current_version"], status["current_problem"]) == (None, problem)
    assert (
        f"current:     none DANGLING: {problem}"
        in smocsd("status", config=cfg, check=True).stdout.splitlines()
    )
    text = smocsd("models", "list", config=cfg, check=True).stdout.splitlines()
    assert text[1:] == [f"no current version: {problem}"]
    assert json.loads(smocsd("models", "list", "--json", config=cfg).stdout) == []

    result = json.loads(smocsd("train-once", "--force", config=cfg, check=True).stdout)
    assert (result["outcome"], result["version"]) == ("promoted", 2)  # numbers never reused
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert (status["current_version"], status["current_problem"]) == (2, None)


def test_status_says_which_backend_this_install_trains_with(tmp_path, trained):
    """training.backend resolved as training resolves it (`auto`: the backend v000001 was
    trained with), from the files alone: an onnxruntime that fails to import is never hit."""
    cfg = write_config(tmp_path / "auto.toml", trained)
    meta = json.loads((trained / "models/autoencoder/v000001/metadata.json").read_text())
    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert (status["training_backend"], status["training_backend_problem"]) == (
        meta["backend"],
        None,
    )
    text = smocsd("status", config=cfg, check=True).stdout.splitlines()
    assert f"backend:     {meta['backend']} (training.backend = auto)" in text

    # An onnxruntime ahead of the real one, plain (no training API), that raises if imported.
    fake = tmp_path / "site" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('status imported onnxruntime')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(Path(__file__).parent)])}

    def backend(setting: str) -> tuple[str | None, str | None, list[str]]:
        path = write_config(tmp_path / f"{setting}.toml", trained, training={"backend": setting})
        status = json.loads(smocsd("status", "--json", config=path, env=env, check=True).stdout)
        text = smocsd("status", config=path, env=env, check=True).stdout.splitlines()
        lines = [line for line in text if line.startswith("backend:")]
        return status["training_backend"], status["training_backend_problem"], lines

    assert backend("auto") == ("numpy", None, ["backend:     numpy (training.backend = auto)"])
    assert backend("numpy") == ("numpy", None, ["backend:     numpy (training.backend = numpy)"])
    problem = (
        "training.backend = 'ort' but ONNX Runtime training is not available: "
        "onnxruntime-training-cpu is not installed (it exists for x86_64 Linux, Python < 3.13)"
    )
    assert backend("ort") == (None, problem, [f"backend:     none: {problem}"])

    # A training build is told by its onnxruntime/training/api package, still not imported.
    (fake / "training" / "api").mkdir(parents=True)
    (fake / "training" / "api" / "__init__.py").touch()
    assert backend("auto")[:2] == ("ort", None)
    assert backend("ort")[:2] == ("ort", None)


# A time's one format, and anything that looks like a time in another.
ONE_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
TIMEISH = re.compile(r"\d{4}-\d\d-\d\d(?:[T ][\d:.,]+)?(?:Z|[+-]\d\d:?\d\d)?")


def strings(value) -> list[str]:
    """Every string in a JSON value."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_status_and_the_listings_show_every_time_in_one_format(tmp_path, trained):
    """UTC, ISO 8601, whole seconds, Z: a next_check a release before 0.2.0 wrote in local
    time without an offset is shown so too (here in +05:30)."""
    state = tmp_path / "state"
    shutil.copytree(trained, state, symlinks=True)
    cfg = write_config(tmp_path / "c.toml", state)
    saved = json.loads((state / "state.json").read_text())
    saved["next_check"] = "2026-11-28T05:17:54.123456"
    record = {"last_order": 3000, "version": 1, "recent": [], "event": None}
    saved["models"]["autoencoder"]["scoring"] = {**record, "at": "2026-11-28T05:16:00Z"}
    (state / "state.json").write_text(json.dumps(saved))
    smocsd("exclude", "--from", "10", "--to", "20", config=cfg, check=True)
    env = {"TZ": "Asia/Kolkata"}

    status = json.loads(smocsd("status", "--json", config=cfg, env=env, check=True).stdout)
    assert status["next_check"] == "2026-11-27T23:47:54Z"
    times = [
        status["last_cycle"]["at"],
        status["scoring"]["at"],
        status["labels"][0]["created_at"],
        status["models"][0]["last_cycle"]["at"],
    ]
    assert all(ONE_FORMAT.fullmatch(t) for t in times), times
    text = smocsd("status", config=cfg, env=env, check=True).stdout
    assert "next check:  2026-11-27T23:47:54Z" in text.splitlines()
    assert f"last cycle:  {status['last_cycle']['at']} promoted v1 " in text.splitlines()
    for command in READERS:
        out = smocsd(*command, config=cfg, env=env, check=True).stdout
        shown = strings(json.loads(out)) if "--json" in command else [out]
        found = [t for s in shown for t in TIMEISH.findall(s)]
        assert found and all(ONE_FORMAT.fullmatch(t) for t in found), (command, found)


# --- writing commands run by root become the state directory's owner


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach: pytest's tmp_path is under a root-only one."""
    path = Path(tempfile.mkdtemp(prefix="smocsd-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@needs_root
def test_a_writing_command_run_by_root_becomes_the_state_dirs_owner(shared_dir, capfd):
    """Run in a forked child rather than a fresh interpreter: this one may live where
    `nobody` cannot read (a pyenv under /root), so it imports everything beforehand."""
    state = shared_dir / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    cfg = write_config(shared_dir / "c.toml", state)
    db = state / "readings.db"
    demo.write(shared_dir / "warm-up.db", 10)  # what demo imports on first use
    code, out, err = run_forked(
        ["demo", "--rows", "100", "--db", str(db), "--config", str(cfg)], capfd
    )
    assert code == 0, err
    assert f"INFO smocsd: running as nobody, the owner of {state}\n" in err
    assert out == f"{db}: wrote 100 rows, 100 in all\n"
    nogroup = pwd.getpwuid(NOBODY).pw_gid
    assert {(p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()} == {(NOBODY, nogroup)}


@needs_root
def test_an_owner_without_a_user_entry_is_refused_with_the_command_to_run(tmp_path):
    with pytest.raises(KeyError):
        pwd.getpwuid(UNNAMED)
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, UNNAMED, UNNAMED)
    cfg = write_config(tmp_path / "c.toml", state)
    db = state / "readings.db"
    proc = smocsd("demo", "--rows", "100", "--db", str(db), config=cfg)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        f"smocsd: {state} is owned by uid {UNNAMED}, which has no user entry to switch to; "
        f"run instead: sudo -u '#{UNNAMED}' smocsd demo --rows 100 --db {db} --config {cfg}\n"
    )
    assert list(state.iterdir()) == []


def test_demo_follow_adds_rows_continuing_the_timeline_until_stopped(tmp_path):
    """`demo --follow` is the plant `packaging/dev run` scores live: whole seconds of rows
    at --rate, the same rows one write would make, and SIGTERM or Ctrl-C end it with 0."""
    db = tmp_path / "readings.db"
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("SMOCSD_CONFIG", None)
    for stop in (signal.SIGTERM, signal.SIGINT):
        before = _rows(db)
        proc = subprocess.Popen(
            [sys.executable, "-m", "smocsd", "demo", "--rows", "50", "--follow", "--rate", "200"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while _rows(db) < before + 50 + 3 * 200:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "demo --follow added too few rows"
                time.sleep(0.1)
            proc.send_signal(stop)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert (proc.returncode, err) == (0, "")
        assert out.startswith(f"{db}: wrote 50 rows, ")
    total = _rows(db)
    assert (total - 100) % 200 == 0  # whole seconds: a stop mid-write left none half-written
    once = tmp_path / "once.db"
    demo.write(once, total)
    assert _table(db) == _table(once)


def test_demo_follow_stops_when_the_process_that_started_it_ends(tmp_path):
    """packaging/dev run starts the plant and execs the daemon in its place: when the
    daemon ends, however it ends, the plant stops with it."""
    db = tmp_path / "readings.db"
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("SMOCSD_CONFIG", None)
    feed = f"{sys.executable} -m smocsd demo --rows 10 --follow --rate 10 --db {db}"
    shell = subprocess.run(
        ["bash", "-c", f"{feed} >/dev/null & echo $!; exec sleep 3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    pid = int(shell.stdout)
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "demo --follow outlived its parent"
        time.sleep(0.1)
    assert _rows(db) >= 10


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _table(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM readings ORDER BY id").fetchall()


# --- errors name their file


def test_os_errors_name_the_file(tmp_path):
    env = {"STATE_DIRECTORY": str(tmp_path)}  # no config file: demo runs on the defaults
    proc = smocsd("demo", "--rows", "10", "--db", str(tmp_path), env=env)
    assert proc.returncode == 1
    assert proc.stderr == f"smocsd: {tmp_path}: unable to open database file\n"

    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    proc = smocsd("status", config=write_config(tmp_path / "c.toml", not_a_dir))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"smocsd: {not_a_dir}/") and "Not a directory" in proc.stderr


# --- several models: --model NAME


def two_tables(root: Path) -> Path:
    """[models.a] and [models.b], each its own table of 3000 demo rows in one database."""
    state = root / "state"
    demo.write(state / "readings.db", 3000, seed=1, table="ra")
    demo.write(state / "readings.db", 3000, seed=2, table="rb")
    return write_config(
        root / "c.toml",
        state,
        {"models.a.source": {"table": "ra"}, "models.b.source": {"table": "rb"}},
    )


def two_assets(root: Path, rows: int = 3000) -> Path:
    """One table of two assets, P-1 and P-2, `rows` demo rows each interleaved by time,
    and a config partitioned by its `asset` column."""
    state = root / "state"
    for seed, name in ((1, "one.db"), (2, "two.db")):
        demo.write(root / name, rows, seed=seed)
    state.mkdir(parents=True)
    conn = sqlite3.connect(state / "readings.db")
    try:
        conn.execute(f"ATTACH '{root / 'one.db'}' AS one")
        conn.execute(f"ATTACH '{root / 'two.db'}' AS two")
        conn.execute(
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, asset TEXT, ts REAL, "
            "temperature REAL, vibration REAL, current REAL)"
        )
        conn.execute(
            "INSERT INTO readings (asset, ts, temperature, vibration, current) "
            "SELECT asset, ts, temperature, vibration, current FROM ("
            "SELECT 'P-1' AS asset, * FROM one.readings UNION ALL "
            "SELECT 'P-2' AS asset, * FROM two.readings) ORDER BY ts, asset"
        )
        conn.execute("CREATE INDEX readings_asset ON readings (asset, id)")
        conn.commit()
    finally:
        conn.close()
    return write_config(root / "c.toml", state, source={"partition_column": "asset"})


def usage_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a --model usage error (exit 2), nothing on stdout."""
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# Every command that acts on one model, as each is run without --model.
ONE_MODEL = [
    ("train-once", "--force"),
    ("models", "list"),
    ("models", "list", "--json"),
    ("models", "show", "1"),
    ("models", "rollback"),
    ("score",),
]


def test_model_picks_the_store_of_one_of_two_tables(tmp_path):
    cfg = two_tables(tmp_path)
    state = tmp_path / "state"
    for command in ONE_MODEL:
        proc = smocsd(*command, config=cfg)
        assert usage_line(proc) == "smocsd: several models: name one with --model (a, b)"
        proc = smocsd(*command, "--model", "c", config=cfg)
        assert usage_line(proc) == "smocsd: no model 'c': the models are a, b"
    assert not (state / "models").exists()

    result = json.loads(
        smocsd("train-once", "--force", "--model", "a", config=cfg, check=True).stdout
    )
    assert (result["model"], result["outcome"], result["version"]) == ("a", "promoted", 1)
    assert sorted(p.name for p in (state / "models").iterdir()) == ["a"]
    assert ModelStore(state / "models" / "a", 5).current() == 1
    # before or after the action, as --config
    for args in (
        ("models", "--model", "a", "list", "--json"),
        ("models", "list", "--model", "a", "--json"),
    ):
        (row,) = json.loads(smocsd(*args, config=cfg, check=True).stdout)
        assert (row["version"], row["current"]) == (1, True)
    assert json.loads(smocsd("models", "list", "--json", "--model", "b", config=cfg).stdout) == []
    shown = smocsd("models", "show", "1", "--model", "a", config=cfg, check=True).stdout
    assert shown.splitlines()[:2] == ["model:      a", "version:    v000001"]
    proc = smocsd("models", "show", "1", "--model", "b", config=cfg)
    assert (proc.returncode, proc.stderr) == (1, "smocsd: model version 1 does not exist\n")

    scored = smocsd("score", "--model", "a", "--from", "2990", "--json", config=cfg, check=True)
    assert [json.loads(line)["order"] for line in scored.stdout.splitlines()] == list(
        range(2990, 3001)
    )
    proc = smocsd("score", "--model", "b", config=cfg)
    assert proc.returncode == 1 and "no current model" in proc.stderr

    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    models = {m["name"]: m for m in status["models"]}
    assert list(models) == ["a", "b"]
    assert [m["partition"] for m in status["models"]] == [None, None]
    assert (models["a"]["current_version"], models["a"]["last_cycle"]["outcome"]) == (
        1,
        "promoted",
    )
    assert (models["b"]["current_version"], models["b"]["last_cycle"]) == (None, None)
    assert {m["open_alarm"] for m in status["models"]} == {None}
    assert (status["model"], status["current_version"]) == ("a", 1)  # the first model's
    text = smocsd("status", config=cfg, check=True).stdout.splitlines()
    assert "device:      gw-test (2 models)" in text
    (line_a,) = [x for x in text if x.startswith("model:       a ")]
    assert line_a.startswith("model:       a  v000001, last cycle promoted v1 "), text
    assert "model:       b  none, last cycle never" in text

    # b trains on its own table; a's versions stay as they are.
    smocsd("train-once", "--force", "--model", "b", config=cfg, check=True)
    smocsd("train-once", "--force", "--model", "b", config=cfg, check=True)
    assert ModelStore(state / "models" / "a", 5).versions() == [1]
    assert ModelStore(state / "models" / "b", 5).versions() == [1, 2]
    proc = smocsd("models", "rollback", "--model", "b", config=cfg, check=True)
    assert proc.stdout == "current -> v000001\n"
    assert ModelStore(state / "models" / "a", 5).current() == 1


def test_model_picks_a_partition_of_one_table(tmp_path):
    cfg = two_assets(tmp_path)
    state = tmp_path / "state"
    names = "autoencoder@P-1, autoencoder@P-2"
    proc = smocsd("train-once", "--force", config=cfg)
    assert usage_line(proc) == f"smocsd: several models: name one with --model ({names})"
    proc = smocsd("models", "list", "--model", "autoencoder", config=cfg)
    assert usage_line(proc) == f"smocsd: no model 'autoencoder': the models are {names}"

    out = smocsd("train-once", "--force", "--model", "autoencoder@P-2", config=cfg, check=True)
    result = json.loads(out.stdout)
    assert (result["model"], result["outcome"]) == ("autoencoder@P-2", "promoted")
    data = result["model_meta"]["data"]
    assert data["rows"] == 3000, data  # P-2's rows only
    assert sorted(p.name for p in (state / "models").iterdir()) == ["autoencoder@P-2"]

    status = json.loads(smocsd("status", "--json", config=cfg, check=True).stdout)
    assert [(m["name"], m["partition"], m["current_version"]) for m in status["models"]] == [
        ("autoencoder@P-1", "P-1", None),
        ("autoencoder@P-2", "P-2", 1),
    ]
    listed = smocsd("models", "list", "--json", "--model", "autoencoder@P-2", config=cfg)
    assert [row["version"] for row in json.loads(listed.stdout)] == [1]


def test_a_models_training_job_is_checked_naming_its_key(tmp_path):
    cfg = write_config(
        tmp_path / "c.toml",
        tmp_path / "state",
        {"models.a.source": {"table": "ra"}, "models.b.training": {"job": "nosuchmod:Job"}},
    )
    for command in ("check-config", "train-once"):
        proc = smocsd(command, "--model", "a", config=cfg) if command == "train-once" else None
        proc = proc or smocsd(command, config=cfg)
        assert (proc.returncode, proc.stdout) == (78, "")
        assert proc.stderr == (
            f"{cfg}: models.b.training.job: cannot import 'nosuchmod': "
            "No module named 'nosuchmod'\n"
        )
