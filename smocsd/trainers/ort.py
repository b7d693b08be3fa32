"""Training with ONNX Runtime's on-device training API (onnxruntime-training 1.19).

The training, evaluation and optimizer graphs are generated per fit from the shared graph
(milliseconds) into a scratch directory that is removed afterwards; a version directory
keeps only the inference ``model.onnx`` and the parameter ``checkpoint`` for warm starts.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np

# `import onnxruntime.training` imports its `optim` subpackage, which needs torch
# (microsoft/onnxruntime#22070). Nothing here uses it, and torch must not be a dependency.
if "onnxruntime.training" not in sys.modules:
    sys.modules.setdefault(
        "onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim")
    )

import onnxruntime
from onnxruntime import OrtValue
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer

from smocsd.trainers import Fit, Progress, Trainer, TrainSpec, Windows
from smocsd.trainers._common import check_inputs, load_warm_start, run_epochs
from smocsd.trainers.graph import (
    OUTPUT_NAME,
    build_model,
    init_weights,
    param_shapes,
)

CHECKPOINT = "checkpoint"


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """generate_artifacts' C++ side logs one INFO line per graph transformer straight to
    fd 2, which no ORT logging setting reaches; under systemd each would be a journal line."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _checkpoint_shapes(state: CheckpointState) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.data.shape) for name, param in state.parameters}


class _OrtSession:
    def __init__(self, module: Module, optimizer: Optimizer) -> None:
        self.module = module
        self.optimizer = optimizer
        self._best: object = None

    def train_step(self, x: np.ndarray) -> float:
        # One OrtValue for both input and target: a single wrap of the numpy buffer, no copy.
        value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        loss = self.module(value, value)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss.numpy())

    def squared_error(self, x: np.ndarray) -> float:
        value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.module.eval()
        try:
            mse = float(self.module(value, value).numpy())
        finally:
            self.module.train()
        return mse * x.size

    def keep_best(self) -> None:
        self._best = self.module.get_contiguous_parameters(trainable_only=True)

    def restore_best(self) -> None:
        self.module.copy_buffer_to_parameters(self._best, trainable_only=True)


class OrtTrainer(Trainer):
    name: ClassVar[str] = "ort"

    def fit(
        self,
        spec: TrainSpec,
        train: Windows,
        val: Windows,
        out_dir: Path,
        progress: Progress,
        warm_start: Path | None = None,
    ) -> Fit:
        started = time.monotonic()
        check_inputs(spec, train, val)
        warm = load_warm_start(
            spec, warm_start, CHECKPOINT, CheckpointState.load_checkpoint, _checkpoint_shapes
        )
        with tempfile.TemporaryDirectory(prefix=".ort-artifacts-", dir=out_dir) as scratch_name:
            scratch = Path(scratch_name)
            with _stderr_silenced():
                artifacts.generate_artifacts(
                    build_model(
                        spec.n_features,
                        spec.hidden,
                        init_weights(spec.n_features, spec.hidden, spec.seed),
                    ),
                    requires_grad=list(param_shapes(spec.n_features, spec.hidden)),
                    loss=artifacts.LossType.MSELoss,
                    optimizer=artifacts.OptimType.AdamW,
                    artifact_directory=scratch,
                )
            state = (
                warm if warm is not None else CheckpointState.load_checkpoint(scratch / CHECKPOINT)
            )
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = spec.threads
            options.inter_op_num_threads = 1
            module = Module(
                scratch / "training_model.onnx",
                state,
                scratch / "eval_model.onnx",
                session_options=options,
            )
            optimizer = Optimizer(scratch / "optimizer_model.onnx", module)
            # Checkpoints do not store the learning rate; a warm start would otherwise
            # run with the artifact default.
            optimizer.set_learning_rate(spec.learning_rate)
            result = run_epochs(spec, train, val, progress, _OrtSession(module, optimizer))
            module.export_model_for_inferencing(out_dir / "model.onnx", [OUTPUT_NAME])
            CheckpointState.save_checkpoint(state, out_dir / CHECKPOINT)
        return result.fit(started, warm_started=warm is not None)
