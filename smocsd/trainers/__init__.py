"""Trainer backends: one interface, two implementations of the same autoencoder.

``ort`` trains with ONNX Runtime's on-device training API (x86_64, Python < 3.13, where the
onnxruntime-training wheel exists); ``numpy`` is a pure-numpy twin of the same network and
optimizer for every other platform. Both export the same inference ``model.onnx``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

BACKENDS = ("auto", "ort", "numpy")


class Windows(Protocol):
    """Training or validation windows, materialized a batch at a time."""

    n_features: int  # window_size * n_channels

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """float32 ``(len(indices), n_features)``, already normalized."""
        ...


class Progress(Protocol):
    """The caller's hooks into the training loop."""

    def between_batches(self) -> None:
        """Called after every train step and every validation batch, from the training loop
        itself (it pings the systemd watchdog); an exception it raises (a stop request)
        propagates out of ``fit``."""
        ...

    def on_epoch(self, epoch: int, epochs: int, train_loss: float, val_loss: float) -> None: ...


@dataclass(frozen=True)
class TrainSpec:
    n_features: int
    hidden: tuple[int, ...]  # encoder sizes; the decoder mirrors them
    learning_rate: float
    batch_size: int
    epochs: int
    patience: int  # stop after this many epochs in a row without a better validation loss
    threads: int
    seed: int = 0


@dataclass(frozen=True)
class Fit:
    """Outcome of a fit; the exported weights are those of the best validation epoch."""

    train_loss: float  # mean MSE over the best epoch's training batches (weights moving meanwhile)
    val_loss: float  # MSE over all validation elements with the exported (best) weights
    epochs_run: int
    duration_s: float
    warm_started: bool


class Trainer(ABC):
    name: ClassVar[str]

    @abstractmethod
    def fit(
        self,
        spec: TrainSpec,
        train: Windows,
        val: Windows,
        out_dir: Path,
        progress: Progress,
        warm_start: Path | None = None,
    ) -> Fit:
        """Train, then write ``out_dir/model.onnx`` (inference model: ``input`` ->
        ``reconstruction``, float32 ``[N, n_features]``) plus this backend's checkpoint files.

        ``out_dir`` exists and is empty; nothing is fsync'ed here (the store does that).
        ``warm_start`` is a previous model version directory: its weights are the starting
        point when it holds this backend's checkpoint of the same architecture, otherwise
        training starts from the seeded initialization and the reason is logged.
        """


def make_trainer(backend: str) -> Trainer:
    """``auto`` -> ``ort`` where onnxruntime-training imports, else ``numpy``."""
    if backend not in BACKENDS:
        raise ValueError(
            f"training.backend = {backend!r} is not one of {', '.join(map(repr, BACKENDS))}"
        )
    if backend != "numpy":
        try:
            from smocsd.trainers.ort import OrtTrainer
        except ImportError as e:
            if backend == "ort":
                raise ValueError(
                    f"training.backend = 'ort' but ONNX Runtime training is not available: {e}"
                ) from e
        else:
            return OrtTrainer()
    from smocsd.trainers.numpy import NumpyTrainer

    return NumpyTrainer()


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
