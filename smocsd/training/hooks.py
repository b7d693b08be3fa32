"""The five TrainingJob hooks, called in order in the training child (smocsd/app/child.py
starts it): the job class loaded from `training.job`, what each hook returns checked
once, and any exception a `failed` result naming its cause.
"""

from __future__ import annotations

import importlib
import logging
import uuid
from dataclasses import fields
from typing import Any

from ..common.config import Config
from .job import CycleProgress, Saved, TrainingJob
from .result import CycleResult, Outcome, error_line

log = logging.getLogger(__name__)


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


class HookError(Exception):
    """A hook returned something the cycle cannot publish."""


def _mapping(value: Any, hook: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise HookError(f"{hook}() returned {type(value).__name__}, not a dict with str keys")
    return value


def _saved(value: Any) -> Saved:
    """save_model's return value, checked: a Saved, a dict of its keys (the contract's
    first form) or None (promoted, no version); each wrong field is a HookError naming it."""
    if value is None:
        return Saved()
    if not isinstance(value, Saved):
        given = _mapping(value, "save_model")
        unknown = set(given) - {f.name for f in fields(Saved)}
        if unknown:
            raise HookError(f"save_model() returned unknown key(s) {', '.join(sorted(unknown))}")
        value = Saved(**given)
    if value.outcome not in (Outcome.PROMOTED.value, Outcome.REJECTED.value):
        raise HookError(
            f"save_model() returned outcome {value.outcome!r}: 'promoted' or 'rejected'"
        )
    version = value.version
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise HookError(f"save_model() returned version {version!r}, not an integer")
    _mapping(value.model_meta, "save_model model_meta")
    return value


def call_hooks(
    cfg: Config, *, force: bool, progress: CycleProgress, job_state: dict[str, Any] | None
) -> CycleResult:
    """The five hooks in order, in this process; any exception is a `failed` result and
    only Stopped propagates. This is the child's work; bench/ calls it directly."""
    from ..data.sources import (  # numpy: the child's import, not the daemon's
        NoDatabase,
        open_source,
    )

    source = open_source(cfg.source)
    job: TrainingJob | None = None
    try:
        job_class = load_job_class(cfg.training.job)
        job = job_class(
            cfg,
            source,
            cfg.state_dir,
            logging.getLogger(f"smocsd.job.{cfg.model.name}"),
            progress=progress,
            force=force,
            state=job_state,
        )
        progress.ping()
        data = job.get_training_data()
        if data is None:
            return CycleResult(
                Outcome.SKIPPED,
                reason=job.skip_reason,
                job_state=job.state,
                labels=job.label_messages,
            )
        progress.ping()
        metrics = _mapping(job.train_model(data), "train_model")
        del data  # the job may still hold what eval needs; the cycle holds nothing
        progress.ping()
        eval_results = _mapping(job.eval_model(), "eval_model")
        progress.ping()
        saved = _saved(job.save_model(metrics, eval_results))
        outcome = Outcome(saved.outcome)
        screened = job.state.get("screened")
        if outcome is Outcome.PROMOTED and screened:
            # The accepted rows it trained on are normal to the current model now: no
            # accept label it knew is pending any more (smocsd/training/screen.py).
            screened["accepted_through"] = screened.get("accept_known", 0)
        return CycleResult(
            outcome,
            saved.version,
            metrics,
            eval_results,
            saved.model_meta,
            # The built-in job records its result's id in metadata.json, so a result
            # enqueued again from the store (reconcile) carries the same message_id.
            message_id=saved.model_meta.get("result_id") or str(uuid.uuid4()),
            job_state=job.state,
            labels=job.label_messages,
        )
    except NoDatabase as exc:
        return CycleResult(Outcome.SKIPPED, reason=str(exc))
    except Exception as exc:
        log.debug("cycle failed", exc_info=True)
        return CycleResult(
            Outcome.FAILED,
            getattr(job, "version", None),
            error=error_line(exc),
            labels=job.label_messages if job is not None else [],
        )
    finally:
        source.close()
