"""Scoring readings with a saved model: window scores, which channels drove them, alarms.

Needs only numpy, onnxruntime and a version's `metadata.json` — what any consumer of a
model has — so the evaluation of a new version, the detection benchmark and the README's
recipe all decide the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from .common.modelmeta import LevelMeta, ModelMeta, SustainedMeta
from .data.windows import Normalization, WindowSet, check_time, holding, valid_starts


@dataclass(frozen=True)
class AlarmRule:
    """Alarm while at least `above` of the last `of` windows score above the threshold.

    One window over the threshold is often a spike or a sensor glitch; an anomaly lasts.
    """

    above: int
    of: int

    def apply(self, over: np.ndarray) -> np.ndarray:
        """Per window (in scoring order): does the rule fire at this window? `over` may
        also be (windows, channels): then per window and channel."""
        counts = np.cumsum(over, axis=0, dtype=np.int64)
        counts[self.of :] -= counts[: -self.of].copy()
        return counts >= self.above

    def to_meta(self) -> dict:
        return {"kind": "k-of-n", "above": self.above, "of": self.of}


@dataclass(frozen=True)
class SustainedRule:
    """Also alarm while one channel's error, in its normal error's units (channel-max's
    `channel_scale` is 1), is above `level` on `above` of the last `of` windows.

    A small shift that lasts (a valve that no longer closes, a slow leak, a fault the
    plant's controllers compensate) keeps one channel's error a little high, under the
    threshold of one window, which is set for the worst of all channels. Counting per
    channel, the scattered normal windows of many channels never add up. Chosen on the
    real plants in bench/detect.py: on the Tennessee Eastman plant 91 % of the faulty
    rows detected instead of 86 %, at 1.2 % of the normal rows; SKAB's balanced accuracy
    up from 0.795 to 0.812."""

    above: int
    of: int
    level: float

    def apply(self, high: np.ndarray) -> np.ndarray:
        """Per window: does the rule fire, from `high` (windows x channels: the channel's
        error, in the score's units, above `level`)."""
        return AlarmRule(self.above, self.of).apply(high).any(axis=1)

    def to_meta(self) -> dict:
        return {"above": self.above, "of": self.of, "level": self.level}

    @classmethod
    def from_meta(cls, meta: SustainedMeta | None) -> SustainedRule | None:
        """metadata.json's `alarm.sustained`; None where it is absent."""
        return None if meta is None else cls(meta.above, meta.of, meta.level)


def fires(
    rule: AlarmRule, sustained: SustainedRule | None, over: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Per window (in scoring order): does the alarm rule fire on the windows `over` the
    threshold, or the sustained rule on their channels `high` (above its level)? Model,
    decide() and the benchmark's studies all decide by this."""
    alarm = rule.apply(over)
    if sustained is not None:
        alarm |= sustained.apply(high)
    return alarm


# A channel's level moves within its training rows too: the level rule's limit is
# `model.level_limit` times this quantile of those moves, in normalized units, and never
# below the floor, so that a channel constant in training does not alarm on its last bit.
LEVEL_QUANTILE = 0.99
LEVEL_FLOOR = 1e-3


def level_sums(z: np.ndarray) -> np.ndarray:
    """(rows + 1, channels): the running sums of `z` from a zero row, in float64; the
    README's recipe computes them with the same expression, so both decide alike."""
    return np.cumsum(np.r_[np.zeros((1, z.shape[1])), z], axis=0, dtype="float64")


@dataclass(frozen=True)
class LevelRule:
    """A window also counts as over the threshold when its mean in one channel has moved
    away from normal: by more than the channel's `limit` (normalized units) from its mean
    over the `baseline` rows that end `gap` rows before the window, and farther from the
    training rows' mean.

    The network reconstructs a channel's level within its window (to follow a channel's
    slow normal wander, it must), so a step or a slow leak that lasts in one channel of
    a few goes mostly unseen by the window's error. A channel coming back towards normal
    (a fault ending) is not an alarm, nor is a drift that moves less within `gap` rows
    than the training rows' moves did. Chosen on the real plants in bench/detect.py:
    more of the Tennessee Eastman plant's faulty rows, SKAB's balanced accuracy up, and
    most of the lasting faults in one channel of four that the windows missed."""

    gap: int
    baseline: int
    limit: np.ndarray  # per channel, in normalized units

    def span(self, window_size: int) -> int:
        """Rows a decision spans: the baseline, the gap and the window."""
        return self.baseline + self.gap + window_size

    def moves(
        self, sums: np.ndarray, spans: np.ndarray, window_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(now, before), (spans, channels): the mean of the window that ends each span
        (starting at `spans`, rows of level_sums) and of the baseline rows that start it."""
        end = spans + self.span(window_size)
        now = (sums[end] - sums[end - window_size]) / window_size
        before = (sums[spans + self.baseline] - sums[spans]) / self.baseline
        return now, before

    def moved(self, sums: np.ndarray, spans: np.ndarray, window_size: int) -> np.ndarray:
        """Per span (starting at `spans`): has a channel moved away from normal?"""
        now, before = self.moves(sums, spans, window_size)
        return ((np.abs(now - before) > self.limit) & (np.abs(now) > np.abs(before))).any(axis=1)

    def to_meta(self) -> dict[str, Any]:
        return {
            "gap": self.gap,
            "baseline": self.baseline,
            "limit": [float(v) for v in self.limit],
        }

    @classmethod
    def from_meta(cls, meta: LevelMeta | None) -> LevelRule | None:
        """metadata.json's `alarm.level`; None where it is absent."""
        if meta is None:
            return None
        return cls(meta.gap, meta.baseline, np.array(meta.limit, np.float64))

    @classmethod
    def fit(
        cls,
        z: np.ndarray,
        spans: np.ndarray,
        window_size: int,
        gap: int,
        baseline: int,
        factor: float,
    ) -> LevelRule | None:
        """The rule of a new model from its training and validation rows `z` (normalized),
        over the spans starting at `spans` that hold no missing row and no time gap: each
        channel's limit is `factor` times LEVEL_QUANTILE of its moves there. None without
        such a span: the rows are too short or too broken to tell a move from normal."""
        if not len(spans):
            return None
        rule = cls(gap, baseline, np.zeros(z.shape[1]))
        # Every `step`-th span, at most 2**16: their quantile is as good as all of theirs.
        now, before = rule.moves(level_sums(z), spans[:: -(-len(spans) // (1 << 16))], window_size)
        limit = factor * np.quantile(np.abs(now - before), LEVEL_QUANTILE, axis=0)
        return cls(gap, baseline, np.maximum(limit, LEVEL_FLOOR))


class ScoreKind(str, Enum):
    """How a window's per-channel errors become its score (metadata.json `score`)."""

    # The mean squared error over all the window's elements: models saved before
    # channel-max, which keep scoring as they did. A fault in one channel of c is divided
    # by c, so on the Tennessee Eastman files it missed most of six faults.
    MSE = "mse"
    # Each channel's error over its own normal spread (`channel_scale`), the largest of
    # them: a fault that moves one channel of many scores as if it were alone.
    CHANNEL_MAX = "channel-max"


# The channel's error on its validation windows that it is measured against: a high
# quantile of it, so that one noisy channel is not an alarm on its own.
SCALE_QUANTILE = 0.99
# Squared errors in normalized units below this are one value: a channel that is constant
# in training still gets a finite ratio.
SCALE_FLOOR = 1e-6
# The score of a window that holds a reading beyond what the model can take (windows.py
# MAX_READING and MAX_Z), or whose score came out NaN or infinite: float32's largest. It
# is over every threshold, so such a window is an alarm and never a blind spot, and it is
# finite, so every JSON that carries it is JSON and a consumer's `score > threshold`
# holds. Scores of readings in range stay many orders of magnitude below it (MAX_Z).
BEYOND_SCORE = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class WindowScore:
    """A model's window score: its kind and, for channel-max, each channel's scale."""

    kind: ScoreKind
    channel_scale: np.ndarray | None = None

    def apply(self, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each channel's error in the score's units, each window's score) of
        `errors` (windows x channels, the channels' mean squared errors)."""
        if self.kind is ScoreKind.MSE:
            return errors, errors.mean(axis=1)
        scaled = (errors / self.channel_scale).astype(np.float32)
        return scaled, scaled.max(axis=1)

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"score": self.kind.value}
        if self.channel_scale is not None:
            meta["channel_scale"] = [float(v) for v in self.channel_scale]
        return meta

    @classmethod
    def of(cls, meta: ModelMeta) -> WindowScore:
        kind = ScoreKind(meta.score_kind)
        if kind is ScoreKind.MSE:
            return cls(kind)
        return cls(kind, np.array(meta.channel_scale, np.float32))

    @classmethod
    def fit(
        cls,
        kind: ScoreKind,
        train_mean: np.ndarray,
        train_high: np.ndarray,
        val_errors: np.ndarray,
    ) -> WindowScore:
        """The score of a new model from its channels' mean error and SCALE_QUANTILE of
        their errors on the training windows, and their errors on the validation windows.

        A channel's normal error is the higher of the two quantiles: validation windows
        (the newest rows, held out) that happen to be quiet, a night shift at low load,
        would otherwise make every busier hour an alarm. A channel whose validation windows
        reconstruct worse than its training windows is drifting or was not learned from
        the few rows there were: its scale grows by that ratio, so the drift already under
        way is not an alarm by the time it has gone as far again. Chosen on the real
        benchmarks (bench/detect.py): on SKAB's short runs the slowly warming temperature
        channels otherwise alarmed on about half of the normal rows."""
        if kind is ScoreKind.MSE:
            return cls(kind)
        growth = np.maximum(val_errors.mean(axis=0) / np.maximum(train_mean, SCALE_FLOOR), 1.0)
        high = np.maximum(np.quantile(val_errors, SCALE_QUANTILE, axis=0), train_high)
        return cls(kind, np.maximum(high * growth, SCALE_FLOOR).astype(np.float32))


def open_session(model_path: Path, threads: int = 1):
    """A plain CPU InferenceSession, as a consumer would create it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        str(model_path), options, providers=["CPUExecutionProvider"]
    )


def channel_errors(session, windows: WindowSet, n_channels: int) -> np.ndarray:
    """(windows, channels): each channel's mean squared reconstruction error in a window,
    which a model's WindowScore turns into the window's score."""
    parts = []
    for x in windows.batches():
        err = (session.run(None, {"input": x})[0] - x) ** 2
        parts.append(err.reshape(len(x), -1, n_channels).mean(axis=1))
    return np.concatenate(parts) if parts else np.empty((0, n_channels), np.float32)


def shares(errors: np.ndarray) -> np.ndarray:
    """Per-channel share (summing to 1) of each window's reconstruction error; summed in
    float64, where two channels at BEYOND_SCORE do not overflow."""
    errors = np.asarray(errors, np.float64)
    total = errors.sum(axis=1, keepdims=True)
    return np.divide(errors, total, out=np.zeros_like(errors), where=total > 0)


@dataclass(frozen=True)
class Scored:
    """Windows scored in row order; `end` is the row index of each window's last row."""

    end: np.ndarray
    errors: np.ndarray  # (windows, channels), in the score's units (WindowScore.apply)
    score: np.ndarray
    over: np.ndarray  # score above the threshold
    moved: np.ndarray  # the level rule: a channel's level moved away from normal
    alarm: np.ndarray  # the alarm rule fires

    def row_alarm(self, n_rows: int) -> np.ndarray:
        """Per row: is the alarm on at the window ending there (False where none ends)."""
        rows = np.zeros(n_rows, bool)
        rows[self.end] = self.alarm
        return rows


class Model:
    """A saved version as a consumer uses it: model.onnx and its metadata.json (`of`), or
    a new version's parts before its metadata.json exists (the job's challenger)."""

    def __init__(
        self,
        directory: Path,
        *,
        channels: list[str],
        window_size: int,
        threshold: float,
        window_score: WindowScore,
        rule: AlarmRule,
        sustained: SustainedRule | None,
        level: LevelRule | None,
        max_gap: float | None,
        normalization: Normalization,
        threads: int = 1,
    ):
        self.channels = channels
        self.window_size = window_size
        self.threshold = threshold
        self.window_score = window_score
        self.rule = rule
        self.sustained = sustained
        self.level = level
        self.max_gap = max_gap
        self.normalization = normalization
        self.session = open_session(directory / "model.onnx", threads)

    @classmethod
    def of(cls, directory: Path, meta: ModelMeta, threads: int = 1) -> Model:
        """The version in `directory`, whose metadata.json is `meta` (ModelStore.metadata)."""
        return cls(
            directory,
            channels=meta.channels,
            window_size=meta.window_size,
            threshold=meta.threshold,
            window_score=WindowScore.of(meta),
            rule=AlarmRule(meta.alarm.above, meta.alarm.of),
            sustained=SustainedRule.from_meta(meta.alarm.sustained),
            level=LevelRule.from_meta(meta.alarm.level),
            max_gap=meta.time.max_gap_s,
            normalization=Normalization.of(meta.normalization),
            threads=threads,
        )

    @property
    def look_back(self) -> int:
        """Windows a decision looks back on, its own included: the longer rule's."""
        return max(self.rule.of, self.sustained.of if self.sustained else 1)

    @property
    def span(self) -> int:
        """Rows one window's decision reads: its own, and the level rule's before them."""
        return self.window_size if self.level is None else self.level.span(self.window_size)

    def high(self, errors: np.ndarray) -> np.ndarray:
        """(windows, channels): is the channel's error above the sustained rule's level?
        No columns for a model without that rule."""
        if self.sustained is None:
            return np.zeros((len(errors), 0), bool)
        return errors > self.sustained.level

    def score(self, values: np.ndarray, time: np.ndarray) -> Scored:
        """Scores every window of `values` (rows x channels, oldest first) that has no
        missing value and spans no time gap, with the model's threshold and alarm rule.

        A window holding a reading beyond what the model can take (Normalization.beyond),
        or whose score is NaN or infinite, scores BEYOND_SCORE and is over the threshold;
        its error goes to the channels holding such readings, or whose error is not
        finite."""
        missing = ~np.isfinite(values).all(axis=1)
        breaks, _ = check_time(time, self.max_gap)
        w = self.window_size
        starts = valid_starts(missing, w, 1, breaks)
        # Readings beyond the model's range go in as zeros, so that the network sees only
        # values it can take; the channels holding them are scored below.
        z = self.normalization.apply(values, missing=0.0)
        windows = WindowSet(z, starts, w)
        errors, score = self.window_score.apply(
            channel_errors(self.session, windows, len(self.channels))
        )
        cap = np.float32(BEYOND_SCORE)
        errors = np.where(np.isfinite(errors), errors, cap)
        capped = ~np.isfinite(score)
        beyond = self.normalization.beyond(values)
        if beyond.any():
            held = np.column_stack(
                [holding(beyond[:, c], starts, w) for c in range(beyond.shape[1])]
            )
            errors = np.where(held, cap, errors)
            capped |= held.any(axis=1)
        score = np.where(capped, cap, score)
        over = capped | (score > self.threshold)
        moved = self._moved(z, starts, missing | beyond.any(axis=1), breaks)
        alarm = fires(self.rule, self.sustained, over | moved, self.high(errors))
        return Scored(starts + w - 1, errors, score, over, moved, alarm)

    def _moved(
        self, z: np.ndarray, starts: np.ndarray, bad: np.ndarray, breaks: np.ndarray
    ) -> np.ndarray:
        """Per window at `starts`: does the level rule fire? Not where the rows before it
        that the rule reads are missing, beyond the model or across a time gap."""
        moved = np.zeros(len(starts), bool)
        if self.level is None:
            return moved
        spans = starts - (self.span - self.window_size)
        clean = np.zeros(len(z), bool)
        clean[valid_starts(bad, self.span, 1, breaks)] = True
        ok = spans >= 0
        ok[ok] = clean[spans[ok]]
        moved[ok] = self.level.moved(level_sums(z), spans[ok], self.window_size)
        return moved


def in_ranges(order: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per row: is its order value inside one of the inclusive (first, last) ranges?"""
    if not len(ranges):
        return np.zeros(len(order), bool)
    # Merged into disjoint sorted ranges, each row finds its candidate by bisection.
    firsts, lasts = [], []
    for first, last in sorted(ranges):
        if firsts and first <= lasts[-1]:
            lasts[-1] = max(lasts[-1], last)
        else:
            firsts.append(first)
            lasts.append(last)
    i = np.searchsorted(np.array(firsts), order, "right") - 1
    return (i >= 0) & (order <= np.array(lasts)[np.maximum(i, 0)])


@dataclass(frozen=True)
class LookBack:
    """What the alarm decisions of the next windows look back on, from the windows before."""

    # The last `alarm.of - 1` windows: over the threshold, or moved (the level rule)?
    over: list[bool] = field(default_factory=list)
    # The last `sustained.of - 1` windows: their channels above the sustained rule's level.
    high: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, model: Model, over: np.ndarray, high: np.ndarray) -> LookBack:
        """The look-back after windows `over` the threshold (or moved) with channels
        `high`."""
        keep_over = model.rule.of - 1
        keep_high = model.sustained.of - 1 if model.sustained is not None else 0
        return cls(
            over[len(over) - keep_over :].tolist() if keep_over else [],
            [np.flatnonzero(h).tolist() for h in high[len(high) - keep_high :]]
            if keep_high
            else [],
        )

    def high_array(self, n_channels: int) -> np.ndarray:
        """`high` as Model.high gives it; a channel index beyond `n_channels` (a model with
        fewer channels swapped in) is dropped."""
        out = np.zeros((len(self.high), n_channels), bool)
        for row, channels in zip(out, self.high, strict=True):
            row[[c for c in channels if c < n_channels]] = True
        return out


@dataclass(frozen=True)
class Decided:
    """The windows ending past `after`, decided in row order (`smocsd score`, live scoring
    and the cycle's screening of new rows share this)."""

    ends: np.ndarray  # row index of each window's last row
    errors: np.ndarray  # (windows, channels), in the score's units
    score: np.ndarray
    over: np.ndarray  # above the threshold, and in no excluded period
    alarm: np.ndarray  # the alarm rule (over or moved) or the sustained rule fires
    recent: LookBack  # to carry into the next call


def decide(
    model: Model,
    values: np.ndarray,
    time: np.ndarray,
    order: np.ndarray,
    after: int | None,
    recent: LookBack | None,
    excluded: Sequence[tuple[int, int]] = (),
) -> Decided:
    """Decides the windows of the rows that end past order `after`.

    `recent` holds what the rules look back on from the windows before them; None takes
    it from the windows ending at or before `after` (a range read with its context). A
    window that touches an excluded period (the operator's `smocsd exclude`: maintenance,
    calibration) is neither over the threshold nor above the sustained level, so it never
    raises an alarm.
    """
    scored = model.score(values, time)
    new = np.ones(len(scored.end), bool) if after is None else order[scored.end] > after
    over, moved, high = scored.over, scored.moved, model.high(scored.errors)
    if excluded:
        w, touched = model.window_size, in_ranges(order, excluded)
        allowed = ~holding(touched, scored.end - w + 1, w)
        over, high = over & allowed, high & allowed[:, None]
        # A level compared with one in an excluded period (a recalibration) is no alarm.
        moved = moved & ~holding(touched, scored.end - model.span + 1, model.span)
    rule_over = over | moved
    if recent is None:
        recent = LookBack.of(model, rule_over[~new], high[~new])
    # The two look-backs aligned: the shorter one led by windows on which nothing fired.
    before, n_channels = max(len(recent.over), len(recent.high)), high.shape[1]
    rule_over = np.concatenate(
        [np.zeros(before - len(recent.over), bool), np.array(recent.over, bool), rule_over[new]]
    )
    high = np.concatenate(
        [
            np.zeros((before - len(recent.high), n_channels), bool),
            recent.high_array(n_channels),
            high[new],
        ]
    )
    return Decided(
        ends=scored.end[new],
        errors=scored.errors[new],
        score=scored.score[new],
        over=over[new],
        alarm=fires(model.rule, model.sustained, rule_over, high)[before:],
        recent=LookBack.of(model, rule_over, high),
    )
