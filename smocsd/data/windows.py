"""Sliding windows over readings: quality checks, the train/validation split, normalization.

Windows are never materialized as a whole (200 000 rows x 10 x 3 would be 24 MB of
float32, ten times the rows they are cut from): a window is a start row in one float32
matrix of normalized rows, and `WindowSet.batch` copies out a batch of windows when the
trainer asks for it. Nothing here holds a second full-size copy of the rows: the
normalization is fitted and applied a block of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from ..common.modelmeta import NormalizationMeta


class DataError(Exception):
    """The readings cannot be trained on (a channel without any valid value, too few windows)."""


# Rows per block when fitting or applying a normalization: float64 temporaries of a few MB
# instead of copies of all rows.
BLOCK_ROWS = 1 << 16


def _blocks(n: int) -> range:
    return range(0, n, BLOCK_ROWS)


# A reading of larger magnitude is beyond what a model can take, like a missing value in
# training and an alarm in scoring. The fit's float64 sums of squared deviations, at most
# (2e30)^2 a row, stay finite for any number of rows (1e308 alone overflows them), and
# well below it lie every real unit's readings; at and above it, the sentinels that
# instruments write for "overflow" or "no value" (SCPI's 9.9e37, float32's 3.4e38).
MAX_READING = 1e30
# A normalized value of larger magnitude is beyond what the float32 network can take.
# float32 ends at 3.4e38: a squared error of about z^2 = 1e18 (the output is of the
# input's order, as a trained autoencoder's is), summed over the ~1e7 elements of a
# training batch's loss or divided by a channel_scale as small as scoring's SCALE_FLOOR
# (1e-6), stays below 1e25, leaving the network's own gain 13 orders of magnitude. A
# training row is at most sqrt(rows) standard deviations from the mean its own fit gave,
# so it is rows the fit did not see (validation rows, new readings) that get there, or
# those of a near-constant channel given scale 1; split() checks every row all the same.
MAX_Z = 1e9


def readings_beyond(values: np.ndarray) -> np.ndarray:
    """Per value: finite, but of larger magnitude than MAX_READING (NaN and inf are
    missing values, not this), a block of rows at a time."""
    out = np.empty(values.shape, bool)
    for lo in _blocks(len(values)):
        block = np.abs(values[lo : lo + BLOCK_ROWS])
        out[lo : lo + BLOCK_ROWS] = (block > MAX_READING) & (block < np.inf)
    return out


@dataclass(frozen=True)
class Normalization:
    """Per-channel z-score: (x - mean) / scale."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray, where: np.ndarray | None = None) -> Normalization:
        """Mean and standard deviation of `rows[where]` (all rows when None), a block at a
        time without copying the selected rows, and equal to numpy's mean(axis=0) and
        std(axis=0) of the copy to the last bit: those add row after row, and so do these,
        carrying the running sum from block to block."""

        def column_sums(transform) -> np.ndarray:
            total = np.zeros((1, rows.shape[1]))
            for lo in _blocks(len(rows)):
                block = rows[lo : lo + BLOCK_ROWS]
                if where is not None:
                    block = block[where[lo : lo + BLOCK_ROWS]]
                total = np.add.reduce(np.concatenate([total, transform(block)]), axis=0)[None]
            return total[0]

        count = len(rows) if where is None else int(np.count_nonzero(where))
        mean = column_sums(lambda block: block) / count
        std = np.sqrt(column_sums(lambda block: np.square(block - mean)) / count)
        # A constant channel carries no information but must not divide by zero.
        scale = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return cls(mean=mean, scale=scale)

    @classmethod
    def of(cls, meta: NormalizationMeta) -> Normalization:
        return cls(np.asarray(meta.mean, np.float64), np.asarray(meta.scale, np.float64))

    def to_meta(self) -> dict:
        return {"kind": "zscore", "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    def apply(self, values: np.ndarray, missing: float | None = None) -> np.ndarray:
        """float32 (values - mean) / scale, computed in float64 a block of rows at a time;
        with `missing`, NaN and infinite values and those beyond what a model can take
        (`beyond`) come out as that instead."""
        out = np.empty(values.shape, np.float32)
        for lo in _blocks(len(values)):
            raw = values[lo : lo + BLOCK_ROWS]
            with np.errstate(over="ignore", invalid="ignore"):
                block = (raw - self.mean) / self.scale
            if missing is not None:
                block[~(np.abs(block) <= MAX_Z) | (np.abs(raw) > MAX_READING)] = missing
            out[lo : lo + BLOCK_ROWS] = block
        return out

    def beyond(self, values: np.ndarray) -> np.ndarray:
        """Per value: finite, but beyond what a model in this normalization can take: of
        larger magnitude than MAX_READING, or more than MAX_Z scales from the mean."""
        out = np.empty(values.shape, bool)
        for lo in _blocks(len(values)):
            raw = values[lo : lo + BLOCK_ROWS]
            with np.errstate(over="ignore", invalid="ignore"):
                z = np.abs((raw - self.mean) / self.scale)
            far = (np.abs(raw) > MAX_READING) | (z > MAX_Z)
            out[lo : lo + BLOCK_ROWS] = far & np.isfinite(raw)
        return out


class WindowSet:
    """Windows of `size` rows starting at `starts` in the normalized row matrix `z`.

    A window flattens time-major (x[t0,c0], x[t0,c1], ..., x[t1,c0], ...), which is exactly
    the row-major layout of z[start:start+size]: so every window of z is one row of a
    strided view of z's buffer (no copy), and a batch is a gather of whole rows of it.
    """

    def __init__(self, z: np.ndarray, starts: np.ndarray, size: int):
        self.z = np.ascontiguousarray(z, dtype=np.float32)
        self.starts = starts
        self.size = size
        channels = self.z.shape[1]
        self.n_features = size * channels
        flat = self.z.reshape(-1)
        if len(flat) >= self.n_features:
            # Row s of `view` is z[s:s+size] flattened: the n_features floats from s*channels.
            self.view = sliding_window_view(flat, self.n_features)[::channels]
        else:  # fewer rows than a window: no window at all
            self.view = np.empty((0, self.n_features), np.float32)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """float32 (len(indices), n_features), C-contiguous: windows starts[indices]."""
        return self.view[self.starts[indices]]

    def batches(self, batch_size: int = 4096):
        for i in range(0, len(self), batch_size):
            yield self.view[self.starts[i : i + batch_size]]


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
    forward = step[step > 0]  # a copy of our own: the median may reorder it in place
    interval = float(np.median(forward, overwrite_input=True)) if len(forward) else np.nan
    del forward
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
    # Running counts (int32: 4 bytes a row) compared through views, one bool per start.
    bad_before = _count_before(bad_rows)
    ok = bad_before[size:] == bad_before[: n - size + 1]
    del bad_before
    if breaks is not None:
        # breaks at rows start+1 .. start+size-1 split the window; one at `start` does not.
        breaks_before = _count_before(breaks)
        ok &= breaks_before[size:] == breaks_before[1 : n - size + 2]
    if stride == 1:
        return np.flatnonzero(ok)
    return np.flatnonzero(ok[::stride]) * stride


def holding(mask: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """Per window of `size` rows at `starts`: does it hold a row marked in `mask`?"""
    before = _count_before(mask)
    return before[starts + size] > before[starts]


def _count_before(mask: np.ndarray) -> np.ndarray:
    """counts[i]: how many of mask[:i] are set (len(mask) + 1 entries)."""
    counts = np.zeros(len(mask) + 1, np.int32 if len(mask) < 2**31 else np.int64)
    np.cumsum(mask, dtype=counts.dtype, out=counts[1:])
    return counts


@dataclass(frozen=True)
class Split:
    train: WindowSet
    val: WindowSet
    normalization: Normalization
    # Rows that were in windows but lie beyond what a model in `normalization` can take
    # (Normalization.beyond): their windows are left out, as those of missing values.
    beyond_rows: int
    beyond_channels: tuple[int, ...]  # the channels holding such a value
    windows: int  # the valid windows left without them, before the split


def split(
    values: np.ndarray,
    starts: np.ndarray,
    size: int,
    validation_fraction: float,
    accepted: np.ndarray | None = None,
) -> Split:
    """The newest `validation_fraction` of windows validate; the rest train.

    Training windows that overlap a validation window are left out, so no validation
    row is ever seen in training; the normalization is fitted on the rows of training
    windows only. `values` is only read: the windows are cut from one float32 normalized
    copy (missing values, in no window, are zeros there).

    `accepted` (per start) marks windows in rows the operator accepted as the new normal:
    those are split the same way among themselves. An accepted change is the newest data,
    and a split by age alone would validate on all of it and train on none, so the next
    model would go on alarming on it.

    A row holding a value beyond what a model in the fitted normalization can take
    (Normalization.beyond: a validation row, which the fit did not see, or a reading
    beyond MAX_READING, which no fit sees) is left out like a missing value: the split is
    made again without its windows, so that the newest windows left validate and the
    normalization is fitted on the training rows left. The trainers never see such a
    value.
    """
    n = len(values)
    # A reading beyond MAX_READING would overflow the fit's sums, whatever `starts` holds.
    fittable = ~readings_beyond(values).any(axis=1)
    far_rows, far_channels = np.zeros(n, bool), np.zeros(values.shape[1], bool)
    while True:  # each round drops at least one window, until _partition finds too few
        train_starts, val_starts = _partition(n, starts, size, validation_fraction, accepted)
        norm = Normalization.fit(values, covered_rows(n, train_starts, size) & fittable)
        beyond = norm.beyond(values)
        far = beyond.any(axis=1) & covered_rows(n, starts, size)
        if not far.any():
            break
        far_rows |= far
        far_channels |= beyond[far].any(axis=0)
        keep = ~holding(far, starts, size)
        starts = starts[keep]
        accepted = None if accepted is None else accepted[keep]
    del beyond, fittable
    z = norm.apply(values, missing=0.0)
    return Split(
        WindowSet(z, train_starts, size),
        WindowSet(z, val_starts, size),
        norm,
        beyond_rows=int(far_rows.sum()),
        beyond_channels=tuple(np.flatnonzero(far_channels).tolist()),
        windows=len(starts),
    )


def _partition(
    n: int,
    starts: np.ndarray,
    size: int,
    validation_fraction: float,
    accepted: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(training starts, validation starts) of split(), for `n` rows."""
    if len(starts) < 2:
        raise DataError(f"too few valid windows to train on ({len(starts)} in all)")
    if accepted is None or accepted.all() or not accepted.any():
        n_val = max(1, round(len(starts) * validation_fraction))
        val_starts = starts[-n_val:]
        # Sorted starts: the training windows end before the first validation window.
        train_starts = starts[: np.searchsorted(starts[:-n_val], val_starts[0] - size, "right")]
    else:
        validate = np.zeros(len(starts), bool)
        for group in (np.flatnonzero(accepted), np.flatnonzero(~accepted)):
            validate[group[-max(1, round(len(group) * validation_fraction)) :]] = True
        val_starts = starts[validate]
        others = starts[~validate]
        train_starts = others[~holding(covered_rows(n, val_starts, size), others, size)]
    if len(train_starts) == 0:
        raise DataError(f"too few valid windows to train on ({len(starts)} in all)")
    return train_starts, val_starts


def covered_rows(n: int, starts: np.ndarray, size: int) -> np.ndarray:
    """Mask of the n rows inside at least one of the windows at (sorted, unique) `starts`."""
    edges = np.zeros(n + 1, np.int32)
    edges[starts] += 1  # unique indices: no np.add.at needed
    edges[size:][starts] -= 1  # at starts + size, without an array of those
    return np.cumsum(edges[:-1], out=edges[:-1]) > 0
