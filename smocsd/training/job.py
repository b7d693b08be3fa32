"""The public extension API: TrainingJob and its five hooks, and the progress it reports.

smocsd owns scheduling, the database handle, publishing, the lifecycle and error
recovery (smocsd/app/cycle.py); a job only says how to build, feed, train, evaluate and
save its model.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the daemon imports this module and must not load numpy through sources
    from ..common.config import Config
    from ..data.sources import Source
    from .screen import LeaveOut

log = logging.getLogger(__name__)


class Stopped(BaseException):
    """Shutdown was requested mid-cycle; nothing partial is promoted.

    A BaseException, so a job's own `except Exception` cannot swallow a stop request.
    """


@dataclass(frozen=True)
class Saved:
    """What save_model() returns: the version it saved (None: it numbers none), whether it
    became the one in use, and the `model_meta` its training result carries (the built-in
    job: the whole metadata.json). A dict of the same keys is accepted too (the contract's
    first form); smocsd.training.hooks checks either and converts it once."""

    version: int | None = None
    outcome: Literal["promoted", "rejected"] = "promoted"
    model_meta: dict[str, Any] = field(default_factory=dict)


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
        """An epoch in the STATUS= line and at DEBUG: fifty INFO lines a cycle would be most
        of a gateway's journal; the cycle's one line says how many ran."""
        text = f"{self.label}: epoch {epoch}/{epochs}, val_loss {val_loss:.4g}"
        log.debug("%s, train_loss %.4g", text, train_loss)
        self.status(text)


class TrainingJob(ABC):
    """Base class of a training job; subclass it and name it in `training.job`.

    The cycle calls, in this order: `build_model()` (from __init__),
    `get_training_data()` (None: not enough data, skip this tick),
    `train_model(data)`, `eval_model()`, `save_model(metrics, eval_results)`.
    A job object lives for one cycle, so training data is dropped with it.

    Given to the job: `config` (the whole Config; `config.job_options` is the free-form
    `[job]` table), `db_manager` (the readings source), `state_dir`, `logger`,
    `progress` (call `progress.between_batches()` in long loops: it honours stop
    requests and shows the daemon that training is alive), `force` (train-once
    --force) and `state` (persistent per-job dict, saved after a successful save_model
    or a skip, never after a failure; smocsd keeps its screening record under its
    "screened" key). Set `skip_reason` before returning None from get_training_data.

    Call `leave_out()` in get_training_data, after deciding to train, and keep its
    rows out of every training and validation window: the rows the current model
    alarmed on and the operator's excluded periods, less the accepted ones. A job that
    trains on them learns a persistent fault as the new normal.

    The hooks run in a child process of the daemon, one per cycle: a crash, an OOM kill
    or a hang there is a `failed` result, and the daemon keeps running.
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
        self.label_messages: list[dict[str, Any]] = []  # labels this cycle made, to publish
        self._leave_out: LeaveOut | None = None
        self.build_model()

    def leave_out(self) -> LeaveOut:
        """The rows not to train on (`mask(order)` marks them); found once per cycle by
        scoring the rows that arrived since the last one with the current model, so call
        it only once the job has decided to train."""
        if self._leave_out is None:
            from .screen import screen  # numpy and onnxruntime: the child's imports

            self._leave_out, self.label_messages = screen(self)
        return self._leave_out

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
    def save_model(self, model_metrics: dict, eval_results: dict) -> Saved | dict | None:
        """Persists the model. Returns a Saved (or a dict of its keys); None means promoted
        without a version number."""
