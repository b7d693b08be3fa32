"""The `smocsd` command: parses arguments, maps each command onto the parts, sets exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error (EX_CONFIG:
the unit's RestartPreventExitStatus=78 keeps systemd from restart-looping on a bad file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__, demo
from . import config as config_mod
from .config import Config, ConfigError
from .store import ModelStore, StoreError, version_name
from .systemd import configure_logging

EX_OK, EX_FAIL, EX_USAGE, EX_CONFIG = 0, 1, 2, 78

log = logging.getLogger("smocsd")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from .daemon import Daemon

    return Daemon(args.config_path, cfg).run()


def cmd_train_once(cfg: Config, args: argparse.Namespace) -> int:
    from .daemon import Parts

    parts = Parts.build(cfg)
    try:
        result = parts.cycle(force=args.force)
    finally:
        parts.close()
    _print_json(result)
    return EX_FAIL if result["outcome"] == "failed" else EX_OK


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    print(f"{args.config_path}: ok")
    return EX_OK


def _check_job(cfg: Config, path: Path) -> None:
    """A training.job that cannot be loaded is a configuration error, found before running."""
    from .job import load_job_class

    try:
        load_job_class(cfg.training.job)
    except ValueError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from .job import State
    from .outbox import Outbox

    store = ModelStore.of(cfg)
    state = State(cfg.state_dir).read()
    outbox_path = cfg.state_dir / "outbox.db"
    depth = 0
    if outbox_path.exists():
        outbox = Outbox(outbox_path, cfg.publish.outbox_max)
        depth = len(outbox)
        outbox.close()
    status = {
        "device_id": cfg.daemon.device_id,
        "model": cfg.model.name,
        "current_version": store.current(),
        "versions": store.versions(),
        "last_cycle": state.get("last_cycle"),
        "next_check": state.get("next_check"),
        "outbox_depth": depth,
        "state_dir": str(cfg.state_dir),
    }
    if args.json:
        _print_json(status)
        return EX_OK
    current = status["current_version"]
    last = status["last_cycle"] or {}
    print(f"model:       {cfg.model.name} (device {cfg.daemon.device_id})")
    print(f"current:     {version_name(current) if current else 'none'}")
    print(f"kept:        {', '.join(map(version_name, status['versions'])) or 'none'}")
    detail = last.get("reason") or last.get("error") or ""
    version = f" v{last['version']}" if last.get("version") else ""
    print(f"last cycle:  {last.get('at', 'never')} {last.get('outcome', '')}{version} {detail}")
    print(f"next check:  {status['next_check'] or 'not scheduled (daemon not running?)'}")
    print(f"outbox:      {depth} result(s) waiting")
    return EX_OK


def cmd_models(cfg: Config, args: argparse.Namespace) -> int:
    store = ModelStore.of(cfg)
    if args.models_command == "show":
        _print_json(store.metadata(args.version))
    elif args.models_command == "rollback":
        version = store.rollback(args.version)
        print(f"current -> {version_name(version)}")
    else:
        current = store.current()
        rows = []
        for v in store.versions():
            meta = store.metadata(v)
            rows.append(
                {
                    "version": v,
                    "current": v == current,
                    "created_at": meta.get("created_at"),
                    "backend": meta.get("backend"),
                    "val_loss": meta.get("metrics", {}).get("val_loss"),
                    "threshold": meta.get("threshold"),
                }
            )
        if args.json:
            _print_json(rows)
        else:
            print(
                f"{'':2}{'version':<9}{'created_at':<22}{'backend':<8}{'val_loss':>10}{'threshold':>11}"
            )
            for r in rows:
                print(
                    f"{'*' if r['current'] else ' ':2}{version_name(r['version']):<9}"
                    f"{r['created_at'] or '':<22}{r['backend'] or '':<8}"
                    f"{r['val_loss'] or float('nan'):>10.4g}{r['threshold'] or float('nan'):>11.4g}"
                )
    return EX_OK


def cmd_outbox(cfg: Config, args: argparse.Namespace) -> int:
    from .outbox import Outbox

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(cfg.state_dir / "outbox.db", cfg.publish.outbox_max)
    try:
        if args.outbox_command == "flush":
            from .publish import Publisher

            publisher = Publisher(cfg.publish, cfg.daemon.device_id)
            try:
                delivered = outbox.flush(publisher.deliver)
            finally:
                publisher.close()
            print(f"delivered {delivered}, {len(outbox)} waiting")
            return EX_OK if not len(outbox) else EX_FAIL
        messages = outbox.pending()
        if args.json:
            _print_json(messages)
        else:
            for m in messages:
                print(
                    f"{m['timestamp']}  {m['message_id']}  {m['model']} v{m['version']}  "
                    f"{m['outcome']}"
                )
            print(f"{len(messages)} result(s) waiting")
    finally:
        outbox.close()
    return EX_OK


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    path = Path(args.db) if args.db else cfg.source.path
    if path is None:
        raise ConfigError(["demo: source.kind is not 'sqlite'; give --db PATH"])
    total = demo.write(path, args.rows, seed=args.seed, table=cfg.source.table)
    print(f"{path}: wrote {args.rows} rows, {total} in all")
    return EX_OK


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
    p = argparse.ArgumentParser(
        prog="smocsd",
        parents=[common],
        description="Edge daemon that trains anomaly-detection autoencoders on sensor readings.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error.",
    )
    p.add_argument("--version", action="version", version=f"smocsd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    add("run", cmd_run, "run the daemon until SIGTERM/SIGINT; SIGHUP re-reads the config")
    sp = add("train-once", cmd_train_once, "run one training cycle now and print its result")
    sp.add_argument(
        "--force",
        action="store_true",
        help="ignore the new-data and interval gates (not min_training_samples)",
    )
    add("check-config", cmd_check_config, "validate the configuration file")
    sp = add("status", cmd_status, "current model, last cycle, next check, outbox depth")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("models", cmd_models, "list, show or roll back model versions")
    msub = sp.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser("list", parents=[common], help="versions kept and their metrics")
    ls.add_argument("--json", action="store_true")
    msub.add_parser("show", parents=[common], help="a version's metadata").add_argument(
        "version", type=int
    )
    msub.add_parser(
        "rollback", parents=[common], help="point current at VERSION (default: the previous one)"
    ).add_argument("version", type=int, nargs="?")
    sp.set_defaults(models_command="list", json=False)

    sp = add("outbox", cmd_outbox, "list undelivered results or try to deliver them now")
    osub = sp.add_subparsers(dest="outbox_command", metavar="ACTION")
    osub.add_parser("list", parents=[common], help="results not yet delivered").add_argument(
        "--json", action="store_true"
    )
    osub.add_parser("flush", parents=[common], help="try to deliver waiting results now")
    sp.set_defaults(outbox_command="list", json=False)

    sp = add("demo", cmd_demo, "write a SQLite database of simulated sensor readings")
    sp.add_argument("--rows", type=int, default=30000, help="rows to add (default 30000)")
    sp.add_argument("--db", metavar="PATH", help="database file (default: source.path)")
    sp.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config_path = config_mod.config_path(getattr(args, "config", None))
    try:
        if args.command == "demo" and not args.config_path.exists():
            cfg = config_mod.parse("")  # demo works before any config is written
        else:
            cfg = config_mod.load(args.config_path)
        configure_logging(cfg.daemon.log_level)
        for warning in cfg.warnings:
            log.warning("%s", warning)
        if args.command in ("run", "train-once", "check-config"):
            _check_job(cfg, args.config_path)
        return args.func(cfg, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except StoreError as exc:
        print(f"smocsd: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_FAIL
    except Exception as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return EX_FAIL
