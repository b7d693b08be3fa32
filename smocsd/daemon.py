"""The daemon: composes config, source, job cycle, outbox and publisher on a timer.

Signals only set flags; the loop acts on them between batches or while idle, so a
stop never interrupts the store's atomic save and a reload never races a cycle.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import systemd
from .config import Config, ConfigError
from .job import CycleProgress, State, Stopped, cycle_lock, describe, run_cycle, utcnow
from .outbox import Outbox
from .publish import Publisher
from .sources import Source, open_source
from .store import ModelStore

log = logging.getLogger("smocsd")


@dataclass
class Parts:
    """What one configuration builds; rebuilt on reload."""

    cfg: Config
    source: Source
    outbox: Outbox
    publisher: Publisher

    @classmethod
    def build(cls, cfg: Config) -> Parts:
        prepare_state_dir(cfg)
        return cls(
            cfg=cfg,
            source=open_source(cfg.source),
            outbox=Outbox(cfg.state_dir / "outbox.db", cfg.publish.outbox_max),
            publisher=Publisher(cfg.publish, cfg.daemon.device_id),
        )

    def close(self) -> None:
        self.source.close()
        self.outbox.close()
        self.publisher.close()

    def flush_outbox(self) -> None:
        if len(self.outbox):
            delivered = self.outbox.flush(self.publisher.deliver)
            if delivered:
                log.info("delivered %d result(s); %d waiting", delivered, len(self.outbox))

    def cycle(self, *, force: bool = False, progress: CycleProgress | None = None) -> dict:
        """A training cycle whose result is durable in the outbox before delivery is tried."""
        self.flush_outbox()
        result = run_cycle(self.cfg, self.source, force=force, progress=progress)
        recorded = {k: result[k] for k in ("outcome", "reason", "error") if k in result}
        State(self.cfg.state_dir).update(
            last_cycle={"at": utcnow(), "version": result.get("version"), **recorded}
        )
        log.log(logging.ERROR if result["outcome"] == "failed" else logging.INFO, describe(result))
        if result["outcome"] != "skipped":
            self.outbox.put(result)
            self.flush_outbox()
        return result


def prepare_state_dir(cfg: Config) -> None:
    """Makes the state directory usable and removes what a crash left behind.

    Only under the cycle lock: while another process (the daemon, or a manual
    train-once) runs a cycle, its half-built version is work in progress, not a leftover.
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = ModelStore.of(cfg)
    with cycle_lock(cfg.state_dir) as locked:
        for leftover in store.recover() if locked else ():
            log.warning("removed %s left by an interrupted save", leftover)


class Daemon:
    def __init__(self, config_path: Path, cfg: Config):
        self.config_path = config_path
        self.parts = Parts.build(cfg)
        self.watchdog = systemd.Watchdog()
        self.stop_requested = False
        self.reload_requested = False

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        cfg = self.parts.cfg
        log.info("smocsd started: device %s, state in %s", cfg.daemon.device_id, cfg.state_dir)
        systemd.notify("READY=1", "STATUS=starting first check")
        try:
            while not self.stop_requested:
                if self.reload_requested:
                    self._reload()
                self._tick()
                self._idle()
        except Stopped:
            log.info("stopped mid-training; nothing was promoted")
        finally:
            systemd.notify("STOPPING=1", "STATUS=stopping")
            self.parts.close()
        log.info("smocsd stopped")
        return 0

    def _tick(self) -> None:
        progress = CycleProgress(
            should_stop=lambda: self.stop_requested,
            ping=self.watchdog.ping,
            status=lambda text: systemd.notify(f"STATUS={text}"),
        )
        try:
            self.last = self.parts.cycle(progress=progress)
        except Stopped:
            raise
        except Exception as exc:  # the outbox or state dir failing must not kill the loop
            log.exception("cycle aborted: %s", exc)
            self.last = {"outcome": "failed", "error": str(exc)}

    def _idle(self) -> None:
        cfg = self.parts.cfg
        interval = cfg.daemon.check_interval * random.uniform(0.9, 1.1)
        deadline = time.time() + interval
        when = datetime.fromtimestamp(deadline).strftime("%H:%M:%S")
        State(cfg.state_dir).update(next_check=datetime.fromtimestamp(deadline).isoformat())
        outbox = len(self.parts.outbox)
        status = f"idle: next check {when}, {self.last.get('reason') or describe(self.last)}"
        systemd.notify(f"STATUS={status}{f', {outbox} result(s) in outbox' if outbox else ''}")
        while not (self.stop_requested or self.reload_requested) and time.time() < deadline:
            self.watchdog.ping()
            time.sleep(min(1.0, max(0.0, deadline - time.time())))

    def _reload(self) -> None:
        self.reload_requested = False
        systemd.notify("RELOADING=1")
        try:
            cfg = config_mod.load(self.config_path)
            parts = Parts.build(cfg)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running config: %s", problem)
        except Exception as exc:
            log.error("reload refused, keeping the running config: %s", exc)
        else:
            self.parts.close()
            self.parts = parts
            systemd.configure_logging(cfg.daemon.log_level)
            for warning in cfg.warnings:
                log.warning("%s", warning)
            log.info("configuration reloaded from %s", self.config_path)
        systemd.notify("READY=1")
