"""Pure-numpy training of the autoencoder, for platforms without an ONNX Runtime training wheel
(aarch64, Python >= 3.13). Same network, loss, optimizer and defaults as the ``ort`` backend;
must not import ``onnxruntime.training``.

``TrainSpec.threads`` caps BLAS threads through threadpoolctl for the duration of a fit, so
numpy training is as polite to the gateway's other services as the ORT backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from smocsd.training.trainers import Fit, Progress, Trainer, TrainSpec, Windows
from smocsd.training.trainers._common import (
    TrainedNetwork,
    fit_networks,
    load_warm_start,
    run_epochs,
)
from smocsd.training.trainers.graph import init_weights, layer_sizes, param_shapes

CHECKPOINT = "weights.npz"

# ORT's AdamW as generate_artifacts builds it (onnxblock.optim.AdamW defaults, adam_mode=1,
# i.e. Hugging Face style: bias correction folded into the step size). Its weight_decay is
# 0.0, so the decoupled decay term vanishes and is not computed.
BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-6
# Moments smaller than this are set to zero every FLUSH_EVERY steps. The moments of a
# weight whose gradient is zero (a unit that ReLU keeps off) decay by beta each step into
# float32's denormal range (below 1.2e-38), where every operation on them takes a microcode
# assist: numpy has no flush-to-zero mode, and a step got 20 % slower late in training.
# Zeroed at 1e-30 they never get there (m, the faster, takes 170 steps from 1e-30 to
# 1e-38); an update of m / (sqrt(v) + 1e-6) that small changes nothing. The ort backend
# flushes denormals to zero in its training thread (ort._flush_denormals).
FLUSH_BELOW = 1e-30
FLUSH_EVERY = 64


class Network:
    """The autoencoder's parameters in one flat float32 vector (per-layer views into it), so
    the optimizer, keeping the best weights and restoring them are single array operations."""

    def __init__(
        self,
        n_features: int,
        hidden: tuple[int, ...],
        weights: dict[str, np.ndarray],
        dtype: type = np.float32,
    ) -> None:
        self.n_features = n_features
        self.hidden = hidden
        shapes = param_shapes(n_features, hidden)
        self.names = list(shapes)
        self.params = np.empty(sum(math.prod(s) for s in shapes.values()), dtype=dtype)
        self.grads = np.zeros_like(self.params)
        self._param_views = self._views(self.params, shapes)
        self._grad_views = self._views(self.grads, shapes)
        for name, view in zip(self.names, self._param_views, strict=True):
            view[...] = weights[name]
        self.n_layers = len(layer_sizes(n_features, hidden)) - 1

    @staticmethod
    def _views(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray]:
        views, offset = [], 0
        for shape in shapes.values():
            size = math.prod(shape)
            views.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return views

    def weights(self) -> dict[str, np.ndarray]:
        return {name: view.copy() for name, view in zip(self.names, self._param_views, strict=True)}

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Reconstruction of ``x`` and each layer's input (post-ReLU), kept for backward."""
        p = self._param_views
        inputs = []
        a = x
        for i in range(self.n_layers):
            inputs.append(a)
            z = a @ p[2 * i]
            z += p[2 * i + 1]
            if i < self.n_layers - 1:
                np.maximum(z, 0, out=z)
            a = z
        return a, inputs

    def loss_and_grads(self, x: np.ndarray) -> float:
        """MSE (mean over all elements) of reconstructing ``x``; fills ``self.grads``."""
        y, inputs = self.forward(x)
        diff = y - x
        loss = float(np.mean(np.square(diff)))
        dz = diff * (2.0 / diff.size)
        p, g = self._param_views, self._grad_views
        for i in reversed(range(self.n_layers)):
            a = inputs[i]
            np.matmul(a.T, dz, out=g[2 * i])
            np.sum(dz, axis=0, out=g[2 * i + 1])
            if i:
                dz = dz @ p[2 * i].T
                dz *= a > 0  # ReLU: a is the previous layer's output after ReLU
        return loss

    def squared_error(self, x: np.ndarray) -> float:
        diff = self.forward(x)[0] - x
        return float(np.square(diff, dtype=np.float64).sum())


class AdamW:
    """In-place AdamW over a flat parameter vector, step by step like ORT's AdamWOptimizer
    kernel in mode 1 (``step`` starts at 1; moments start at zero)."""

    def __init__(self, params: np.ndarray, grads: np.ndarray, learning_rate: float) -> None:
        self.params, self.grads = params, grads
        self.learning_rate = learning_rate
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self._tmp = np.empty_like(params)
        self.step_count = 0

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        g, tmp = self.grads, self._tmp
        self.m *= BETA1
        np.multiply(g, 1.0 - BETA1, out=tmp)
        self.m += tmp
        self.v *= BETA2
        np.square(g, out=tmp)
        tmp *= 1.0 - BETA2
        self.v += tmp
        step_size = self.learning_rate * math.sqrt(1.0 - BETA2**t) / (1.0 - BETA1**t)
        np.sqrt(self.v, out=tmp)
        tmp += EPS
        np.divide(self.m, tmp, out=tmp)
        tmp *= step_size
        self.params -= tmp
        if t % FLUSH_EVERY == 0:
            for moment in (self.m, self.v):
                moment[np.abs(moment) < FLUSH_BELOW] = 0.0


class _NumpySession:
    def __init__(self, net: Network, learning_rate: float) -> None:
        self.net = net
        self.optimizer = AdamW(net.params, net.grads, learning_rate)
        self._best = net.params.copy()

    def train_step(self, x: np.ndarray) -> float:
        loss = self.net.loss_and_grads(x)
        self.optimizer.step()
        return loss

    def squared_error(self, x: np.ndarray) -> float:
        return self.net.squared_error(x)

    def keep_best(self) -> None:
        np.copyto(self._best, self.net.params)

    def restore_best(self) -> None:
        np.copyto(self.net.params, self._best)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


class NumpyTrainer(Trainer):
    name: ClassVar[str] = "numpy"

    def fit(
        self,
        spec: TrainSpec,
        train: Windows,
        val: Windows,
        out_dir: Path,
        progress: Progress,
        warm_start: Path | None = None,
    ) -> Fit:
        return fit_networks(
            spec, train, val, out_dir, progress, warm_start, CHECKPOINT, self._fit_one
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
            spec,
            warm_start,
            _load_npz,
            lambda weights: {name: tuple(w.shape) for name, w in weights.items()},
        )
        weights = warm or init_weights(spec.n_features, spec.hidden, spec.seed)
        net = Network(spec.n_features, spec.hidden, weights)
        with threadpool_limits(limits=spec.threads):
            loop = run_epochs(spec, train, val, progress, _NumpySession(net, spec.learning_rate))
        best = net.weights()
        np.savez(checkpoint, **best)
        return TrainedNetwork(loop, best, warm_started=warm is not None)
