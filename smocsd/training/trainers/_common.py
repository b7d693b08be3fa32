"""What both backends share: the epoch loop with early stopping, and the warm-start decision.

A backend only supplies a :class:`Session` (one train step, validation error, keeping and
restoring the best weights), so shuffling, batching, progress calls and the stopping rule
are identical for both and the backends stay comparable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from smocsd.training.trainers import Fit, Progress, TrainSpec, Windows
from smocsd.training.trainers.graph import param_shapes

log = logging.getLogger(__name__)

# Validation needs no gradients, so larger batches only save per-call overhead; they stay
# small enough that between_batches (the watchdog ping) still comes every few milliseconds.
EVAL_BATCH = 4096
# Training windows are gathered from the row matrix this many at a time (about 240 kB of
# float32 at 30 features), then fed to the trainer batch by batch as views of the block.
GATHER_WINDOWS = 2048

T = TypeVar("T")


class Session(Protocol):
    def train_step(self, x: np.ndarray) -> float:
        """One optimizer step on batch ``x`` (the target is ``x`` itself); returns the batch's
        MSE before the update."""
        ...

    def squared_error(self, x: np.ndarray) -> float:
        """Sum of squared reconstruction errors over all elements of ``x``, no update."""
        ...

    def keep_best(self) -> None:
        """Remember the current weights as the best so far."""
        ...

    def restore_best(self) -> None:
        """Put the remembered weights back (before export)."""
        ...


@dataclass(frozen=True)
class LoopResult:
    train_loss: float
    val_loss: float
    epochs_run: int

    def fit(self, started: float, warm_started: bool) -> Fit:
        """The Fit of a whole ``fit()`` call begun at ``started`` (time.monotonic())."""
        return Fit(
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            epochs_run=self.epochs_run,
            duration_s=time.monotonic() - started,
            warm_started=warm_started,
        )


def check_inputs(spec: TrainSpec, train: Windows, val: Windows) -> None:
    if spec.epochs < 1 or spec.batch_size < 1:
        raise ValueError(
            f"epochs and batch_size must be >= 1, got {spec.epochs} and {spec.batch_size}"
        )
    for what, windows in (("training", train), ("validation", val)):
        if len(windows) == 0:
            raise ValueError(f"no {what} windows to train on")
        if windows.n_features != spec.n_features:
            raise ValueError(
                f"{what} windows have {windows.n_features} features, the model expects "
                f"{spec.n_features}"
            )


def validation_loss(session: Session, val: Windows, progress: Progress) -> float:
    """MSE over all validation elements, in their stored order."""
    n = len(val)
    total = 0.0
    for start in range(0, n, EVAL_BATCH):
        total += session.squared_error(val.batch(np.arange(start, min(start + EVAL_BATCH, n))))
        progress.between_batches()
    return total / (n * val.n_features)


def _blocks(train: Windows, order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The windows in `order`, copied out GATHER_WINDOWS (rounded to whole batches) at a
    time: one gather per block instead of one per batch, the same batches in the same order."""
    step = max(1, GATHER_WINDOWS // batch_size) * batch_size
    for start in range(0, len(order), step):
        yield train.batch(order[start : start + step])


def run_epochs(
    spec: TrainSpec, train: Windows, val: Windows, progress: Progress, session: Session
) -> LoopResult:
    """Train until ``epochs`` or until ``patience`` epochs in a row bring no better validation
    loss; leaves the session holding the best epoch's weights."""
    rng = np.random.default_rng((spec.seed, 1))  # a stream apart from the weight init's
    n = len(train)
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # shuffled in place
    best_val = math.inf
    best_train = math.nan
    stale = 0
    epoch = 0
    for epoch in range(1, spec.epochs + 1):
        rng.shuffle(order)
        total = 0.0
        for block in _blocks(train, order, spec.batch_size):
            for start in range(0, len(block), spec.batch_size):
                x = block[start : start + spec.batch_size]
                total += session.train_step(x) * len(x)
                progress.between_batches()
        train_loss = total / n
        val_loss = validation_loss(session, val, progress)
        progress.on_epoch(epoch, spec.epochs, train_loss, val_loss)
        if val_loss < best_val:
            best_val, best_train, stale = val_loss, train_loss, 0
            session.keep_best()
        else:
            stale += 1
            if stale >= spec.patience:
                break
    if not math.isfinite(best_val):
        raise RuntimeError("training diverged: the validation loss was never finite")
    if stale:
        session.restore_best()
    return LoopResult(train_loss=best_train, val_loss=best_val, epochs_run=epoch)


def load_warm_start(
    spec: TrainSpec,
    warm_start: Path | None,
    filename: str,
    load: Callable[[Path], T],
    shapes_of: Callable[[T], dict[str, tuple[int, ...]]],
) -> T | None:
    """The previous version's checkpoint ``filename``, loaded, if it fits this architecture;
    otherwise None, with the reason logged (training then starts from the seeded weights)."""
    if warm_start is None:
        return None
    path = warm_start / filename
    if not path.is_file():
        log.info("not warm-starting: %s has no %s checkpoint", warm_start, filename)
        return None
    try:
        checkpoint = load(path)
        shapes = shapes_of(checkpoint)
    except Exception as e:  # any unreadable checkpoint means the same thing: start fresh
        log.warning("not warm-starting: cannot read %s: %s", path, e)
        return None
    if shapes != param_shapes(spec.n_features, spec.hidden):
        log.info(
            "not warm-starting: %s is not for n_features=%d, hidden=%s",
            path,
            spec.n_features,
            list(spec.hidden),
        )
        return None
    return checkpoint
