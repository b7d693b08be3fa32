"""The daemon's look at a model's training gates before it starts a training process.

A training process costs an interpreter, numpy and ONNX Runtime: at every check, for
fifty models, that is most of a small gateway's CPU spent learning that none will train.
The daemon asks the built-in job's gates first (smocsd/training/gate.py, a few counting
queries) and starts a process only for a model that may train; that process asks them
again, with the repairs of its state. A user's job keeps its own gates in its own
get_training_data, so it gets a process at every check, as before.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..common.config import Config
from ..common.labels import Kind, Label, for_model
from ..common.state import StateFile
from ..data.sources import Source, SourceError, open_source
from ..training import gate

if TYPE_CHECKING:
    from ..common.state import JobEntry


class Gates:
    """One source per model for a look at the gates of every model, closed after it
    (close): a check's counts reuse each model's connection, no check holds them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sources: dict[str, Source] = {}

    def _source(self, model: Config) -> Source:
        name = model.model.name
        if name not in self.sources:
            self.sources[name] = open_source(model.source)
        return self.sources[name]

    def waiting(self, model: Config, state: StateFile, labels: list[Label]) -> str | None:
        """Why `model` need not start a training process now (None: start one). Only a
        certain no: anything the process would repair or decide otherwise (a new accept
        label, ids gone backwards, a clock set back) starts it, and so does a source that
        cannot be read, so that the cycle fails and its result says why, as it did."""
        if model.training.job != "autoencoder":
            return None
        try:
            return self._waiting(model, state, labels)
        except SourceError:
            self.sources.pop(model.model.name).close()
            return None

    def _waiting(self, model: Config, state: StateFile, labels: list[Label]) -> str | None:
        name = model.model.name
        entry: JobEntry | None = state.jobs.get(name)
        source = self._source(model)
        if entry is None or entry.last_order is None:
            return gate.first_training(model.training, source.count_after(None))
        accepted = max((x.id for x in for_model(labels, name) if x.kind is Kind.ACCEPT), default=0)
        if accepted > (entry.accept_tried or 0):
            return None
        trained_at = entry.trained_at or 0.0
        if trained_at > time.time() + gate.CLOCK_SLACK:  # the process repairs it
            return None
        newest = source.max_order()
        if newest is None or newest < entry.last_order:
            return None
        last = entry.last_order
        return gate.retraining(model.training, lambda: source.count_after(last), trained_at)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.sources.clear()
