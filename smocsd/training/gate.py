"""The built-in job's gates on a training cycle, in numbers alone: the rows a first
training needs, the new rows and the interval a retraining waits for.

Numpy-free: the daemon asks them of every model before it starts a training process, so
that a gateway watching fifty machines spawns a process only for the model that will
train, not fifty interpreters a minute to learn that none will (smocsd/app/daemon.py).
The training process asks them again, with the checks that may repair its state
(smocsd/training/autoencoder.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..common.config import TrainingConfig

# A trained_at this far ahead of the clock is a clock that was reset, not drift.
CLOCK_SLACK = 60.0


def first_training(training: TrainingConfig, rows: int) -> str | None:
    """Why a model never trained must wait (None: it may train)."""
    if rows < training.min_training_samples:
        return f"{rows} rows of {training.min_training_samples} needed for the first training"
    return None


def retraining(
    training: TrainingConfig, new_rows: Callable[[], int], trained_at: float
) -> str | None:
    """Why a trained model must wait for its next training (None: it may train)."""
    new = new_rows()
    if new < training.min_new_samples:
        return f"{new} new rows of {training.min_new_samples} needed"
    since = time.time() - trained_at
    if since < training.min_interval:
        return f"last training {since:.0f}s ago, min_interval is {training.min_interval:.0f}s"
    return None
