"""Labelled datasets for bench/detect.py: each a list of runs to train on and score.

A run is what a gateway sees: a model is trained on its first `n_train` rows (normal
operation, or as normal as the plant's history gets) and must then flag the labelled rows
among the rest. Needs only numpy and smocsd; the files are vendored in bench/data/, each
with its licence and SOURCE.md. Real plants come first; the simulations follow.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from smocsd.data import demo

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Run:
    values: np.ndarray  # (rows, channels), NaN where a sensor read nothing
    time: np.ndarray  # epoch seconds
    labels: np.ndarray  # 1 on anomalous rows
    n_train: int  # the first n_train rows train; the rest are evaluated
    name: str = ""  # the file it came from, where a dataset's runs are files


@dataclass(frozen=True)
class Dataset:
    name: str
    channels: tuple[str, ...]
    runs: tuple[Run, ...]
    about: str

    def describe(self) -> str:
        """One line: what the data is and how much of it is evaluated."""
        evaluated = np.concatenate([r.labels[r.n_train :] for r in self.runs])
        segments = sum(len(segments_of(r.labels[r.n_train :])) for r in self.runs)
        train = sorted({r.n_train for r in self.runs})
        return (
            f"{self.name}: {self.about}. {len(self.runs)} run(s), {len(self.channels)} "
            f"channel(s), trained on the first {'/'.join(map(str, train))} rows; "
            f"{len(evaluated)} rows evaluated, {(evaluated != 0).mean():.1%} anomalous, "
            f"{segments} anomaly segments."
        )


def segments_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of nonzero labels."""
    edges = np.diff(np.concatenate(([0], (labels != 0).astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


# --- testbed -----------------------------------------------------------------------------

TESTBED_CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)


def testbed_run(seed: int, rows: int = 1200, train: int = 400) -> Run:
    """A short pump test-bed run at 1 Hz: trained on its first minutes while the liquid is
    still warming up (so the model never sees the settled state), then one fault lasting
    200-420 s. Short runs with little training data are where a threshold taken from a few
    dozen validation windows breaks down."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows, dtype=float)
    speed = 1 + 0.01 * np.cumsum(rng.normal(0, 0.05, rows)) / np.sqrt(rows)
    # Warm-up of the liquid, slow: not settled within the training rows.
    warm = rng.uniform(1.0, 4.0) * (1 - np.exp(-t / rng.uniform(600, 2000)))
    flow = 32 * speed + rng.normal(0, 0.3, rows)
    pressure = 0.25 * speed**2 + rng.normal(0, 0.03, rows)
    current = 1.9 * speed + 0.02 * warm + rng.normal(0, 0.02, rows)
    acc1 = 0.21 * speed + rng.normal(0, 0.004, rows)
    acc2 = 0.27 * speed + rng.normal(0, 0.005, rows)
    temp = 68 + warm + rng.normal(0, 0.05, rows)
    thermo = 28 + 0.6 * warm + rng.normal(0, 0.05, rows)
    volt = 230 + rng.normal(0, 0.8, rows)
    x = np.column_stack([acc1, acc2, current, pressure, temp, thermo, volt, flow])
    x[:, 3] = np.round(x[:, 3] / 0.02) * 0.02  # quantized pressure sensor
    x[:, 7] = np.round(x[:, 7])
    label = np.zeros(rows, np.int64)
    s = int(rng.integers(train + 50, rows - 450))
    n = int(rng.integers(200, 420))
    fault = slice(s, s + n)
    kind = seed % 4
    if kind == 0:  # partly closed valve: flow down, pressure up, current down
        f = rng.uniform(0.05, 0.15)
        x[fault, 7] *= 1 - f
        x[fault, 3] += f
        x[fault, 2] *= 1 - f / 3
    elif kind == 1:  # rotor imbalance: vibration up
        x[fault, 0] += rng.uniform(0.01, 0.03)
        x[fault, 1] += rng.uniform(0.01, 0.03)
    elif kind == 2:  # cavitation: pressure noisier, flow a bit down
        x[fault, 3] += rng.normal(0, 0.08, n)
        x[fault, 7] -= rng.uniform(1, 3)
    else:  # heating fault: temperature climbs faster
        x[fault, 4] += np.linspace(0, rng.uniform(1, 3), n)
        x[fault, 5] += np.linspace(0, rng.uniform(0.5, 1.5), n)
    label[fault] = 1
    return Run(x, t + 1.6e9, label, train)


def testbed() -> Dataset:
    return Dataset(
        "testbed",
        TESTBED_CHANNELS,
        tuple(testbed_run(seed) for seed in range(16)),
        "synthetic pump test-bed runs (bench/scenarios.py), 8 channels at 1 Hz, 1200 rows each, "
        "warming up, one valve/imbalance/cavitation/heating fault per run",
    )


# --- vendored files ----------------------------------------------------------------------


def _read_csv(path: Path, delimiter: str = ",") -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt", newline="") as f:
        rows = list(csv.reader(io.StringIO(f.read()), delimiter=delimiter))
    return rows[0], rows[1:]


def _utc_seconds(rows: list[list[str]]) -> np.ndarray:
    """Epoch seconds of the rows' first column, an ISO 8601 time read as UTC."""
    return np.array(
        [datetime.fromisoformat(r[0]).replace(tzinfo=timezone.utc).timestamp() for r in rows]
    )


def gutentag() -> Dataset:
    """One run: 5000 rows of the anomaly-free training series, then the whole test series."""
    folder = DATA / "gutentag_plant6ch"
    header, train = _read_csv(folder / "train_normal.csv.gz")
    _, test = _read_csv(folder / "test.csv.gz")
    channels = tuple(c for c in header if c.startswith("ch"))
    cols = [header.index(c) for c in channels]
    rows = train[:5000] + test
    values = np.array([[float(r[i]) for i in cols] for r in rows])
    labels = np.array([int(r[header.index("label")]) for r in rows])
    return Dataset(
        "gutentag",
        channels,
        (Run(values, np.arange(len(rows), dtype=float), labels, 5000),),
        "GutenTAG-generated synthetic plant (bench/data/gutentag_plant6ch, MIT), 6 channels "
        "(sine, random walk, ECG-like, square, cylinder-bell-funnel, sawtooth), 11 injected "
        "anomalies of 1-500 rows",
    )


# NAB labels windows of ~47 h centred on each event, so the rows just before the first
# window may already lead up to it: training stops a day (288 rows of 5 min) earlier.
NAB_MARGIN = 288


def nab_machine_temperature() -> Dataset:
    header, rows = _read_csv(DATA / "nab_machine_temperature" / "machine_temperature.csv.gz")
    time = _utc_seconds(rows)
    values = np.array([[float(r[1])] for r in rows])
    labels = np.array([int(r[2]) for r in rows])
    n_train = int(np.argmax(labels != 0)) - NAB_MARGIN
    return Dataset(
        "nab-machine-temperature",
        (header[1],),
        (Run(values, time, labels, n_train),),
        "NAB machine_temperature_system_failure (bench/data/nab_machine_temperature, "
        "AGPL-3.0), a real industrial machine's temperature every 5 min for 11 weeks, "
        "4 labelled windows of ~47 h (shutdown, failures)",
    )


# --- real plants --------------------------------------------------------------------------

TEP_FAULT_ROW = 160  # faults start after the 160th test row
# Faults whose effect on the measurements is too small to detect (the literature's usual
# exclusion); their files are still scored, and counted in no mean.
TEP_UNDETECTABLE = (3, 9, 15)
TEP_STEP = 180.0  # one row every 3 minutes


def _tep_rows(name: str) -> np.ndarray:
    with gzip.open(DATA / "tep" / f"{name}.dat.gz", "rt") as f:
        return np.loadtxt(f, dtype=np.float64, ndmin=2)


def tep() -> Dataset:
    """Braatz's Tennessee Eastman files: one run per test file (d00_te, d01_te .. d21_te),
    each the 500 rows of d00 (train) followed, after an hour's gap so that no window spans
    the two, by the 960 test rows. `Run.name` is the file; the fault is its number."""
    train = _tep_rows("d00").T  # stored transposed: 52 lines of 500 values
    runs = []
    for fault in range(22):
        test = _tep_rows(f"d{fault:02d}_te")
        values = np.vstack([train, test])
        time = np.arange(len(values)) * TEP_STEP
        time[len(train) :] += 3600.0
        labels = np.zeros(len(values), np.int64)
        if fault:
            labels[len(train) + TEP_FAULT_ROW :] = 1
        runs.append(Run(values, time + 1.6e9, labels, len(train), f"d{fault:02d}_te"))
    channels = tuple(f"xmeas_{i}" for i in range(1, 42)) + tuple(f"xmv_{i}" for i in range(1, 12))
    return Dataset(
        "tep",
        channels,
        tuple(runs),
        "Tennessee Eastman Process, Braatz's files (bench/data/tep, University of Illinois "
        "licence), a simulated chemical plant every 3 min; d00's 500 normal rows train, "
        "each of the 22 test files (d00_te normal, d01..d21_te faulty from row 161) is scored",
    )


SKAB_TRAIN = 400  # SKAB's protocol: the first 400 rows of each file train


def skab_valve1() -> Dataset:
    """SKAB's valve1 experiments, one run per file, SKAB's protocol."""
    folder = DATA / "skab_valve1"
    runs, channels = [], ()
    for path in sorted(folder.glob("*.csv.gz"), key=lambda p: int(p.name.split(".")[0])):
        header, body = _read_csv(path, ";")
        channels = tuple(header[1:-2])
        time = _utc_seconds(body)
        values = np.array([[float(v) for v in r[1:-2]] for r in body])
        labels = np.array([int(float(r[-2])) for r in body])
        runs.append(Run(values, time, labels, SKAB_TRAIN, path.name.split(".")[0]))
    return Dataset(
        "skab-valve1",
        channels,
        tuple(runs),
        "SKAB valve1 experiments (bench/data/skab_valve1, GPL-3.0, bench-only), a real "
        "water-pump test bed at 1 Hz, 8 channels; SKAB's protocol: each file's first 400 rows "
        "train, the rest is scored",
    )


def demo_runs() -> Dataset:
    runs = []
    for seed in (1, 2, 3):
        d = demo.simulate(30000, seed=seed)
        values = np.column_stack([d[c] for c in demo.CHANNELS])
        runs.append(Run(values, d["ts"], d["label"], 10000))
    return Dataset(
        "demo",
        demo.CHANNELS,
        tuple(runs),
        "smocsd demo simulator (seeds 1-3, 30000 rows at 10 s), regimes, start-ups, gaps and "
        "dropouts; brief anomalies, a third of them subtle; training rows may hold anomalies",
    )


DATASETS = {
    "tep": tep,
    "skab-valve1": skab_valve1,
    "testbed": testbed,
    "gutentag": gutentag,
    "demo": demo_runs,
    "nab-machine-temperature": nab_machine_temperature,
}
