"""Where a training cycle's time goes, against the bare ONNX Runtime training loop.

    .venv/bin/python bench/train_once.py [--rows 30000] [--epochs 10] [--backend ort]

Prints one table: each phase of a real cycle (read, window, fit, evaluate, save) and,
as the floor, ONNX Runtime's own train step over the same number of batches with the
batches prepared beforehand. The cycle should cost little more than that floor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smocsd import config, demo
from smocsd.autoencoder import AutoencoderJob
from smocsd.cycle import Outcome, call_hooks
from smocsd.job import CycleProgress


class TimedJob(AutoencoderJob):
    """The built-in job with a stopwatch around each hook."""

    times: dict[str, float] = {}  # noqa: RUF012 - one run per process

    def _timed(self, name, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - started

    def get_training_data(self):
        return self._timed("read + window", super().get_training_data)

    def train_model(self, data):
        self.batches = -(-len(data.split.train) // self.spec.batch_size)
        metrics = self._timed("fit (train + validate)", super().train_model, data)
        self.times["epochs"] = metrics["epochs_run"]
        return metrics

    def eval_model(self):
        return self._timed("evaluate (InferenceSession)", super().eval_model)

    def save_model(self, model_metrics, eval_results):
        return self._timed("save (fsync, rename)", super().save_model, model_metrics, eval_results)


def bare_ort_loop(
    n_features: int, hidden: tuple[int, ...], batches: int, batch_size: int, threads: int
) -> float:
    """Seconds for `batches` train steps of ORT's own loop on ready-made batches."""
    # Through smocsd's ort module, which imports onnxruntime.training without torch.
    from smocsd.trainers import ort
    from smocsd.trainers.graph import build_model, init_weights, param_shapes

    artifacts, CheckpointState, Module, Optimizer = (
        ort.artifacts,
        ort.CheckpointState,
        ort.Module,
        ort.Optimizer,
    )

    with tempfile.TemporaryDirectory() as d, ort._stderr_silenced():
        artifacts.generate_artifacts(
            build_model(n_features, hidden, init_weights(n_features, hidden, 0)),
            requires_grad=list(param_shapes(n_features, hidden)),
            loss=artifacts.LossType.MSELoss,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=d,
        )
        state = CheckpointState.load_checkpoint(f"{d}/checkpoint")
        options = ort.onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        module = Module(
            f"{d}/training_model.onnx", state, f"{d}/eval_model.onnx", session_options=options
        )
        optimizer = Optimizer(f"{d}/optimizer_model.onnx", module)
        x = np.random.default_rng(0).normal(size=(64, batch_size, n_features)).astype(np.float32)
        started = time.perf_counter()
        for i in range(batches):
            module(x[i % 64], x[i % 64])
            optimizer.step()
            module.lazy_reset_grad()
        return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--backend", default="ort", choices=["ort", "numpy"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as state:
        demo.write(Path(state) / "readings.db", args.rows)
        cfg = config.parse(
            f'[daemon]\nstate_dir = "{state}"\n[publish]\norder = []\n'
            "[training]\njob = '__main__:TimedJob'\n"
            f"epochs = {args.epochs}\npatience = {args.epochs}\n"
            f"backend = '{args.backend}'\n"
        )
        started = time.perf_counter()
        # In this process (not the daemon's child), so that TimedJob's times are here.
        result = call_hooks(cfg, force=True, progress=CycleProgress(), job_state=None)
        total = time.perf_counter() - started
    assert result.outcome is Outcome.PROMOTED, result
    t = cfg.training
    windows = result.model_meta["data"]["train_windows"]
    steps = int(TimedJob.times.pop("epochs")) * -(-windows // t.batch_size)
    n_features = t.window_size * len(cfg.source.channels)
    floor = bare_ort_loop(n_features, t.hidden, steps, t.batch_size, t.threads)
    rows = [*TimedJob.times.items(), ("whole cycle", total), ("bare ORT train steps", floor)]
    print(
        f"{args.rows} rows, {windows} training windows, {steps} train steps, "
        f"backend {args.backend}, Python {sys.version.split()[0]}"
    )
    print(f"{'phase':<30}{'seconds':>10}{'µs/step':>10}{'x floor':>9}")
    for name, seconds in rows:
        print(f"{name:<30}{seconds:>10.3f}{seconds / steps * 1e6:>10.1f}{seconds / floor:>9.2f}")


if __name__ == "__main__":
    main()
