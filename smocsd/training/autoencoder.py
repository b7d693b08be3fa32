"""The built-in job: a dense autoencoder over sliding windows of all channels."""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, modelfile, report
from ..common.config import ModelConfig
from ..common.labels import Kind, Label, LabelError, Labels, for_model
from ..common.modelmeta import METADATA, ModelMeta
from ..common.records import Damage
from ..common.state import utc, utcnow
from ..data.sources import Readings
from ..data.windows import (
    MAX_READING,
    MAX_Z,
    DataError,
    Normalization,
    Split,
    TimeCheck,
    WindowSet,
    check_time,
    readings_beyond,
    split,
    valid_starts,
)
from ..schemas import MODEL_FORMAT
from ..scoring import (
    SCALE_QUANTILE,
    AlarmRule,
    LevelRule,
    Model,
    ScoreKind,
    SustainedRule,
    WindowScore,
    channel_errors,
    in_ranges,
    open_session,
    shares,
)
from ..store import Champion, CurrentMoved, ModelStore
from . import gate, threshold
from .job import Saved, TrainingJob
from .screen import JOIN_WINDOWS, runs
from .trainers import Trainer, TrainSpec, make_trainer, onnxruntime_version, resolve_backend


class _EpochLog:
    """The job's progress, passed on to the trainer, keeping each epoch's losses on the way
    for metadata.json's `history` (non-finite losses as None: the JSON has no NaN)."""

    def __init__(self, progress: Any):
        self.progress = progress
        self.train_loss: list[float | None] = []
        self.val_loss: list[float | None] = []

    def between_batches(self) -> None:
        self.progress.between_batches()

    def on_epoch(self, epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
        for losses, value in ((self.train_loss, train_loss), (self.val_loss, val_loss)):
            losses.append(float(value) if math.isfinite(value) else None)
        self.progress.on_epoch(epoch, epochs, train_loss, val_loss)

    def to_meta(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss}


def _file_entry(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


@dataclass
class TrainingData:
    """What a cycle keeps of the rows it read: the windows (one float32 matrix of normalized
    rows), the raw rows of the validation windows (to score them in the current model's
    normalization) and a summary. The float64 readings go before training starts."""

    split: Split
    windows: int  # valid windows in all, before the train/validation split
    time: TimeCheck
    rows: int  # rows read
    dropped: int  # rows with a missing or non-numeric value
    first_order: int
    last_order: int
    val_rows: np.ndarray  # raw rows val_offset.. covering every validation window
    val_offset: int
    left_out: dict[str, Any]  # LeaveOut.summary of the rows read
    # (values, time) of each run of rows the current model alarmed on, with the rows
    # before it that its first windows and the alarm rule look back on
    alarm_rows: list[tuple[np.ndarray, np.ndarray]]
    level: LevelRule | None  # the level rule fitted on these rows (None: off, or no span)


# Windows scored per channel_errors call when only their scores are kept: its per-channel
# errors (12 bytes a window at 3 channels) then never exist for all windows at once.
SCORE_CHUNK = 1 << 16
# The share of unusable rows above which a cycle warns of them (see get_training_data).
BAD_SHARE = 0.01


def _chunks(session: Any, windows: WindowSet, n_channels: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, channel_errors) of `windows`, SCORE_CHUNK windows at a time."""
    for lo in range(0, len(windows), SCORE_CHUNK):
        part = WindowSet(windows.z, windows.starts[lo : lo + SCORE_CHUNK], windows.size)
        yield lo, channel_errors(session, part, n_channels)


def _rules(m: ModelConfig) -> tuple[AlarmRule, SustainedRule | None]:
    """A new version's alarm rule and sustained rule; no sustained rule with "mse", whose
    window errors are not in units of each channel's normal error, or turned off."""
    sustained = None
    if m.sustained_above and ScoreKind(m.score) is ScoreKind.CHANNEL_MAX:
        sustained = SustainedRule(m.sustained_above, m.sustained_of, m.sustained_level)
    return AlarmRule(m.alarm_above, m.alarm_of), sustained


def _alarm_meta(m: ModelConfig, level: LevelRule | None) -> dict[str, Any]:
    """metadata.json's `alarm`: the alarm rule, and the sustained and level rules where
    there are."""
    rule, sustained = _rules(m)
    return {
        **rule.to_meta(),
        **({"sustained": sustained.to_meta()} if sustained else {}),
        **({"level": level.to_meta()} if level else {}),
    }


def _check_state(job: AutoencoderJob) -> None:
    """Repairs state the world has moved under: a clock set back, a recreated database.

    Both would otherwise block training for good (until the clock catches up, or until
    the new ids pass the old ones); each is logged and the repaired state is saved.
    """
    now = time.time()
    trained_at = job.state.get("trained_at", 0)
    if trained_at > now + gate.CLOCK_SLACK:
        job.logger.warning(
            "state: last training at %s is in the future (clock set back?): counting from now",
            utc(trained_at),
        )
        job.state["trained_at"] = now
    last_order = job.state.get("last_order")
    if last_order is not None:
        newest = job.db_manager.max_order()
        if newest is None or newest < last_order:
            job.logger.warning(
                "order column %r went backwards (newest %s, last trained on %d): the "
                "database was recreated? counting its rows from the start",
                job.config.source.order_column or "rowid",
                newest,
                last_order,
            )
            job.state.pop("last_order")


# A challenger must alarm on at least this share of the windows the current model alarms
# on (rows it was not trained on): below, it has begun to take the fault for normal.
# Not all: the edges of an event sit near either threshold, and two thresholds fitted on
# different rows disagree there.
KEEP_ALARMS = 0.98
# ... counted in the recorded runs of alarmed rows where the current model alarms today on
# a lasting fault: on at least JOIN_WINDOWS windows' worth of windows, and on at least
# this share of the run's windows. A shorter run or a scatter of alarms is as likely the
# champion's own false alarms (a model that learned an accepted change from a few
# thousand rows alarms on 1-5 % of its windows), which no challenger need repeat:
# measured with bench/retrain.py, they kept every challenger from promotion after an
# accept. Their rows stay out of training all the same.
DENSE_ALARMS = 0.1


def _gate(job: AutoencoderJob) -> str | None:
    """Why this tick must not train (None: go ahead)."""
    _check_state(job)
    try:
        # Another model's accept label is no reason for this one to train.
        job.labels = for_model(Labels(job.config.state_dir).read(), job.config.model.name)
    except LabelError:  # fails the cycle in leave_out(), once there is something to train
        job.labels = []
    t = job.config.training
    last_order = job.state.get("last_order")
    if last_order is None:
        return gate.first_training(t, job.db_manager.count_after(None))
    if job.force:
        return None
    accepted = max((x.id for x in job.labels if x.kind is Kind.ACCEPT), default=0)
    if accepted > job.state.get("accept_tried", 0):
        job.logger.debug("an accept label is new: training now, without waiting for the gates")
        job.state["accept_tried"] = accepted
        return None
    return gate.retraining(
        t, lambda: job.db_manager.count_after(last_order), job.state.get("trained_at", 0)
    )


class AutoencoderJob(TrainingJob):
    def build_model(self) -> None:
        t = self.config.training
        resolve_backend(t.backend)  # an unknown or missing backend fails the cycle here
        self._trainer: Trainer | None = None
        self.spec = TrainSpec(
            n_features=t.window_size * len(self.config.source.channels),
            hidden=t.hidden,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            epochs=t.epochs,
            patience=t.patience,
            threads=t.threads,
            seed=t.seed,
            networks=t.networks_for(len(self.config.source.channels)),
        )
        self.store = ModelStore.of(self.config)
        self.version: int | None = None
        self.labels: list[Label] = []  # in force at this cycle's gate
        self.rejection: str | None = None  # why the challenger is not promoted
        self.started_from = Champion(None)  # `current` when training began (train_model)

    @property
    def trainer(self) -> Trainer:
        """The backend's trainer, imported when first used: a tick that finds nothing to
        train loads neither ONNX Runtime's training API nor onnx (a tenth of a second of
        CPU and 25 MB at every check_interval)."""
        if self._trainer is None:
            self._trainer = make_trainer(self.config.training.backend)
        return self._trainer

    def get_training_data(self) -> TrainingData | None:
        t, channels = self.config.training, self.config.source.channels
        reason = _gate(self)
        if reason:
            self.skip_reason = reason
            return None
        readings = self.db_manager.read_newest(t.max_rows)
        bad = readings.bad_rows
        if bad.any():
            # A dropout now and then is a plant's normal, and the cycle's line counts them
            # ("N dropped"); more than BAD_SHARE is a failing sensor or ingest, a warning.
            self.logger.log(
                logging.WARNING if bad.mean() > BAD_SHARE else logging.DEBUG,
                "%d of %d rows have NULL, NaN, inf or non-numeric values and are left out",
                bad.sum(),
                len(bad),
            )
        beyond = readings_beyond(readings.values)
        if beyond.any():
            far = beyond.any(axis=1)
            self.logger.warning(
                "%d of %d rows have a reading beyond ±%g in %s (first at order value %d) and "
                "are left out like missing values",
                far.sum(),
                len(far),
                MAX_READING,
                ", ".join(c for c, b in zip(channels, beyond.any(axis=0), strict=True) if b),
                readings.order[np.argmax(far)],
            )
            bad = bad | far
        has_value = (np.isfinite(readings.values) & ~beyond).any(axis=0)
        del beyond
        empty = [c for c, ok in zip(channels, has_value, strict=True) if not ok]
        if empty and len(bad):
            raise DataError(f"channel(s) {', '.join(empty)} have no valid value in the rows read")
        leave_out = self.leave_out()
        left = leave_out.mask(readings.order)
        good = len(bad) - int(bad.sum())
        trainable = int((~bad & ~left).sum())
        if trainable < t.min_training_samples:
            self.skip_reason = (
                f"{trainable} trainable rows of {t.min_training_samples} needed "
                f"({bad.sum()} rows dropped, {int((left & ~bad).sum())} left out: the current "
                "model alarmed on them or they are excluded; `smocsd accept` if they are "
                "the new normal)"
                if left.any()
                else f"{good} valid rows of {t.min_training_samples} needed "
                f"({bad.sum()} rows dropped)"
            )
            return None
        if left.any():  # the cycle's line says how many
            self.logger.debug(
                "%d rows left out: the current model alarmed on them, or they are excluded",
                int(left.sum()),
            )
        breaks, time_check = check_time(readings.time, t.max_gap)
        self._report_time(readings, time_check)
        starts = valid_starts(bad | left, t.window_size, t.stride, breaks)
        m = self.config.model
        span = m.level_baseline + m.level_gap + t.window_size  # LevelRule.span
        spans = valid_starts(bad | left, span, 1, breaks) if m.level_limit else None
        del breaks
        try:
            accepted = in_ranges(readings.order[starts], leave_out.accepted)
            sp = split(readings.values, starts, t.window_size, t.validation_fraction, accepted)
        except DataError as exc:
            # NULLs, gaps or time disorder every few rows leave no complete window: more
            # rows will not help until they stop, so say so instead of training on nothing.
            self.skip_reason = (
                f"{exc}: {good} valid rows, but missing values, gaps or disordered times "
                f"break them into runs shorter than window_size ({t.window_size})"
            )
            return None
        if sp.beyond_rows:
            self.logger.warning(
                "%d rows have a reading in %s more than %g standard deviations from the "
                "training rows' mean, beyond what a model can take: left out like missing "
                "values",
                sp.beyond_rows,
                ", ".join(channels[c] for c in sp.beyond_channels),
                MAX_Z,
            )
        level = None
        if spans is not None:
            level = LevelRule.fit(
                sp.train.z, spans, t.window_size, m.level_gap, m.level_baseline, m.level_limit
            )
            if level is None:
                self.logger.warning(
                    "no run of %d rows without a missing value or a time gap: this version "
                    "has no level rule",
                    span,
                )
        first, end = int(sp.val.starts[0]), int(sp.val.starts[-1]) + t.window_size
        data = TrainingData(
            split=sp,
            windows=sp.windows,
            time=time_check,
            rows=len(bad),
            dropped=int(bad.sum()) + sp.beyond_rows,
            first_order=int(readings.order[0]),
            last_order=int(readings.order[-1]),
            val_rows=readings.values[first:end].copy(),
            val_offset=first,
            left_out=leave_out.summary(readings.order),
            alarm_rows=self._alarm_rows(readings, leave_out.alarms(readings.order)),
            level=level,
        )
        self.logger.debug(  # the cycle's line says it too, from metadata.json's `data`
            "read %d rows (%d dropped): %d training and %d validation windows",
            data.rows,
            data.dropped,
            len(data.split.train),
            len(data.split.val),
        )
        return data

    def _alarm_rows(
        self, readings: Readings, alarmed: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The rows of each run the current model alarmed on, for the check that a
        challenger still alarms there, each with the rows its windows look back on."""
        m = self.config.model
        back = self.config.training.window_size - 1 + max(m.alarm_of, m.sustained_of) - 1
        if m.level_limit:
            back += m.level_baseline + m.level_gap
        return [
            (
                readings.values[max(0, a - back) : b + 1].copy(),
                readings.time[max(0, a - back) : b + 1].copy(),
            )
            for a, b in runs(alarmed)
        ]

    def _report_time(self, readings: Readings, check: TimeCheck) -> None:
        """Says, once per cycle, where the time column keeps rows out of windows."""
        column = self.config.source.time_column
        if check.no_time == len(readings.time):
            self.logger.warning(
                "time column %r has no usable value: windows follow the order column only",
                column,
            )
            return
        if check.first_disorder is not None:
            first = int(readings.order[check.first_disorder])
            self.logger.warning(
                "time column %r goes backwards %d times and repeats %d times (first at order "
                "value %d): no window spans those rows",
                column,
                check.backwards,
                check.duplicates,
                first,
            )
        if check.no_time:
            self.logger.warning(
                "%d rows have no usable %r value: no window spans them", check.no_time, column
            )
        if check.gaps:  # a plant's pauses, at every cycle: metadata.json's time.gaps counts them
            self.logger.debug(
                "%d gaps longer than %.3gs (sampling every %.3gs): no window spans them",
                check.gaps,
                check.max_gap,
                check.interval,
            )

    def train_model(self, data: TrainingData) -> dict:
        self.data = data
        self.version, self.staging = self.store.allocate()
        self.progress.label = f"training v{self.version}"
        current = self.champion = self._check_champion()
        self.epochs = _EpochLog(self.progress)
        try:
            fit = self.trainer.fit(
                self.spec,
                data.split.train,
                data.split.val,
                self.staging,
                self.epochs,
                warm_start=self.store.path(current) if current else None,
            )
        except BaseException:
            self.store.discard(self.staging)
            raise
        return {
            "train_loss": fit.train_loss,
            "val_loss": fit.val_loss,
            "epochs_run": fit.epochs_run,
            "duration_s": round(fit.duration_s, 3),
            "warm_started": fit.warm_started,
        }

    def eval_model(self) -> dict:
        try:
            return self._evaluate()
        except BaseException:
            self.store.discard(self.staging)
            raise

    def _evaluate(self) -> dict:
        sp, threads = self.data.split, self.config.training.threads
        channels = len(self.config.source.channels)
        session = open_session(self.staging / "model.onnx", threads)
        val_errors = channel_errors(session, sp.val, channels)  # per channel: channel_error
        self.val_loss = float(val_errors.mean())
        kind = ScoreKind(self.config.model.score)
        train_mean, train_high = np.zeros(channels), np.zeros(channels)
        if kind is ScoreKind.CHANNEL_MAX and len(sp.train):  # the scale needs their errors
            # Every `step`-th window's errors, at most SCORE_CHUNK windows: their quantile
            # is as good as all of theirs, in a bounded memory.
            step, kept = -(-len(sp.train) // SCORE_CHUNK), []
            for lo, errors in _chunks(session, sp.train, channels):
                train_mean += errors.sum(axis=0)
                kept.append(errors[(-lo) % step :: step])
            train_mean /= len(sp.train)
            train_high = np.quantile(np.concatenate(kept), SCALE_QUANTILE, axis=0)
        self.window_score = WindowScore.fit(kind, train_mean, train_high, val_errors)
        # Every window's score in one array, training windows first.
        all_scores = np.empty(len(sp.train) + len(sp.val), np.float32)
        for lo, errors in _chunks(session, sp.train, channels):
            all_scores[lo : lo + len(errors)] = self.window_score.apply(errors)[1]
        train_scores = all_scores[: len(sp.train)]
        scores = all_scores[len(sp.train) :]
        scores[:] = self.window_score.apply(val_errors)[1]
        t, m = self.config.training, self.config.model
        # Training and validation windows together: more evidence for the tail, and the
        # validation windows (the newest) carry whatever drift there already is.
        self.threshold_fit = threshold.fit(all_scores, t.window_size, t.stride, m.false_alarm_rate)
        self.score_quantiles = {
            "validation": threshold.quantiles(scores),
            "training": threshold.quantiles(train_scores),
        }
        channel_mse = val_errors.mean(axis=0)
        self.channel_error = {
            name: {"val_mse": float(mse), "share": float(share)}
            for name, mse, share in zip(
                self.config.source.channels,
                channel_mse,
                shares(channel_mse[None, :])[0],
                strict=True,
            )
        }
        previous = self._score_current(sp.val, threads)
        champion_alarms, kept = self._kept_alarms(threads) if previous else (0, None)
        self.rejection = self._rejection(previous, champion_alarms, kept)
        return {
            "val_score_p50": self.score_quantiles["validation"]["p50"],
            "val_score_p99": self.score_quantiles["validation"]["p99"],
            "threshold": self.threshold_fit.threshold,
            "val_loss": self.val_loss,
            "val_windows_over_threshold": float((scores > self.threshold_fit.threshold).mean()),
            "previous_version": previous[0] if previous else None,
            "previous_val_loss": previous[1] if previous else None,
            "champion_problem": self.champion_problem,
            "left_out_rows": self.data.left_out["rows"],
            "champion_alarm_windows": champion_alarms,
            "alarm_windows_kept": kept,
            "rejection": self.rejection,
        }

    def _kept_alarms(self, threads: int) -> tuple[int, float | None]:
        """(windows the current model alarms on among the rows it alarmed on before, the
        share of them the challenger alarms on too); both score as a consumer does."""
        if not self.data.alarm_rows or self.champion is None:
            return 0, None
        champion = Model.of(
            self.store.path(self.champion), self.store.metadata(self.champion), threads
        )
        challenger = self._challenger(threads)
        lasting = JOIN_WINDOWS * self.config.training.window_size
        alarmed = kept = 0
        for values, time_ in self.data.alarm_rows:
            before = champion.score(values, time_).row_alarm(len(values))
            if before.sum() < max(DENSE_ALARMS * len(values), lasting):
                continue  # not a lasting fault the champion sees now: see DENSE_ALARMS
            after = challenger.score(values, time_).row_alarm(len(values))
            alarmed += int(before.sum())
            kept += int((before & after).sum())
        return alarmed, (kept / alarmed if alarmed else None)

    def _rejection(
        self, previous: tuple[int, float] | None, alarms: int, kept: float | None
    ) -> str | None:
        """Why the challenger must not become current (None: it may)."""
        if previous is None:
            return None
        version, previous_loss = previous
        if kept is not None and kept < KEEP_ALARMS:
            return (
                f"alarms on {kept:.1%} of the {alarms} windows v{version} alarmed on "
                f"(rows it was not trained on), {KEEP_ALARMS:.0%} needed: it would learn "
                "the fault as normal"
            )
        if self.config.model.promote == "if-better" and self.val_loss > previous_loss:
            return f"val_loss {self.val_loss:.4g} is worse than v{version}'s {previous_loss:.4g}"
        return None

    def _challenger(self, threads: int) -> Model:
        """The new version as scoring.Model scores it, before its metadata.json exists."""
        cfg = self.config
        rule, sustained = _rules(cfg.model)
        return Model(
            self.staging,
            channels=list(cfg.source.channels),
            window_size=cfg.training.window_size,
            threshold=self.threshold_fit.threshold,
            window_score=self.window_score,
            rule=rule,
            sustained=sustained,
            level=self.data.level,
            max_gap=None if math.isnan(self.data.time.max_gap) else self.data.time.max_gap,
            normalization=self.data.split.normalization,
            threads=threads,
        )

    def _check_champion(self) -> int | None:
        """The current version if it is whole; a damaged one is reported (in the log and
        the result's eval) and the challenger is judged on its own checks."""
        current = self.store.current()
        self.started_from = Champion(current)  # damaged or not: what a promotion replaces
        self.champion_problem = None if current is None else self.store.check(current)
        if self.champion_problem:
            self.logger.error(
                "current v%d is damaged, not used for warm start or comparison: %s",
                current,
                self.champion_problem,
            )
            return None
        return current

    def _score_current(self, val: WindowSet, threads: int) -> tuple[int, float] | None:
        """The current model's loss on the same validation windows, in its own normalization."""
        current = self.champion
        if current is None:
            return None
        meta = self.store.metadata(current)
        cfg = self.config
        if (meta.channels, meta.window_size) != (
            list(cfg.source.channels),
            cfg.training.window_size,
        ):
            self.logger.info("current v%d has other channels or window size: not compared", current)
            return None
        norm = Normalization.of(meta.normalization)
        data = self.data
        # A value beyond what the current model can take (its scale may be far smaller
        # than the new one's) comes in as 0: its loss stays a finite number to compare.
        z = norm.apply(data.val_rows, missing=0.0)
        windows = WindowSet(z, val.starts - data.val_offset, val.size)
        session = open_session(self.store.path(current) / "model.onnx", threads)
        errors = channel_errors(session, windows, len(cfg.source.channels))
        return current, float(errors.mean())

    def save_model(self, model_metrics: dict, eval_results: dict) -> Saved:
        promote = self.rejection is None
        meta = self._prepare(model_metrics, eval_results, promote)
        try:
            self.store.commit(self.version, self.staging, promote=promote, over=self.started_from)
        except CurrentMoved as moved:
            # The operator rolled back while this cycle trained: the version it judged
            # against is no longer current, and the operator's choice must not be undone
            # silently. Saved `rejected`, saying why in its metadata and its result's eval.
            promote = False
            self.rejection = eval_results["rejection"] = str(moved)
            (self.staging / METADATA).unlink()  # else "files" would list it
            meta = self._prepare(model_metrics, eval_results, promote)
            self.store.commit(self.version, self.staging, promote=promote)
        self.state.update(last_order=self.data.last_order, trained_at=time.time())
        if not promote:
            self.logger.warning("v%d rejected: %s", self.version, self.rejection)
        return Saved(self.version, "promoted" if promote else "rejected", meta.to_json())

    def _prepare(self, model_metrics: dict, eval_results: dict, promote: bool) -> ModelMeta:
        """Writes metadata.json (and report.html) into the staging directory and checks
        the version whole; on any failure the staging directory goes."""
        try:
            self._check_finite(model_metrics)
            meta = self._metadata(model_metrics, eval_results, promote)
            (self.staging / METADATA).write_text(meta.dumps())
            problem = modelfile.check(self.staging)
            if problem:  # non-finite weights: such a model must never be saved, let alone used
                raise DataError(f"v{self.version} not saved: {problem}")
        except BaseException:
            self.store.discard(self.staging)
            raise
        return meta

    def _check_finite(self, metrics: dict) -> None:
        """Training that diverged (NaN or inf losses, threshold) fails the cycle: the model
        would alarm on everything or nothing."""
        values = {
            **{k: v for k, v in metrics.items() if isinstance(v, float)},
            "threshold": self.threshold_fit.threshold,
        }
        bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise DataError(f"training diverged: {', '.join(bad)}; nothing saved")

    def _metadata(self, metrics: dict, eval_results: dict, promote: bool) -> ModelMeta:
        """The version's ModelMeta, checked as every reader checks it: a value this job
        got wrong fails the save, naming the field, instead of every later use."""
        cfg, data, sp = self.config, self.data, self.data.split
        meta: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "name": cfg.model.name,
            "version": self.version,
            # What the cycle decided and the id of the result it publishes: the store
            # alone can then rebuild a result that was lost before reaching the outbox.
            "outcome": "promoted" if promote else "rejected",
            "result_id": str(uuid.uuid4()),
            "created_at": utcnow(),
            "device_id": cfg.daemon.device_id,
            "backend": self.trainer.name,
            "window_size": cfg.training.window_size,
            "stride": cfg.training.stride,
            "channels": list(cfg.source.channels),
            "input_name": "input",
            "output_name": "reconstruction",
            "normalization": sp.normalization.to_meta(),
            **self.window_score.to_meta(),
            "threshold": self.threshold_fit.threshold,
            "threshold_fit": self.threshold_fit.to_meta(),
            "score_quantiles": self.score_quantiles,
            "alarm": _alarm_meta(cfg.model, data.level),
            "time": data.time.to_meta(),
            "channel_error": self.channel_error,
            "metrics": metrics,
            "history": self.epochs.to_meta(),
            "eval": eval_results,
            "data": {
                "rows": data.rows,
                "dropped_rows": data.dropped,
                "windows": data.windows,
                "train_windows": len(sp.train),
                "val_windows": len(sp.val),
                "first_order": data.first_order,
                "last_order": data.last_order,
                "left_out": data.left_out,
            },
            "files": {},  # filled in below, once report.html is written
            "software": {
                "smocsd": __version__,
                "onnxruntime": onnxruntime_version(),
                "python": platform.python_version(),
            },
        }
        self._write_report(meta)
        # After the report: it is listed (and so verified) like every other file of the
        # version. It is rendered from everything but this list, which it does not show.
        meta["files"] = {
            f.name: _file_entry(f) for f in sorted(self.staging.iterdir()) if f.is_file()
        }
        try:
            return ModelMeta.parse(meta)
        except Damage as damage:
            raise DataError(f"v{self.version} not saved: {METADATA}: {damage}") from None

    def _write_report(self, meta: dict) -> None:
        """report.html, for a person; a bug in it must not cost the cycle its model."""
        try:
            text = report.render(meta)
        except Exception:
            self.logger.exception("v%d: report.html not written", self.version)
            return
        (self.staging / "report.html").write_text(text, encoding="utf-8")
