"""Trainer backends: one interface, two implementations of the same autoencoder.

``ort`` trains with ONNX Runtime's on-device training API (x86_64, Python < 3.13, where the
onnxruntime-training wheel exists); ``numpy`` is a pure-numpy twin of the same network and
optimizer for every other platform. Both export the same inference ``model.onnx``.

This module imports neither numpy nor ONNX Runtime: ``smocsd status`` resolves the backend
through it and must stay a cheap, read-only command.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

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
    seed: int = 0  # the first network's; the k-th (from 0) trains from seed + k
    networks: int = 1  # trained apart, exported as one model averaging their reconstructions


@dataclass(frozen=True)
class Fit:
    """Outcome of a fit; the exported weights are those of each network's best validation
    epoch."""

    # mean MSE over the best epoch's training batches (weights moving meanwhile), the
    # networks' mean
    train_loss: float
    val_loss: float  # MSE over all validation elements with the exported model
    epochs_run: int  # all networks' together
    duration_s: float
    warm_started: bool  # every network started from its checkpoint in the warm start


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
        """Train ``spec.networks`` networks, then write ``out_dir/model.onnx`` (inference
        model: ``input`` -> ``reconstruction``, float32 ``[N, n_features]``, the networks'
        mean) plus this backend's checkpoint file of each network.

        ``out_dir`` exists and is empty; nothing is fsync'ed here (the store does that).
        ``warm_start`` is a previous model version directory: a network starts from its
        weights there when it holds this backend's checkpoint of that network of the same
        architecture, otherwise from the seeded initialization, and the reason is logged.
        """


def ort_training_installed() -> bool:
    """Whether the installed ``onnxruntime`` is a training build (onnxruntime-training-cpu),
    told by its files: the training API's ``onnxruntime/training/api`` package, which the
    plain wheel lacks.

    Nothing is imported: ``onnxruntime`` itself takes a third of a second, and
    ``onnxruntime.training`` does not import at all without the stub in ``ort.py``.
    """
    try:
        spec = importlib.util.find_spec("onnxruntime")  # a top-level name: only looked up
    except (ImportError, ValueError):
        return False
    return spec is not None and any(
        (Path(location) / "training" / "api" / "__init__.py").is_file()
        for location in spec.submodule_search_locations or ()
    )


def resolve_backend(backend: str) -> str:
    """The backend ``training.backend`` trains with on this install: ``auto`` -> ``ort``
    where ONNX Runtime training is installed, else ``numpy``.

    Raises ValueError for an unknown backend, or ``ort`` where it is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"training.backend = {backend!r} is not one of {', '.join(map(repr, BACKENDS))}"
        )
    if backend == "auto":
        return "ort" if ort_training_installed() else "numpy"
    if backend == "ort" and not ort_training_installed():
        raise ValueError(
            "training.backend = 'ort' but ONNX Runtime training is not available: "
            "onnxruntime-training-cpu is not installed (it exists for x86_64 Linux, "
            "Python < 3.13)"
        )
    return backend


def make_trainer(backend: str) -> Trainer:
    """The trainer :func:`resolve_backend` names. Should an installed training build fail
    to import, ``auto`` still trains, with numpy and a warning (metadata.json records the
    backend that trained), while ``ort`` is a ValueError."""
    name = resolve_backend(backend)
    if name == "ort":
        try:
            from smocsd.training.trainers.ort import OrtTrainer
        except ImportError as e:
            if backend == "ort":
                raise ValueError(
                    f"training.backend = 'ort' but ONNX Runtime training is not available: {e}"
                ) from e
            log.warning("ONNX Runtime training does not import (%s); training with numpy", e)
        else:
            return OrtTrainer()
    from smocsd.training.trainers.numpy import NumpyTrainer

    return NumpyTrainer()


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
