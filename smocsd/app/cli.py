"""The `smocsd` command: parses arguments, maps each command onto the parts, sets exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error (EX_CONFIG:
the unit's RestartPreventExitStatus=78 keeps systemd from restart-looping on a bad file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import re
import shlex
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..common import config as config_mod
from ..common.config import Config, ConfigError
from ..common.labels import Kind, Label, LabelError, Labels, for_model, ranges_of
from ..delivery.outbox import Outbox, OutboxError, json_safe
from ..schemas import LABEL_SCHEMA
from ..store import ModelStore, StoreError, version_name
from .systemd import configure_logging

if TYPE_CHECKING:
    from ..common.state import ScoringPosition, StateFile

EX_OK, EX_FAIL, EX_USAGE, EX_CONFIG = 0, 1, 2, 78

log = logging.getLogger("smocsd")

# (command, action) pairs that write into the state directory; all others only read it.
_WRITERS = {
    ("run", None),
    ("train-once", None),
    ("demo", None),
    ("models", "rollback"),
    ("outbox", "flush"),
    ("accept", None),
    ("exclude", None),
    ("labels", "remove"),
}


class Failure(Exception):
    """A runtime failure the operator can act on: one line, exit 1."""


class UsageError(Exception):
    """A `--model` that names no model, or none given where there are several: one line
    naming the models there are, exit 2."""


def _one_model(cfg: Config, args: argparse.Namespace) -> Config:
    """The model `--model NAME` names; without it, the only one."""
    from .modelset import NoSuchModel, find  # reads the source: not at import

    try:
        return find(cfg, getattr(args, "model", None))
    except NoSuchModel as exc:
        raise UsageError(str(exc)) from None


def _all_models(cfg: Config) -> list[Config]:
    """Every model; those the store knows alone when the table cannot be read."""
    from ..data.sources import SourceError
    from .modelset import ModelSet

    found = ModelSet(cfg)
    try:
        return found.resolve()
    except (SourceError, ConfigError, OSError) as exc:
        log.warning("models not read from the table: %s", exc)
        return found.resolve(read_table=False)
    finally:
        found.close()


def _print_json(obj: Any) -> None:
    """Strict JSON: a non-finite number read from a file (state.json, an outbox message)
    prints as null, never as NaN or Infinity, which JSON parsers refuse."""
    print(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from .daemon import Daemon

    # The daemon scores with onnxruntime and never trains (each cycle is a child process
    # of its own). Where onnxruntime is the training build, `import onnxruntime` looks for
    # ORTModule, and the lookup alone imports onnxruntime.training and onnx: 7.5 MB of the
    # daemon's RSS. Marked absent, the lookup fails as it does without torch.
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)

    return Daemon(args.config_path, cfg).run()


def cmd_train_once(cfg: Config, args: argparse.Namespace) -> int:
    from ..delivery.outbox import json_safe
    from ..training.result import Outcome
    from .daemon import Parts, prepare_state_dir

    model = _one_model(cfg, args)
    prepare_state_dir(cfg)
    parts = Parts(cfg)
    try:
        result, queued = parts.cycle(model, force=args.force)
    finally:
        parts.close()
    _print_json(json_safe(result.message(model)))
    return EX_FAIL if result.outcome is Outcome.FAILED or not queued else EX_OK


# A SourceError naming a source.* key is the configuration's fault (no such table or
# column, a directory as source.path); any other means the database could not be reached
# or read now, which is no fault of the file.
_SOURCE_KEY = re.compile(r" ?\((source\.\w+)\)")


def _check_sources(cfg: Config) -> tuple[list[str], list[str]]:
    """(problems, notes): each model's table and columns (the top level's, or each
    [models.<name>] table's), as _check_source finds them."""
    problems, notes = [], []
    for model in cfg.definitions():
        prefix = f"models.{model.model.name}." if cfg.models else ""
        found, note = _check_source(model, prefix)
        problems += found
        if note:
            notes.append(f"{prefix}source not checked: {note}")
    return problems, notes


def _check_source(cfg: Config, prefix: str = "") -> tuple[list[str], str | None]:
    """(problems, note): the configured table and columns checked against the database
    when it can be reached, else a note saying why it was not checked; `prefix` is the
    model table's, which the keys a problem names get."""
    from ..data.sources import NoDatabase, SourceError, open_source  # numpy: not in the daemon

    source = open_source(cfg.source)
    try:
        source.check()
    except NoDatabase as exc:
        return [], str(exc)
    except SourceError as exc:
        key = _SOURCE_KEY.search(str(exc))
        if key is None:
            return [], str(exc)
        return [f"{cfg.path}: {prefix}{key[1]}: {_SOURCE_KEY.sub('', str(exc), count=1)}"], None
    except ConfigError as exc:
        # A refused password_file is among file_problems already; a systemd credential
        # is not.
        return ([] if cfg.source.password_file else exc.problems), None
    finally:
        source.close()
    return [], None


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    """Besides the file itself: the secret and CA files it names, and the table and
    columns when the database can be reached."""
    # Run by root (README.Debian says `sudo smocsd check-config`), it judges the files for
    # the user a writing command would switch to: the state directory's owner.
    reader = os.geteuid() or _state_dir_owner(cfg) or 0
    state_dir_problem = config_mod.state_dir_problem(cfg)
    problems = [state_dir_problem] if state_dir_problem else []
    problems += config_mod.file_problems(cfg, reader)
    source_problems, notes = _check_sources(cfg)
    problems += source_problems
    for problem in problems:
        print(problem, file=sys.stderr)
    for note in notes:
        print(f"{args.config_path}: {note}", file=sys.stderr)
    if problems:
        return EX_CONFIG
    if not notes:
        print(f"{args.config_path}: ok")
    return EX_OK


def _check_job(cfg: Config, path: Path) -> None:
    """A training.job that cannot be loaded is a configuration error, found before running:
    the top level's, and each other one a [models.<name>] table names."""
    from .child import JobLoadFailed, job_problem

    keys = {cfg.training.job: "training.job"}  # a job once, named by the first key of it
    for definition in cfg.models:
        keys.setdefault(definition.training.job, f"models.{definition.model.name}.training.job")
    for job, key in keys.items():
        try:
            problem = job_problem(job)
        except JobLoadFailed as exc:  # short of memory, say: exit 1, which systemd restarts
            raise Failure(f"{path}: {_rekeyed(str(exc), key)}") from None
        if problem:
            raise ConfigError([f"{path}: {_rekeyed(problem, key)}"])


def _rekeyed(problem: str, key: str) -> str:
    """A training.job problem naming the key of the [models.<name>] table that set it."""
    prefix = "training.job"
    return key + problem[len(prefix) :] if problem.startswith(prefix) else problem


def _require_state_dir(cfg: Config) -> None:
    """Commands that look into the state directory report it missing (a typo in
    daemon.state_dir, or the daemon never ran) instead of creating it."""
    if not cfg.state_dir.exists():
        raise Failure(f"state directory {cfg.state_dir} does not exist (daemon.state_dir)")


def _outbox_readonly(cfg: Config) -> Outbox | None:
    """The outbox for reading, None when there is none yet (nothing waiting)."""
    path = cfg.state_dir / "outbox.db"
    return Outbox.open_readonly(path) if path.exists() else None


def _training_backend(cfg: Config) -> tuple[str | None, str | None]:
    """(backend, problem): what training.backend resolves to on this install, found on
    disk without importing numpy or ONNX Runtime (status only reads, and stays cheap)."""
    from ..training.trainers import resolve_backend

    try:
        return resolve_backend(cfg.training.backend), None
    except ValueError as exc:
        return None, str(exc)


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from ..common.state import State

    _require_state_dir(cfg)
    state = State(cfg.state_dir).read()
    configs = _all_models(cfg)
    models = [_model_status(cfg, model, state) for model in configs]
    # The top-level fields are those of a release before [models]: they describe the one
    # model, and with several the first of them (the contract says so); `models` has all.
    first = configs[0] if configs else cfg
    store = ModelStore.of(first)
    current = store.current()
    last_cycle = state.last_cycle  # with one model, its last cycle, as before
    if len(configs) > 1:
        last_cycle = state.last_cycle_of(first.model.name, cfg.model.name)
    if models:
        scoring = models[0]["scoring"]
    else:
        scoring = _scoring_status(first, state.scoring_of(first.model.name, cfg.model.name))
    outbox = _outbox_readonly(cfg)
    depth = quarantined = 0
    if outbox is not None:
        try:
            depth, quarantined = len(outbox), len(outbox.quarantined())
        finally:
            outbox.close()
    backend, backend_problem = _training_backend(first)
    try:
        labels, labels_problem = Labels(cfg.state_dir).read(), None
    except LabelError as exc:  # status shows the rest, and says what is wrong
        labels, labels_problem = [], str(exc)
    status = {
        "device_id": cfg.daemon.device_id,
        "model": first.model.name,
        "current_version": current,
        # A dangling `current` (its version removed by hand) is a problem too: no model
        # scores or is trained against until the next promotion or a rollback.
        "current_problem": store.check(current) if current else store.dangling(),
        "versions": store.versions(),
        "training_backend": backend,
        "training_backend_problem": backend_problem,
        "last_cycle": None if last_cycle is None else last_cycle.to_json(),
        "next_check": state.next_check,
        "outbox_depth": depth,
        "outbox_quarantined": quarantined,
        "scoring": scoring,
        "labels": [x.to_json() for x in labels],
        "labels_problem": labels_problem,
        "left_out": _left_out(first, state),
        "state_dir": str(cfg.state_dir),
        "models": models,
    }
    if args.json:
        _print_json(status)
        return EX_OK
    several = len(models) > 1
    last = status["last_cycle"] or {}
    if several:  # the daemon's lines here, each model's below
        print(f"device:      {cfg.daemon.device_id} ({len(models)} models)")
    else:
        problem = status["current_problem"]
        damaged = f" {'DAMAGED' if current else 'DANGLING'}: {problem}" if problem else ""
        print(f"model:       {first.model.name} (device {cfg.daemon.device_id})")
        print(f"current:     {version_name(current) if current else 'none'}{damaged}")
        print(f"kept:        {', '.join(map(version_name, status['versions'])) or 'none'}")
    if backend:
        print(f"backend:     {backend} (training.backend = {first.training.backend})")
    else:  # every cycle will fail until the backend is installed or the key changed
        print(f"backend:     none: {backend_problem}")
    if not several:
        detail = last.get("reason") or last.get("error") or ""
        version = f" v{last['version']}" if last.get("version") else ""
        at = last.get("at", "never")
        print(f"last cycle:  {at} {last.get('outcome', '')}{version} {detail}")
    print(f"next check:  {status['next_check'] or 'not scheduled (daemon not running?)'}")
    held = f", {quarantined} in quarantine (smocsd outbox list)" if quarantined else ""
    print(f"outbox:      {depth} result(s) waiting{held}")
    if scoring and not several:
        event = scoring["open_alarm"]
        alarm = f", ALARM open since order {event['start']['order']}" if event else ""
        lag = "?" if scoring["lag_rows"] is None else scoring["lag_rows"]
        where = f"row {scoring['last_order']} with v{scoring['version']}"
        print(f"scoring:     {where}, {lag} rows behind{alarm}")
    spans = status["left_out"]
    if spans and not several:
        kinds = ", ".join(f"{sum(s['why'] == w for s in spans)} {w}" for w in ("alarm", "spike"))
        print(f"left out:    {len(spans)} range(s) of rows alarmed on, not trained on ({kinds})")
    for x in labels:
        print(f"label:       {x.describe()}")
    if labels_problem:
        print(f"labels:      UNREADABLE: {labels_problem}")
    if several:
        for entry, model in zip(models, configs, strict=True):
            print(f"model:       {_model_line(entry, len(state.spans(model.model.name)))}")
    return EX_OK


def _model_status(cfg: Config, model: Config, state: StateFile) -> dict[str, Any]:
    """One model's entry in `status --json`'s `models`."""
    store = ModelStore.of(model)
    current = store.current()
    name = model.model.name
    last = state.last_cycle_of(name, cfg.model.name)
    scoring = _scoring_status(model, state.scoring_of(name, cfg.model.name))
    return {
        "name": name,
        "partition": model.source.partition,
        "current_version": current,
        "current_problem": store.check(current) if current else store.dangling(),
        "last_cycle": None if last is None else last.to_json(),
        "scoring": scoring,
        "open_alarm": None if scoring is None else scoring["open_alarm"],
    }


def _age(at: str) -> str:
    """'5m ago' for a utcnow() time; the time itself when it is not one."""
    from datetime import datetime, timezone

    from ..common.state import TIME_FORMAT

    try:
        then = datetime.strptime(at, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return str(at)
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    if seconds < 0:
        return f"{at} (ahead of the clock)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _model_line(entry: dict[str, Any], spans: int) -> str:
    """A model's line in `status`: its current version, last cycle, scoring, open alarm."""
    current = entry["current_version"]
    text = f"{entry['name']}  {version_name(current) if current else 'none'}"
    if entry["current_problem"]:
        text += f" {'DAMAGED' if current else 'DANGLING'}"
    last = entry["last_cycle"]
    if last is None:
        text += ", last cycle never"
    else:
        version = f" v{last['version']}" if last.get("version") else ""
        text += f", last cycle {last.get('outcome')}{version} {_age(last.get('at'))}"
    scoring = entry["scoring"]
    if scoring:
        lag = "?" if scoring["lag_rows"] is None else scoring["lag_rows"]
        text += f", scoring row {scoring['last_order']} ({lag} behind)"
    if spans:
        text += f", {spans} range(s) left out"
    event = entry["open_alarm"]
    if event:
        text += f", OPEN ALARM since order {event['start']['order']}"
    return text


def _left_out(cfg: Config, state: StateFile) -> list[dict[str, Any]]:
    """The screening record: row ranges kept out of training, and why."""
    return [
        {"first": s.first, "last": s.last, "why": s.why, "version": s.version}
        for s in state.spans(cfg.model.name)
    ]


def _scoring_status(cfg: Config, scoring: ScoringPosition | None) -> dict[str, Any] | None:
    """Where live scoring stands, how many rows it is behind, and the open alarm."""
    if scoring is None:
        return None
    from ..data.sources import SourceError, open_source

    source = open_source(cfg.source)  # the database at the path now, not the one scored
    after = scoring.last_order
    try:
        if after is not None and (source.max_order() or 0) < after:
            after = None  # went backwards: live scoring starts again from the first row
        lag = source.count_after(after)
    except SourceError:
        lag = None
    finally:
        source.close()
    return {
        "last_order": scoring.last_order,
        "version": scoring.version,
        "at": scoring.at,
        "lag_rows": lag,
        "open_alarm": None if scoring.event is None else asdict(scoring.event),
    }


def _model_rows(store: ModelStore) -> list[dict[str, Any]]:
    """One row per kept version; `problem` says what is damaged, None when whole."""
    current = store.current()
    rows = []
    for v in store.versions():
        problem = store.check(v)
        try:
            meta = store.metadata(v)
        except StoreError:  # a metadata.json that fails its check, which `problem` names
            meta = None
        rows.append(
            {
                "version": v,
                "current": v == current,
                "created_at": meta and meta.created_at,
                "backend": meta and meta.backend,
                "val_loss": meta and meta.metrics.get("val_loss"),
                "threshold": meta and meta.threshold,
                "problem": problem,
            }
        )
    return rows


def cmd_models(cfg: Config, args: argparse.Namespace) -> int:
    _require_state_dir(cfg)
    model = _one_model(cfg, args)
    store = ModelStore.of(model)
    if args.models_command == "show":
        if args.json:  # as the file has it, damaged or not: what the operator asked to see
            _print_json(store.metadata_json(args.version))
            return EX_OK
        meta = store.metadata(args.version)

        def num(value: Any) -> str:
            return f"{value:.4g}" if isinstance(value, (int, float)) else str(value or "-")

        ev, data = meta.eval, meta.data
        losses = [v for v in (meta.history.val_loss if meta.history else []) if v is not None]
        lo, hi = min(losses, default=0.0), max(losses, default=0.0)
        # a sparkline of the validation loss by epoch, lowest ▁ to highest █
        steps = [round((v - lo) / (hi - lo) * 7) if hi > lo else 0 for v in losses]
        bars = "".join("▁▂▃▄▅▆▇█"[i] for i in steps)
        if ev.get("champion_problem"):
            champion = f"not compared: v{ev.get('previous_version')} damaged"
        elif ev.get("previous_val_loss") is None:
            champion = "no champion to compare with"
        else:
            champion = f"v{ev['previous_version']}'s {num(ev['previous_val_loss'])}"
        report = store.path(args.version) / "report.html"
        for name, value in [
            ("model", model.model.name),
            ("version", version_name(args.version)),
            ("outcome", meta.outcome),
            ("created_at", meta.created_at),
            ("backend", meta.backend),
            ("val_loss", f"{num(meta.metrics.get('val_loss'))} ({champion})"),
            ("by epoch", f"{bars} ({num(lo)} .. {num(hi)})" if losses else "not recorded"),
            ("threshold", num(meta.threshold)),
            ("data", f"{data.rows} rows, {data.dropped_rows} dropped, {data.windows} windows"),
            ("report", report if report.is_file() else "none"),
        ]:
            print(f"{name + ':':<12}{value}")
    elif args.models_command == "rollback":
        version = store.rollback(args.version)
        print(f"current -> {version_name(version)}")
    elif args.json:
        _print_json(_model_rows(store))
    else:
        # '*' marks current, '!' a damaged version, whose problem follows on its own line.
        print(
            f"{'':2}{'version':<9}{'created_at':<22}{'backend':<8}{'val_loss':>10}{'threshold':>11}"
        )
        for r in _model_rows(store):
            marks = ("*" if r["current"] else " ") + ("!" if r["problem"] else " ")
            print(
                f"{marks}{version_name(r['version']):<9}"
                f"{r['created_at'] or '':<22}{r['backend'] or '':<8}"
                f"{r['val_loss'] or float('nan'):>10.4g}{r['threshold'] or float('nan'):>11.4g}"
            )
            if r["problem"]:
                print(f"    {r['problem']}")
        if dangling := store.dangling():  # no row is marked '*': say why
            print(f"no current version: {dangling}")
    return EX_OK


def cmd_outbox(cfg: Config, args: argparse.Namespace) -> int:
    _require_state_dir(cfg)
    if args.outbox_command == "flush":
        from ..delivery.publish import Publisher

        outbox = Outbox(cfg.state_dir / "outbox.db", cfg.publish.outbox_max)
        publisher = Publisher(cfg.publish, cfg.daemon.device_id)
        try:
            delivered = outbox.flush(publisher.attempt())
            waiting = len(outbox)
        finally:
            outbox.close()
        print(f"delivered {delivered}, {waiting} waiting")
        return EX_FAIL if waiting else EX_OK
    outbox = _outbox_readonly(cfg)
    messages, quarantined = [], []
    if outbox is not None:
        try:
            messages, quarantined = outbox.pending(), outbox.quarantined()
        finally:
            outbox.close()
    if args.json:
        _print_json(messages)
        if quarantined:  # not in the array, which holds messages as they are sent
            rows = "; ".join(f"row {q.seq}: {q.reason}" for q in quarantined)
            print(
                f"smocsd: {cfg.state_dir / 'outbox.db'}: {len(quarantined)} row(s) in "
                f"quarantine, never delivered: {rows}",
                file=sys.stderr,
            )
    else:
        for m in messages:
            # A training result has an outcome, an alarm message its event's state, a
            # label message its action (the outbox checked they are there).
            if m["schema"] == LABEL_SCHEMA:
                what = f"label #{m['label']['id']} {m['label']['kind']} {m['action']}"
                version = ""
            else:
                what = m.get("outcome") or f"alarm {m.get('state')}"
                version = f" v{m['version']}" if m.get("version") is not None else ""
            print(f"{m['timestamp']}  {m['message_id']}  {m['model']}{version}  {what}")
        print(f"{len(messages)} message(s) waiting")
        for q in quarantined:
            print(f"{q.at}  row {q.seq}  QUARANTINED  {q.message_id or '-'}  {q.reason}")
        if quarantined:
            print(f"{len(quarantined)} row(s) in quarantine, never delivered")
    return EX_OK


def cmd_score(cfg: Config, args: argparse.Namespace) -> int:
    """Scores a stored range with live scoring's own code (smocsd/app/live.py `decide`), so
    the two agree row for row."""
    from ..data.sources import SourceError, open_source
    from ..scoring import Model
    from .live import decide  # numpy and onnxruntime: this command's imports only

    model_cfg = _one_model(cfg, args)
    store = ModelStore.of(model_cfg)
    version = args.version or store.current()
    if version is None:
        raise Failure("no current model to score with (train one first)")
    problem = store.check(version)
    if problem:
        raise Failure(f"refusing to score with a damaged version: {problem}")
    model = Model.of(store.path(version), store.metadata(version))
    # --from the smallest order value is every row; one less would not fit SQLite's integer.
    after = None if args.from_order in (None, INT64_MIN) else args.from_order - 1
    # Rows before the range: what its first row's decision reads (a whole window, and the
    # level rule's rows before it), and the windows the alarm rules look back on.
    context = model.span - 1 + model.look_back - 1
    source = open_source(model_cfg.source)
    try:
        rows_wanted = source.count_after(after) + (context if after is not None else 0)
        readings = source.read_newest(rows_wanted)
    except SourceError as exc:
        raise Failure(str(exc)) from None
    finally:
        source.close()
    in_force = for_model(Labels(cfg.state_dir).read(), model_cfg.model.name)
    excluded = ranges_of(in_force, Kind.EXCLUDE)
    rows, _, _ = decide(model, readings, after, None, excluded)
    rows = [r for r in rows if args.to_order is None or r.order <= args.to_order]
    if args.json:
        for row in rows:
            print(json.dumps(row.to_json(), allow_nan=False))
        return EX_OK
    print(f"{'order':>10}  {'score':>10}  {'':9}  top channel  (v{version})")
    for r in rows:
        top = max(r.shares, key=r.shares.get)
        flag = "ANOMALOUS" if r.anomalous else ("over" if r.over else "")
        print(f"{r.order:>10}  {r.score:>10.4g}  {flag:9}  {top} {r.shares[top]:.0%}")
    print(f"{len(rows)} windows, {sum(r.anomalous for r in rows)} anomalous")
    return EX_OK


def _publish_label(cfg: Config, label: Label, action: str) -> None:
    """The label's message into the outbox; the daemon delivers it at its next check. It
    names the label's model, or for a label of every model the top-level model.name."""
    from ..common.labels import message

    try:
        outbox = Outbox(cfg.state_dir / "outbox.db", cfg.publish.outbox_max)
        try:
            outbox.put(message(label, action, cfg.daemon.device_id, cfg.model.name))
        finally:
            outbox.close()
    except OutboxError as exc:  # the label itself is in labels.json: no need to repeat it
        raise Failure(f"{exc}; {label.describe()} was {action} all the same") from None


def _alarm_start(cfg: Config, model: Config, state: StateFile, labels: list[Label]) -> int | None:
    """Where `model`'s alarm to accept began: the start of the recorded run of alarmed rows
    (a window's margin before the first alarm, earlier bursts joined) that holds live
    scoring's open event, else of the newest such run no accept label covers yet."""
    name = model.model.name
    accepted = [x for x in for_model(labels, name) if x.kind is Kind.ACCEPT]
    spans = [
        (s.first, s.last)
        for s in state.spans(name)
        if s.why == "alarm" and not any(x.covers(s.first) and x.covers(s.last) for x in accepted)
    ]
    position = state.scoring_of(name, cfg.model.name)
    event = None if position is None else position.event
    if event is not None:
        start = event.start["order"]
        return next((first for first, last in spans if first <= start <= last), start)
    return max((first for first, _ in spans), default=None)


def cmd_accept(cfg: Config, args: argparse.Namespace) -> int:
    from ..common.state import State

    _require_state_dir(cfg)
    models, owner = _label_scope(cfg, args)
    labels = Labels(cfg.state_dir)
    first, last = args.from_order, args.to_order
    if first is None:
        if len(models) > 1:  # whose alarm? Each model has its own.
            raise Failure(
                "several models: give --from ORDER, or --model NAME to accept that model's alarm"
            )
        state = State(cfg.state_dir).read()
        first = next((_alarm_start(cfg, m, state, labels.read()) for m in models), None)
        if first is None:
            raise Failure("no alarm to accept (none open, none recorded): give --from ORDER")
    if last is None:
        last = _newest_order(models)
    label = labels.add(Kind.ACCEPT, first, last, args.reason, model=owner)
    _publish_label(cfg, label, "added")
    print(f"added {label.describe()}: the next check trains on these rows")
    return EX_OK


def _label_scope(cfg: Config, args: argparse.Namespace) -> tuple[list[Config], str | None]:
    """(the models a new label is for, the name it records): with --model that model and
    its name, else every model and None (the label applies to all)."""
    if getattr(args, "model", None) is None:
        return _all_models(cfg), None
    model = _one_model(cfg, args)
    return [model], model.model.name


def _newest_order(models: list[Config]) -> int:
    """The order value of the newest row now (of those models read): what an accept
    without --to reaches to."""
    from ..data.sources import SourceError, open_source

    found = []
    for model in models:
        source = open_source(model.source)
        try:
            found.append(source.max_order())
        except SourceError as exc:
            raise Failure(f"{exc}: give --to ORDER") from None
        finally:
            source.close()
    newest = max((x for x in found if x is not None), default=None)
    if newest is None:
        raise Failure("the table has no rows yet: give --to ORDER")
    return newest


def cmd_exclude(cfg: Config, args: argparse.Namespace) -> int:
    _require_state_dir(cfg)
    owner = None if getattr(args, "model", None) is None else _one_model(cfg, args).model.name
    label = Labels(cfg.state_dir).add(
        Kind.EXCLUDE, args.from_order, args.to_order, args.reason, model=owner
    )
    _publish_label(cfg, label, "added")
    print(f"added {label.describe()}: never trained on, never alarmed")
    return EX_OK


def cmd_labels(cfg: Config, args: argparse.Namespace) -> int:
    _require_state_dir(cfg)
    # --model: that model's labels and those of every model; without it, all of them.
    name = None if getattr(args, "model", None) is None else _one_model(cfg, args).model.name
    labels = Labels(cfg.state_dir)
    if args.labels_command == "remove":
        label = labels.remove(args.id, name)
        _publish_label(cfg, label, "removed")
        print(f"removed {label.describe()}")
        return EX_OK
    found = labels.read() if name is None else for_model(labels.read(), name)
    if args.json:
        _print_json([x.to_json() for x in found])
        return EX_OK
    for x in found:
        print(f"{x.created_at}  {x.describe()}")
    print(f"{len(found)} label(s)")
    return EX_OK


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    path = Path(args.db) if args.db else cfg.source.path
    if path is None:
        raise ConfigError(["demo: source.kind is not 'sqlite'; give --db PATH"])
    try:
        from ..data import demo  # numpy: imported by this command only, never by the daemon

        total = demo.write(path, args.rows, seed=args.seed, table=cfg.source.table)
        print(f"{path}: wrote {args.rows} rows, {total} in all", flush=True)
        if args.follow:
            _follow_demo(demo, path, args, cfg.source.table)
    except sqlite3.Error as exc:  # SQLite's messages do not name the file
        raise Failure(f"{path}: {exc}") from None
    return EX_OK


def _follow_demo(demo: Any, path: Path, args: argparse.Namespace, table: str) -> None:
    """Adds `args.rate` rows a second until stopped, continuing the timeline: new rows
    landing, as from a plant, for live scoring to score. Each second's rows are one SQLite
    transaction, so a stop at any moment leaves whole seconds and the table readable.

    It also stops when the process that started it ends: `packaging/dev run` starts it and
    then execs the daemon in its place, so the plant stops with the daemon, however that
    ends (Ctrl-C, a SIGTERM to the daemon alone, a crash)."""
    import signal
    import time

    # Stopped by SIGTERM as by Ctrl-C: a clean exit 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parent = os.getppid()
    due = time.monotonic()
    try:
        while os.getppid() == parent:
            due += 1.0
            time.sleep(max(due - time.monotonic(), 0.0))
            demo.write(path, args.rate, seed=args.seed, table=table)
    except KeyboardInterrupt:
        pass


# Order values, versions and label ids meet SQLite, PostgreSQL's int8 and numpy's int64:
# one that does not fit is a usage error naming the option, not an OverflowError in a query.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The demo builds its rows in memory, some 200 MB a million of them.
DEMO_MAX_ROWS = 10_000_000
# --follow writes each second's rows in one transaction: a second's worth must fit well
# within the second on a Raspberry Pi.
DEMO_FOLLOW_MAX_RATE = 100_000


def _integer(minimum: int, maximum: int = INT64_MAX, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer from `minimum` to `maximum`, else one line naming the
    option (argparse adds it) and exit 2. `why` says where the bounds come from."""

    def parse(text: str) -> int:
        # A 5000-digit argument stays one readable line.
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        try:
            value: int | None = int(text)
        except ValueError:
            if not text.strip().lstrip("+-").isdecimal():
                raise argparse.ArgumentTypeError(f"expected an integer, got {shown!r}") from None
            value = None  # more digits than int() takes: out of range all the same
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}{why}, got {shown}"
            )
        return value

    return parse


ORDER = _integer(INT64_MIN, why=" (signed 64 bits, as order values are)")
VERSION = _integer(1, why=" (versions start at 1)")


def _model_option(help: str) -> argparse.ArgumentParser:
    """A parent parser of --model NAME, as --config: SUPPRESS keeps a subparser's default
    from overwriting a value given before it."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", metavar="NAME", default=argparse.SUPPRESS, help=help)
    return parser


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the subcommand; SUPPRESS keeps the
    # subparser's default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="configuration file (default: $SMOCSD_CONFIG, else /etc/smocsd/smocsd.toml)",
    )
    # --model, for the commands that act on one model: before or after the action, as
    # --config (`smocsd models --model a list`, `smocsd models list --model a`) ...
    one = _model_option(
        "the model to act on (`smocsd status` lists them; needed when there are several)"
    )
    # ... and for a new label: the model it is for, else every model.
    labelled = _model_option(
        "the model the label is for (default: every model, however many there are)"
    )
    p = argparse.ArgumentParser(
        prog="smocsd",
        parents=[common],
        description="Edge daemon that trains anomaly-detection autoencoders on sensor readings.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error.",
    )
    p.add_argument("--version", action="version", version=f"smocsd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help: str, parents: tuple = ()) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common, *parents], help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    add("run", cmd_run, "run the daemon until SIGTERM/SIGINT; SIGHUP re-reads the config")
    sp = add(
        "train-once", cmd_train_once, "run one training cycle now and print its result", (one,)
    )
    sp.add_argument(
        "--force",
        action="store_true",
        help="ignore the new-data and interval gates (not min_training_samples)",
    )
    add("check-config", cmd_check_config, "validate the configuration file")
    sp = add(
        "status",
        cmd_status,
        "current model, training backend, last cycle, next check, outbox depth",
    )
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("models", cmd_models, "list, show or roll back model versions", (one,))
    msub = sp.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser("list", parents=[common, one], help="versions kept and their metrics")
    ls.add_argument("--json", action="store_true")
    show = msub.add_parser("show", parents=[common, one], help="a version's essentials")
    show.add_argument("version", type=VERSION)
    show.add_argument("--json", action="store_true", help="the whole metadata.json")
    msub.add_parser(
        "rollback",
        parents=[common, one],
        help="point current at VERSION (default: the previous one)",
    ).add_argument("version", type=VERSION, nargs="?")
    sp.set_defaults(models_command="list", json=False)

    sp = add("outbox", cmd_outbox, "list undelivered results or try to deliver them now")
    osub = sp.add_subparsers(dest="outbox_command", metavar="ACTION")
    osub.add_parser("list", parents=[common], help="results not yet delivered").add_argument(
        "--json", action="store_true"
    )
    osub.add_parser("flush", parents=[common], help="try to deliver waiting results now")
    sp.set_defaults(outbox_command="list", json=False)

    sp = add(
        "score",
        cmd_score,
        "score stored readings as live scoring does, one line per window",
        (one,),
    )
    sp.add_argument(
        "--from", dest="from_order", type=ORDER, help="first order value (default: all)"
    )
    sp.add_argument("--to", dest="to_order", type=ORDER, help="last order value (default: newest)")
    sp.add_argument("--version", type=VERSION, help="model version (default: current)")
    sp.add_argument("--json", action="store_true", help="JSON lines: order, time, score, ...")

    sp = add(
        "accept",
        cmd_accept,
        "this is the new normal: rows the current model alarmed on become trainable, and "
        "the next check trains on them; without --model, for every model",
        (labelled,),
    )
    sp.add_argument(
        "--from",
        dest="from_order",
        type=ORDER,
        help="first order value (default: where the open or newest recorded alarm began; "
        "with several models, that of the model --model names)",
    )
    sp.add_argument(
        "--to", dest="to_order", type=ORDER, help="last order value (default: the newest row now)"
    )
    sp.add_argument("--reason", default="", help="why, for the record and the fleet")
    sp = add(
        "exclude",
        cmd_exclude,
        "a maintenance or calibration period: never trained on, never alarmed; without "
        "--model, for every model",
        (labelled,),
    )
    sp.add_argument(
        "--from", dest="from_order", type=ORDER, required=True, help="first order value"
    )
    sp.add_argument("--to", dest="to_order", type=ORDER, required=True, help="last order value")
    sp.add_argument("--reason", default="", help="why, for the record and the fleet")
    sp = add(
        "labels",
        cmd_labels,
        "list the accept and exclude labels, or remove one; --model: those in force for "
        "that model (its own and those of every model)",
        (one,),
    )
    lsub = sp.add_subparsers(dest="labels_command", metavar="ACTION")
    lsub.add_parser("list", parents=[common, one], help="the labels in force").add_argument(
        "--json", action="store_true"
    )
    lsub.add_parser(
        "remove",
        parents=[common, one],
        help="remove label ID (with --model, only one in force for that model; one of "
        "every model goes for all)",
    ).add_argument("id", type=_integer(1, why=" (label ids start at 1)"))
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(labels_command="list")

    sp = add("demo", cmd_demo, "write a SQLite database of simulated sensor readings")
    sp.add_argument(
        "--rows",
        type=_integer(0, DEMO_MAX_ROWS),
        default=30000,
        help=f"rows to add (default 30000, at most {DEMO_MAX_ROWS})",
    )
    sp.add_argument("--db", metavar="PATH", help="database file (default: source.path)")
    sp.add_argument(
        "--follow",
        action="store_true",
        help="then keep adding rows, --rate a second, until stopped (for live scoring)",
    )
    sp.add_argument(
        "--rate",
        type=_integer(1, DEMO_FOLLOW_MAX_RATE),
        default=100,
        help=f"rows a second with --follow (default 100, at most {DEMO_FOLLOW_MAX_RATE}); "
        "a demo row stands for 10 s of the plant",
    )
    sp.add_argument("--seed", type=_integer(0), default=0, help=argparse.SUPPRESS)
    return p


def _state_dir_owner(cfg: Config) -> int | None:
    try:
        return cfg.state_dir.stat().st_uid
    except OSError:
        return None


def _become_owner(cfg: Config, argv: list[str]) -> None:
    """Run by root on a state directory another user owns, a writing command first becomes
    that user, so that it leaves no root-owned file the daemon cannot replace or prune.

    Raises Failure, naming the sudo command to run instead, when that is not possible.
    """
    if os.geteuid() != 0:
        return
    uid = _state_dir_owner(cfg)
    if not uid:  # no state directory yet, or root's own
        return
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        instead = shlex.join(["sudo", "-u", f"#{uid}", "smocsd", *argv])
        raise Failure(
            f"{cfg.state_dir} is owned by uid {uid}, which has no user entry to switch to; "
            f"run instead: {instead}"
        ) from None
    try:
        # initgroups and setgid need root, so setuid comes last.
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
        os.setuid(uid)
    except OSError as exc:
        instead = shlex.join(["sudo", "-u", user.pw_name, "smocsd", *argv])
        raise Failure(
            f"cannot switch to {user.pw_name}, the owner of {cfg.state_dir}: {exc.strerror}; "
            f"run instead: {instead}"
        ) from None
    log.info("running as %s, the owner of %s", user.pw_name, cfg.state_dir)


def _os_error_text(exc: OSError) -> str:
    """'<path>: <reason>', naming the file(s) the error is about when it has them."""
    if exc.filename is None:
        return str(exc)
    names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
    return f"{names}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.config_path = config_mod.config_path(getattr(args, "config", None))
    action = (
        getattr(args, "models_command", None)
        or getattr(args, "outbox_command", None)
        or getattr(args, "labels_command", None)
    )
    try:
        if args.command == "demo" and not args.config_path.exists():
            cfg = config_mod.parse("")  # demo works before any config is written
        else:
            cfg = config_mod.load(args.config_path)
        configure_logging(cfg.daemon.log_level)
        for warning in cfg.warnings:
            log.warning("%s", warning)
        if (args.command, action) in _WRITERS:
            _become_owner(cfg, argv)
        if args.command in ("run", "train-once", "check-config"):
            _check_job(cfg, args.config_path)
        if args.command in ("run", "train-once"):
            # Before the daemon starts: in its loop a ConfigError is logged and retried.
            config_mod.make_state_dir(cfg)
        return args.func(cfg, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except UsageError as exc:  # one line naming the models there are
        print(f"smocsd: {exc}", file=sys.stderr)
        return EX_USAGE
    except (Failure, StoreError, OutboxError, LabelError) as exc:  # each names its file
        print(f"smocsd: {exc}", file=sys.stderr)
        return EX_FAIL
    except OSError as exc:
        print(f"smocsd: {_os_error_text(exc)}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_FAIL
    except Exception as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return EX_FAIL
