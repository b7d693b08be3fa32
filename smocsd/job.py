"""The TrainingJob extension point and the cycle that calls its five hooks.

smocsd owns scheduling, the database handle, publishing, the lifecycle and error
recovery; a job only says how to build, feed, train, evaluate and save its model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Config
from .sources import Source
from .store import write_atomic

RESULT_SCHEMA = "smocsd.training-result/1"

log = logging.getLogger(__name__)


class Stopped(BaseException):
    """Shutdown was requested mid-cycle; nothing partial is promoted.

    A BaseException, so a job's own `except Exception` cannot swallow a stop request.
    """


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CycleProgress:
    """The training loop's line to the outside: stop requests, watchdog pings, status."""

    def __init__(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        ping: Callable[[], None] = lambda: None,
        status: Callable[[str], None] = lambda text: None,
    ):
        self.should_stop = should_stop
        self.ping = ping
        self.status = status
        self.label = "training"

    def between_batches(self) -> None:
        self.ping()
        if self.should_stop():
            raise Stopped()

    def on_epoch(self, epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
        text = f"{self.label}: epoch {epoch}/{epochs}, val_loss {val_loss:.4g}"
        log.info("%s, train_loss %.4g", text, train_loss)
        self.status(text)


class State:
    """state_dir/state.json: what smocsd remembers between cycles and shows in `status`."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "state.json"

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.error("%s: unreadable, starting from empty state", self.path)
            return {}

    def update(self, **changes: Any) -> None:
        """Read-modify-write under a lock: the daemon and a manual command may both write."""
        with open(self.path.with_name("state.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            data.update(changes)
            write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode())


class TrainingJob(ABC):
    """Base class of a training job; subclass it and name it in `training.job`.

    The cycle calls, in this order: `build_model()` (from __init__),
    `get_training_data()` (None: not enough data, skip this tick),
    `train_model(data)`, `eval_model()`, `save_model(metrics, eval_results)`.
    A job object lives for one cycle, so training data is dropped with it.

    Given to the job: `config` (the whole Config; `config.job_options` is the free-form
    `[job]` table), `db_manager` (the readings source), `state_dir`, `logger`,
    `progress` (call `progress.between_batches()` in long loops: it honours stop
    requests and keeps the systemd watchdog fed), `force` (train-once --force) and
    `state` (persistent per-job dict, saved only after a successful save_model).
    Set `skip_reason` before returning None from get_training_data.
    """

    def __init__(
        self,
        config: Config,
        db_manager: Source,
        state_dir: Path,
        logger: logging.Logger,
        progress: CycleProgress | None = None,
        force: bool = False,
        state: dict[str, Any] | None = None,
    ):
        self.config = config
        self.db_manager = db_manager
        self.state_dir = state_dir
        self.logger = logger
        self.progress = progress or CycleProgress()
        self.force = force
        self.state: dict[str, Any] = dict(state or {})
        self.skip_reason = "not enough data"
        self.build_model()

    @abstractmethod
    def build_model(self) -> None:
        """Prepares the model (architecture, trainer); called once per cycle."""

    @abstractmethod
    def get_training_data(self) -> Any | None:
        """The data to train on, or None to skip this tick (set `skip_reason`)."""

    @abstractmethod
    def train_model(self, data: Any) -> dict:
        """Trains on `data`; returns the training metrics to publish."""

    @abstractmethod
    def eval_model(self) -> dict:
        """Evaluates the trained model; returns the evaluation results to publish."""

    @abstractmethod
    def save_model(self, model_metrics: dict, eval_results: dict) -> dict | None:
        """Persists the model. May return {"version", "outcome" ("promoted"|"rejected"),
        "model_meta"}; None means promoted without a version number."""


def load_job_class(spec: str) -> type[TrainingJob]:
    """'autoencoder' or 'package.module:ClassName' -> the TrainingJob subclass."""
    if spec == "autoencoder":
        from .autoencoder import AutoencoderJob

        return AutoencoderJob
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ValueError(f"training.job: cannot import {module_name!r}: {exc}") from None
    except AttributeError:
        raise ValueError(f"training.job: {module_name!r} has no {class_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, TrainingJob)):
        raise ValueError(f"training.job: {spec!r} is not a TrainingJob subclass")
    return cls


def result_message(cfg: Config, outcome: str, **fields: Any) -> dict[str, Any]:
    """The object published for a cycle (and printed by train-once)."""
    message = {
        "schema": RESULT_SCHEMA,
        "message_id": str(uuid.uuid4()),
        "device_id": cfg.daemon.device_id,
        "model": cfg.model.name,
        "version": None,
        "outcome": outcome,
        "timestamp": utcnow(),
        "metrics": {},
        "eval": {},
        "model_meta": {},
    }
    message.update(fields)
    return message


@contextlib.contextmanager
def cycle_lock(state_dir: Path) -> Iterator[bool]:
    """One cycle at a time per state_dir (the daemon and a manual train-once may race)."""
    with open(state_dir / "cycle.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_cycle(
    cfg: Config,
    source: Source,
    *,
    force: bool = False,
    progress: CycleProgress | None = None,
) -> dict[str, Any]:
    """One training cycle: the five hooks, in order, in this one place.

    Returns the result to publish, or {"outcome": "skipped", "reason": ...}. Any
    exception from a hook becomes a `failed` result; only Stopped propagates.
    """
    with cycle_lock(cfg.state_dir) as locked:
        if not locked:
            return {"outcome": "skipped", "reason": "another training cycle is running"}
        state = State(cfg.state_dir)
        jobs = state.read().get("jobs", {})
        job: TrainingJob | None = None
        started = time.monotonic()
        try:
            job_class = load_job_class(cfg.training.job)
            job = job_class(
                cfg,
                source,
                cfg.state_dir,
                logging.getLogger(f"smocsd.job.{cfg.model.name}"),
                progress=progress,
                force=force,
                state=jobs.get(cfg.model.name),
            )
            data = job.get_training_data()
            if data is None:
                return {"outcome": "skipped", "reason": job.skip_reason}
            metrics = job.train_model(data)
            del data  # the job may still hold what eval needs; the cycle holds nothing
            eval_results = job.eval_model()
            saved = job.save_model(metrics, eval_results) or {}
            jobs[cfg.model.name] = job.state
            state.update(jobs=jobs)
            return result_message(
                cfg,
                saved.get("outcome", "promoted"),
                version=saved.get("version"),
                metrics=metrics,
                eval=eval_results,
                model_meta=saved.get("model_meta", {}),
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.debug("cycle failed after %.1fs", time.monotonic() - started, exc_info=True)
            return result_message(cfg, "failed", error=error, version=getattr(job, "version", None))


def describe(result: dict[str, Any]) -> str:
    """One log line for a cycle's result."""
    if result["outcome"] == "skipped":
        return f"skipped: {result['reason']}"
    version = f" v{result['version']}" if result.get("version") is not None else ""
    detail = result.get("error") or ", ".join(
        f"{k} {v:.4g}" for k, v in result.get("metrics", {}).items() if isinstance(v, float)
    )
    return f"{result['outcome']}{version}: {detail}" if detail else result["outcome"]
