"""Training with ONNX Runtime's on-device training API (onnxruntime-training 1.19).

The training, evaluation and optimizer graphs are generated per network from the shared
graph (milliseconds) into a scratch directory that is removed afterwards; a version
directory keeps only the inference ``model.onnx`` and each network's parameter
``checkpoint`` for warm starts.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

# `import onnxruntime.training` imports its `optim` subpackage, which needs torch
# (microsoft/onnxruntime#22070). Nothing here uses it, and torch must not be a dependency.
if "onnxruntime.training" not in sys.modules:
    sys.modules.setdefault(
        "onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim")
    )

import onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer

from smocsd.training.trainers import Fit, Progress, Trainer, TrainSpec, Windows
from smocsd.training.trainers._common import (
    TrainedNetwork,
    fit_networks,
    load_warm_start,
    run_epochs,
)
from smocsd.training.trainers.graph import build_model, init_weights, param_shapes

CHECKPOINT = "checkpoint"
T = TypeVar("T")


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


def session_options(threads: int) -> onnxruntime.SessionOptions:
    """Options of the training session: `threads` intra-op threads, and denormal floats
    flushed to zero on the threads of its pool (the training thread: `_flush_denormals`)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


# MXCSR's flush-to-zero (results) and denormals-are-zero (inputs) bits.
_MXCSR_FTZ, _MXCSR_DAZ = 0x8000, 0x0040


def _flush_denormals() -> None:
    """Flush-to-zero and denormals-are-zero in this thread's MXCSR, the x86 register of
    SSE float modes. Without them a step gets slower late in training: AdamW's moments of
    weights whose gradient is zero (a unit ReLU keeps off) decay by beta each step into
    the denormal range, where every operation on them takes a microcode assist (20-30 %
    after some 60 000 steps of `[32, 8]`). Flushed, they are zero, as they were about to be
    (the 200 000-row demo cycle trains the same model with and without).

    ORT's own set_denormal_as_zero does not do for this thread: it sets the flags once per
    process (a std::call_once), for the thread that creates the process's first session,
    and only if that session asked. In a retraining cycle that is the champion's
    InferenceSession, opened by the screening before training, and the training thread
    trained unflushed: 8-13 % slower (`[32, 8]`, 200 000 demo rows, bench/perf.py's
    cycle). onnxruntime-training exists for x86_64 Linux only, where glibc's fenv_t ends
    with MXCSR: fegetenv and fesetenv set it as _MM_SET_FLUSH_ZERO_MODE would.
    """
    libm = ctypes.CDLL("libm.so.6")
    env = (ctypes.c_uint32 * 8)()  # fenv_t: 32 bytes, the last 4 are MXCSR
    if libm.fegetenv(env) == 0:
        env[7] |= _MXCSR_FTZ | _MXCSR_DAZ
        libm.fesetenv(env)


def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread of its own with denormals flushed (`_flush_denormals`), its
    exception (a stop request too) raised here. The flags stay with that thread: in the
    caller's, they would go on flushing every numpy computation there after the fit."""
    outcome: list = []

    def target() -> None:
        try:
            _flush_denormals()
            outcome.append((True, fn(*args)))
        except BaseException as e:  # handed over to the caller as it is
            outcome.append((False, e))

    thread = threading.Thread(target=target, name="smocsd-ort-fit", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _checkpoint_shapes(state: CheckpointState) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.data.shape) for name, param in state.parameters}


class _OrtSession:
    """The training loop's calls into ORT, through the C++ module the Python ``Module`` wraps.

    ``Module.__call__`` with numpy inputs ends in ``_model.train_step([x, x], fetches)``;
    calling that directly saves a few µs of Python per step, about 5 % of a step of the
    default network. onnxruntime-training 1.19 is the last release, so this stays put.
    """

    def __init__(self, module: Module, optimizer: Optimizer) -> None:
        self.module = module
        self._train_step = module._model.train_step
        self._eval_step = module._model.eval_step
        self._reset_grad = module._model.lazy_reset_grad
        self._optimizer_step = optimizer._optimizer.optimizer_step
        self._best: object = None

    def train_step(self, x: np.ndarray) -> float:
        x = np.ascontiguousarray(x, dtype=np.float32)
        fetches = OrtValueVector()
        self._train_step([x, x], fetches)  # input and target: the same buffer, no copy
        self._optimizer_step()
        self._reset_grad()
        return float(fetches[0].numpy())

    def squared_error(self, x: np.ndarray) -> float:
        x = np.ascontiguousarray(x, dtype=np.float32)
        fetches = OrtValueVector()
        self._eval_step([x, x], fetches)
        return float(fetches[0].numpy()) * x.size

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
        return in_own_thread(
            fit_networks,
            spec,
            train,
            val,
            out_dir,
            progress,
            warm_start,
            CHECKPOINT,
            self._fit_one,
        )

    @staticmethod
    def _fit_one(
        spec: TrainSpec,
        train: Windows,
        val: Windows,
        progress: Progress,
        warm_start: Path | None,
        checkpoint: Path,
    ) -> TrainedNetwork:
        warm = load_warm_start(
            spec, warm_start, CheckpointState.load_checkpoint, _checkpoint_shapes
        )
        # beside the checkpoint, in the version being built: one directory to clean up
        with tempfile.TemporaryDirectory(
            prefix=".ort-artifacts-", dir=checkpoint.parent
        ) as scratch_name:
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
            module = Module(
                scratch / "training_model.onnx",
                state,
                scratch / "eval_model.onnx",
                session_options=session_options(spec.threads),
            )
            optimizer = Optimizer(scratch / "optimizer_model.onnx", module)
            # Checkpoints do not store the learning rate; a warm start would otherwise
            # run with the artifact default.
            optimizer.set_learning_rate(spec.learning_rate)
            loop = run_epochs(spec, train, val, progress, _OrtSession(module, optimizer))
            CheckpointState.save_checkpoint(state, checkpoint)
            weights = {
                name: np.array(state.parameters[name].data)
                for name in param_shapes(spec.n_features, spec.hidden)
            }
        return TrainedNetwork(loop, weights, warm_started=warm is not None)
