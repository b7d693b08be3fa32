"""Sliding windows over readings: quality checks, the train/validation split, normalization.

Windows are never materialized as a whole (200 000 rows x 50 x 3 would be 120 MB
of float32): a window is a start row, and `WindowSet.batch` gathers the rows of
a batch of windows when the trainer asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """The readings cannot be trained on (a channel without any valid value, too few windows)."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel z-score: (x - mean) / scale."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray) -> Normalization:
        mean = rows.mean(axis=0)
        std = rows.std(axis=0)
        # A constant channel carries no information but must not divide by zero.
        scale = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return cls(mean=mean, scale=scale)

    @classmethod
    def from_meta(cls, meta: dict) -> Normalization:
        return cls(np.asarray(meta["mean"], np.float64), np.asarray(meta["scale"], np.float64))

    def to_meta(self) -> dict:
        return {"kind": "zscore", "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    def apply(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.scale).astype(np.float32)


class WindowSet:
    """Windows of `size` rows starting at `starts` in the normalized row matrix `z`.

    `batch` flattens time-major (x[t0,c0], x[t0,c1], ..., x[t1,c0], ...), which is
    exactly the row-major layout of z[start:start+size].
    """

    def __init__(self, z: np.ndarray, starts: np.ndarray, size: int):
        self.z = z
        self.starts = starts
        self.size = size
        self.n_features = size * z.shape[1]
        self._offsets = np.arange(size)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        rows = self.starts[indices][:, None] + self._offsets
        return self.z[rows].reshape(len(indices), self.n_features)

    def batches(self, batch_size: int = 4096):
        for i in range(0, len(self), batch_size):
            yield self.batch(np.arange(i, min(i + batch_size, len(self))))


@dataclass(frozen=True)
class TimeCheck:
    """What the time column says about consecutive rows; a window never spans a break."""

    interval: float  # median sampling interval, seconds (nan: no usable time)
    max_gap: float  # longest step a window may span, seconds
    gaps: int  # steps longer than max_gap
    backwards: int  # steps where time goes back (rows out of order)
    duplicates: int  # steps with the same time twice
    no_time: int  # rows whose time is NULL or unparseable
    first_disorder: int | None = None  # index of the first row stepping back or repeating

    def to_meta(self) -> dict:
        return {
            "interval_s": None if np.isnan(self.interval) else self.interval,
            "max_gap_s": None if np.isnan(self.max_gap) else self.max_gap,
            "gaps": self.gaps,
            "out_of_order": self.backwards,
            "duplicate_times": self.duplicates,
            "rows_without_time": self.no_time,
        }


# A step of up to three sampling intervals is a late or missed sample, not a gap: real
# gateways miss single readings, and breaking windows there would discard data for nothing.
AUTO_GAP_INTERVALS = 3.0


def check_time(time: np.ndarray, max_gap: float | None) -> tuple[np.ndarray, TimeCheck]:
    """Breaks between rows (`breaks[i]`: rows i-1 and i are not contiguous) and their census.

    A break is a step longer than `max_gap` (None: three median sampling intervals), a step
    backwards or a repeated time (the order column and the clock disagree, so the rows'
    spacing is unknown), or a row without a time.
    """
    n = len(time)
    breaks = np.zeros(n, bool)
    missing = ~np.isfinite(time)
    if n == 0 or missing.all():
        return breaks, TimeCheck(np.nan, np.nan, 0, 0, 0, int(missing.sum()))
    step = np.diff(time)
    forward = step[step > 0]
    interval = float(np.median(forward)) if len(forward) else np.nan
    if max_gap is None:
        max_gap = AUTO_GAP_INTERVALS * interval
    with np.errstate(invalid="ignore"):
        gap, back, same = step > max_gap, step < 0, step == 0
    breaks[1:] = gap | back | same
    disorder = np.flatnonzero(back | same)
    breaks |= missing
    breaks[1:] |= missing[:-1]
    check = TimeCheck(
        interval=interval,
        max_gap=float(max_gap),
        gaps=int(gap.sum()),
        backwards=int(back.sum()),
        duplicates=int(same.sum()),
        no_time=int(missing.sum()),
        first_disorder=int(disorder[0]) + 1 if len(disorder) else None,
    )
    return breaks, check


def valid_starts(
    bad_rows: np.ndarray, size: int, stride: int, breaks: np.ndarray | None = None
) -> np.ndarray:
    """Start rows of the windows that contain no bad row and span no break, every `stride`."""
    n = len(bad_rows)
    if n < size:
        return np.empty(0, np.int64)
    bad_before = np.concatenate(([0], np.cumsum(bad_rows)))
    starts = np.arange(0, n - size + 1, stride)
    ok = bad_before[starts + size] == bad_before[starts]
    if breaks is not None:
        # breaks at rows start+1 .. start+size-1 split the window; one at `start` does not.
        breaks_before = np.concatenate(([0], np.cumsum(breaks)))
        ok &= breaks_before[starts + size] == breaks_before[starts + 1]
    return starts[ok]


@dataclass(frozen=True)
class Split:
    train: WindowSet
    val: WindowSet
    normalization: Normalization


def split(values: np.ndarray, starts: np.ndarray, size: int, validation_fraction: float) -> Split:
    """The newest `validation_fraction` of windows validate; the rest train.

    Training windows that overlap the first validation window are left out, so no
    validation row is ever seen in training; the normalization is fitted on the rows
    of training windows only.
    """
    if len(starts) < 2:
        raise DataError(f"too few valid windows to train on ({len(starts)} in all)")
    n_val = max(1, round(len(starts) * validation_fraction))
    val_starts = starts[-n_val:]
    train_starts = starts[:-n_val]
    train_starts = train_starts[train_starts + size <= val_starts[0]]
    if len(train_starts) == 0:
        raise DataError(f"too few valid windows to train on ({len(starts)} in all)")
    edges = np.zeros(len(values) + 1, np.int64)
    np.add.at(edges, train_starts, 1)
    np.add.at(edges, train_starts + size, -1)
    covered = np.cumsum(edges[:-1]) > 0  # rows inside at least one training window
    norm = Normalization.fit(values[covered])
    z = norm.apply(np.nan_to_num(values))  # bad rows are in no window; zero them to stay finite
    return Split(WindowSet(z, train_starts, size), WindowSet(z, val_starts, size), norm)
