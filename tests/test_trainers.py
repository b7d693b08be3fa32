"""The trainer backends: numpy maths, ORT/numpy agreement, export, early stopping, warm start,
stop requests, backend selection."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from smocsd.training.trainers import Fit, TrainSpec, make_trainer, onnxruntime_version
from smocsd.training.trainers.graph import build_model, init_weights, param_shapes, side_by_side
from smocsd.training.trainers.numpy import Network, NumpyTrainer

WINDOW, CHANNELS = 10, 3
N_FEATURES = WINDOW * CHANNELS
BACKENDS = ["ort", "numpy"]


class ArrayWindows:
    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.n_features = rows.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        return self.rows[indices]


class Recorder:
    """Progress that records epochs and can raise on its n-th between_batches call."""

    def __init__(self, raise_at: int | None = None) -> None:
        self.calls = 0
        self.raise_at = raise_at
        self.epochs: list[tuple[int, int, float, float]] = []

    def between_batches(self) -> None:
        self.calls += 1
        if self.calls == self.raise_at:
            raise KeyboardInterrupt("stop requested")

    def on_epoch(self, epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
        self.epochs.append((epoch, epochs, train_loss, val_loss))


def sensor_windows(rows: int, seed: int = 0) -> tuple[ArrayWindows, ArrayWindows]:
    """Three normalized noisy sinusoid channels cut into time-major windows; the newest 20 %
    of windows are the validation set."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    waves = [np.sin(2 * np.pi * t / p + phase) for p, phase in ((37, 0.0), (91, 1.0), (23, 2.0))]
    series = np.stack(waves, axis=1) + 0.1 * rng.standard_normal((rows, CHANNELS))
    series = ((series - series.mean(0)) / series.std(0)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(series, (WINDOW, CHANNELS))[:, 0]
    windows = np.ascontiguousarray(windows.reshape(-1, N_FEATURES))
    split = int(len(windows) * 0.8)
    return ArrayWindows(windows[:split]), ArrayWindows(windows[split:])


def spec(**overrides: object) -> TrainSpec:
    values: dict = dict(
        n_features=N_FEATURES,
        hidden=(16, 4),
        learning_rate=3e-3,
        batch_size=32,
        epochs=8,
        patience=3,
        threads=1,
        seed=0,
    )
    values.update(overrides)
    return TrainSpec(**values)


@pytest.fixture(scope="module")
def data() -> tuple[ArrayWindows, ArrayWindows]:
    return sensor_windows(3000)


def fit(
    backend: str,
    s: TrainSpec,
    data,
    out: Path,
    warm: Path | None = None,
    progress: Recorder | None = None,
) -> tuple[Fit, Recorder]:
    out.mkdir()
    progress = progress or Recorder()
    return make_trainer(backend).fit(s, data[0], data[1], out, progress, warm), progress


def onnx_mse(model: Path, x: np.ndarray, batch: int) -> float:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    total = 0.0
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        (recon,) = session.run(["reconstruction"], {"input": chunk})
        total += float(np.square(recon.astype(np.float64) - chunk).sum())
    return total / x.size


def test_numpy_gradients_match_finite_differences() -> None:
    hidden = (4, 2)
    rng = np.random.default_rng(1)
    weights = {k: v.astype(np.float64) for k, v in init_weights(6, hidden, seed=3).items()}
    for name, shape in param_shapes(6, hidden).items():
        if name.endswith("bias"):
            weights[name] = 0.3 * rng.standard_normal(shape)
    net = Network(6, hidden, weights, dtype=np.float64)
    x = rng.standard_normal((5, 6))
    net.loss_and_grads(x)
    analytic = net.grads.copy()
    numeric = np.empty_like(analytic)
    h = 1e-6
    for i in range(net.params.size):
        keep = net.params[i]
        net.params[i] = keep + h
        up = net.squared_error(x)
        net.params[i] = keep - h
        down = net.squared_error(x)
        net.params[i] = keep
        numeric[i] = (up - down) / (2 * h * x.size)
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


def test_backends_converge_comparably(data, tmp_path: Path) -> None:
    s = spec(epochs=15)
    ort_fit, ort_progress = fit("ort", s, data, tmp_path / "ort")
    np_fit, np_progress = fit("numpy", s, data, tmp_path / "numpy")
    # Same init, same shuffles, same AdamW (betas, eps, bias correction): the loss curves agree
    # to float rounding (about 1e-6 here), not merely in the end result.
    for ort_epoch, np_epoch in zip(ort_progress.epochs[:5], np_progress.epochs[:5], strict=True):
        assert ort_epoch == pytest.approx(np_epoch, rel=1e-4)
    for f in (ort_fit, np_fit):
        assert f.val_loss < 0.15  # normalized data has variance 1
    assert max(ort_fit.val_loss, np_fit.val_loss) < 1.5 * min(ort_fit.val_loss, np_fit.val_loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_model_scores_like_fit(backend: str, data, tmp_path: Path) -> None:
    out = tmp_path / "v"
    f, _ = fit(backend, spec(epochs=3), data, out)
    checkpoint = {"ort": "checkpoint", "numpy": "weights.npz"}[backend]
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.onnx", checkpoint])
    model = onnx.load(out / "model.onnx")
    assert model.ir_version <= 10
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["reconstruction"]
    val = data[1].rows
    assert onnx_mse(out / "model.onnx", val, batch=len(val)) == pytest.approx(f.val_loss, rel=1e-4)
    assert onnx_mse(out / "model.onnx", val, batch=1) == pytest.approx(f.val_loss, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_stopping_exports_the_best_epoch(backend: str, tmp_path: Path) -> None:
    small = sensor_windows(600, seed=2)
    s = spec(epochs=300, patience=2, learning_rate=1e-2)
    f, progress = fit(backend, s, small, tmp_path / "v")
    vals = [e[3] for e in progress.epochs]
    best = int(np.argmin(vals))
    assert f.epochs_run < s.epochs
    assert f.epochs_run == len(vals) == best + 1 + s.patience
    assert f.val_loss == vals[best]
    assert f.train_loss == progress.epochs[best][2]
    exported = onnx_mse(tmp_path / "v" / "model.onnx", small[1].rows, batch=256)
    assert exported == pytest.approx(vals[best], rel=1e-4)
    assert exported != pytest.approx(vals[-1], rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_start(backend: str, data, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smocsd.training.trainers")
    first, first_progress = fit(backend, spec(epochs=3), data, tmp_path / "v1")
    assert not first.warm_started
    second, second_progress = fit(backend, spec(epochs=1), data, tmp_path / "v2", tmp_path / "v1")
    assert second.warm_started
    assert second_progress.epochs[0][2] < first_progress.epochs[0][2] / 2
    assert second_progress.epochs[0][3] < first_progress.epochs[0][3]
    assert not caplog.records

    other, _ = fit(backend, spec(epochs=1, hidden=(8, 2)), data, tmp_path / "v3", tmp_path / "v1")
    assert not other.warm_started
    assert "not warm-starting" in caplog.text and "hidden=[8, 2]" in caplog.text

    caplog.clear()
    foreign = {"ort": "numpy", "numpy": "ort"}[backend]
    fit(foreign, spec(epochs=1), data, tmp_path / "foreign")
    cold, _ = fit(backend, spec(epochs=1), data, tmp_path / "v4", tmp_path / "foreign")
    assert not cold.warm_started
    assert "has no" in caplog.text


def reconstruct(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(["reconstruction"], {"input": x})[0]


@pytest.mark.parametrize("hidden", [(5,), (6, 3), (6, 4, 2)])
def test_side_by_side_reconstructs_the_networks_mean(hidden: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    networks = []
    for seed in range(3):
        weights = init_weights(7, hidden, seed)
        for name in weights:
            if name.endswith("bias"):  # init's are zero: test them too
                weights[name] = rng.standard_normal(weights[name].shape).astype(np.float32)
        networks.append(weights)
    x = rng.standard_normal((50, 7)).astype(np.float32)
    wide_hidden, wide = side_by_side(7, hidden, networks)
    assert wide_hidden == tuple(3 * h for h in hidden)
    mean = np.mean([reconstruct(build_model(7, hidden, w), x) for w in networks], axis=0)
    np.testing.assert_allclose(
        reconstruct(build_model(7, wide_hidden, wide), x), mean, rtol=1e-5, atol=1e-5
    )
    # one network is exported as it is
    one_hidden, one = side_by_side(7, hidden, networks[:1])
    assert one_hidden == hidden and one.keys() == networks[0].keys()
    for name, array in one.items():
        np.testing.assert_array_equal(array, networks[0][name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_networks_train_apart_and_are_saved_as_their_mean(
    backend: str, data, tmp_path: Path
) -> None:
    s = spec(epochs=3, networks=3)
    f, progress = fit(backend, s, data, tmp_path / "v")
    checkpoints = {
        "ort": ["checkpoint", "checkpoint-2", "checkpoint-3"],
        "numpy": ["weights.npz", "weights-2.npz", "weights-3.npz"],
    }[backend]
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted(
        ["model.onnx", *checkpoints]
    )
    # the k-th network is the one network of seed k, trained alone
    alone = [fit(backend, spec(epochs=3, seed=k), data, tmp_path / f"seed{k}") for k in range(3)]
    val = data[1].rows
    mean = np.mean(
        [reconstruct(onnx.load(tmp_path / f"seed{k}" / "model.onnx"), val) for k in range(3)],
        axis=0,
    )
    np.testing.assert_allclose(
        reconstruct(onnx.load(tmp_path / "v" / "model.onnx"), val), mean, rtol=1e-4, atol=1e-5
    )
    assert f.val_loss == pytest.approx(onnx_mse(tmp_path / "v" / "model.onnx", val, 512), rel=1e-4)
    assert f.val_loss < min(a.val_loss for a, _ in alone)  # averaging the three helps here
    assert f.train_loss == pytest.approx(np.mean([a.train_loss for a, _ in alone]), rel=1e-4)
    # the epochs of all three counted as one run
    assert f.epochs_run == sum(a.epochs_run for a, _ in alone) == 9
    assert [(e[0], e[1]) for e in progress.epochs] == [(i, 9) for i in range(1, 10)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_network_warm_starts_from_its_own_checkpoint(
    backend: str, data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smocsd.training.trainers")
    fit(backend, spec(epochs=3, networks=2), data, tmp_path / "v1")
    second, _ = fit(backend, spec(epochs=1, networks=2), data, tmp_path / "v2", tmp_path / "v1")
    assert second.warm_started and not caplog.records
    # from a version of fewer networks: the first warm-starts, the others from their seeds
    more, progress = fit(
        backend, spec(epochs=1, networks=3), data, tmp_path / "v3", tmp_path / "v2"
    )
    assert not more.warm_started
    checkpoint = {"ort": "checkpoint-3", "numpy": "weights-3.npz"}[backend]
    assert f"has no {checkpoint} checkpoint" in caplog.text
    _, cold_progress = fit(backend, spec(epochs=1, networks=3), data, tmp_path / "cold")
    assert progress.epochs[0][2] < cold_progress.epochs[0][2] / 2  # the first network: warm
    assert progress.epochs[2][2] == pytest.approx(cold_progress.epochs[2][2])  # the third: cold


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["training", "validation"])
def test_stop_request_propagates_within_one_batch(
    backend: str, where: str, data, tmp_path: Path
) -> None:
    steps_per_epoch = -(-len(data[0]) // 32)
    raise_at = 5 if where == "training" else steps_per_epoch + 1
    progress = Recorder(raise_at=raise_at)
    with pytest.raises(KeyboardInterrupt, match="stop requested"):
        fit(backend, spec(), data, tmp_path / "v", progress=progress)
    assert progress.calls == raise_at
    assert progress.epochs == []
    assert list((tmp_path / "v").iterdir()) == []  # no scratch files, nothing half-written


def test_make_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_trainer("auto").name == "ort"
    assert make_trainer("ort").name == "ort"
    assert isinstance(make_trainer("numpy"), NumpyTrainer)
    with pytest.raises(ValueError, match=r"^training.backend = 'torch' is not one of"):
        make_trainer("torch")
    monkeypatch.setitem(sys.modules, "smocsd.training.trainers.ort", None)  # as if it cannot import
    assert make_trainer("auto").name == "numpy"
    with pytest.raises(ValueError, match=r"^training.backend = 'ort' .* not available: "):
        make_trainer("ort")
    assert onnxruntime_version() == onnxruntime.__version__


def test_numpy_backend_never_imports_onnxruntime_training(tmp_path: Path) -> None:
    """Plain onnxruntime (aarch64, Python 3.13) has no onnxruntime.training at all."""
    code = (
        "import sys, numpy as np, pathlib\n"
        "from smocsd.training.trainers import make_trainer, TrainSpec\n"
        "class W:\n"
        "    n_features = 6\n"
        "    def __len__(self): return 40\n"
        "    def batch(self, i): return np.ones((len(i), 6), np.float32) * (i[:, None] % 3)\n"
        "class P:\n"
        "    def between_batches(self): pass\n"
        "    def on_epoch(self, *a): pass\n"
        "make_trainer('numpy').fit(TrainSpec(6, (4, 2), 1e-3, 8, 2, 1, 1), W(), W(),\n"
        f"    pathlib.Path({str(tmp_path)!r}), P())\n"
        "assert not [m for m in sys.modules if m.startswith('onnxruntime.training')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "model.onnx").is_file()


class RecordingSession:
    """A Session that records every training batch and learns nothing."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def train_step(self, x: np.ndarray) -> float:
        self.batches.append(x.copy())
        return 1.0

    def squared_error(self, x: np.ndarray) -> float:
        return float(x.size)

    def keep_best(self) -> None:
        pass

    def restore_best(self) -> None:
        pass


class CountingWindows(ArrayWindows):
    def __init__(self, rows: np.ndarray) -> None:
        super().__init__(rows)
        self.gathers = 0

    def batch(self, indices: np.ndarray) -> np.ndarray:
        self.gathers += 1
        return super().batch(indices)


def test_windows_are_gathered_in_blocks_and_fed_batch_by_batch_in_shuffled_order() -> None:
    from smocsd.training.trainers._common import GATHER_WINDOWS, run_epochs

    rows = np.arange(5000 * 2, dtype=np.float32).reshape(5000, 2)
    train, val = CountingWindows(rows), ArrayWindows(rows[:10])
    session, progress = RecordingSession(), Recorder()
    run_epochs(
        spec(n_features=2, batch_size=48, epochs=2, patience=5), train, val, progress, session
    )
    order = np.arange(5000)
    rng = np.random.default_rng((0, 1))  # run_epochs' own shuffling stream
    expected = []
    for _ in range(2):
        rng.shuffle(order)
        expected += [rows[order[i : i + 48]] for i in range(0, 5000, 48)]
    assert len(session.batches) == len(expected) == 2 * 105
    for got, want in zip(session.batches, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    blocks_per_epoch = -(-5000 // (GATHER_WINDOWS // 48 * 48))
    assert train.gathers == 2 * blocks_per_epoch < len(expected)
    assert progress.calls == len(expected) + 2  # every train step, and one validation batch


TINY = np.array([1e-39], np.float32)  # a denormal float32


def test_ort_training_leaves_the_callers_floats_alone(data, tmp_path: Path) -> None:
    """The ort backend trains with denormals flushed to zero (ort._flush_denormals), flags
    that stay with the thread that sets them: fit runs in a thread of its own."""
    assert (TINY * np.float32(1.0))[0] != 0
    fit("ort", spec(epochs=1), data, tmp_path / "v")
    assert (TINY * np.float32(1.0))[0] != 0


def test_ort_trains_flushed_after_another_session_came_first(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT's own flush is set once per process, on the thread of its first session: in a
    retraining cycle the champion's InferenceSession, opened by the screening."""
    from smocsd.training.trainers import ort

    fit("numpy", spec(epochs=1), data, tmp_path / "champion")
    champion = str(tmp_path / "champion" / "model.onnx")
    onnxruntime.InferenceSession(champion, providers=["CPUExecutionProvider"])
    flushed = []

    def run_epochs(*args):
        flushed.append((TINY * np.float32(1.0))[0] == 0)
        return loop(*args)

    loop = ort.run_epochs
    monkeypatch.setattr(ort, "run_epochs", run_epochs)
    fit("ort", spec(epochs=1, networks=2), data, tmp_path / "v")
    assert flushed == [True, True]


def test_numpy_adamw_flushes_moments_before_they_turn_denormal() -> None:
    from smocsd.training.trainers.numpy import FLUSH_EVERY, AdamW

    params = np.ones(4, np.float32)
    grads = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    adamw = AdamW(params, grads, 1e-3)
    adamw.step()
    grads[:2] = 0.0  # two weights whose gradient stays zero: their moments only decay
    tiny = np.finfo(np.float32).tiny
    for _ in range(40 * FLUSH_EVERY):
        adamw.step()
        for moment in (adamw.m, adamw.v):
            assert not ((moment != 0) & (np.abs(moment) < tiny)).any()
    assert (adamw.m[:2] == 0).all() and (adamw.m[2:] > 0.5).all()
    assert (adamw.v[2:] > 0.5).all()
