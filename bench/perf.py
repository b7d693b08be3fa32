"""Training performance, measured: a cycle against the bare training loop, the two backends
against PyTorch on the same network, a cycle's peak memory by rows read, and the idle
daemon's footprint.

    python3 -m venv .bench && .bench/bin/pip install -e . -r bench/requirements.txt
    .bench/bin/pip install --no-deps torch && .bench/bin/python bench/torch_cpu.py
    .bench/bin/python bench/perf.py [--rows 200000] [--repeats 3] [--only cycle,rss]

Prints markdown tables (the README's "Performance"); each time is the median of
--repeats runs, each in a process of its own (as the daemon runs each cycle), one thread
(training.threads = 1), demo readings (`smocsd demo`). smocsd's processes run without
torch, as in the daemon's environment (see NO_TORCH).

1. cycle: one real cycle (call_hooks, as the training child runs it, with the default
   config) per backend, phase by phase, against that backend's bare loop: the same number
   of train steps on batches made beforehand, with nothing else (no reading, windowing,
   validation, progress calls, export). The cycle should cost little more.
2. backends: CPU µs per train step of ort, numpy and PyTorch (CPU, eager, fused AdamW)
   on the same network, batch and optimizer, on ready-made batches. PyTorch only where it
   is installed (.bench; bench/requirements.txt says how).
3. rss: peak RSS of `smocsd train-once --force` (the daemon's own code path: a parent
   and the spawned training child; the larger counts) in a fresh process per size,
   first training and retraining (warm start, the current model compared).
4. idle: `smocsd run` with nothing to train: the daemon's RSS, and its CPU and that of
   the training children it starts once per check_interval to find nothing to do.
5. screen: a retraining cycle (a champion, then training.min_new_samples new rows that it
   does not alarm on): what scoring the new rows before training (`leave_out()`,
   smocsd/training/screen.py) and the check that the challenger keeps the champion's
   alarms add; and its train steps against the first cycle's. Its screening opens the
   champion's ORT session before it trains, which must not cost the training the flush
   of denormals (smocsd/training/trainers/ort.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np

from smocsd.common import config
from smocsd.data import demo
from smocsd.training.autoencoder import AutoencoderJob
from smocsd.training.hooks import call_hooks
from smocsd.training.job import CycleProgress
from smocsd.training.result import Outcome
from smocsd.training.trainers import TrainSpec, _common
from smocsd.training.trainers.graph import build_model, init_weights, layer_sizes, param_shapes

BACKENDS = ("ort", "numpy")
TIMES: dict[str, np.ndarray] = {}


def clock() -> np.ndarray:
    """(wall, CPU) seconds: CPU time is what the cycle costs the gateway, and steadier than
    wall time on a machine that runs other work (one thread: CPU <= wall)."""
    return np.array([time.perf_counter(), time.process_time()])


def _timed(name: str, fn: Callable, *args):
    started = clock()
    try:
        return fn(*args)
    finally:
        TIMES[name] = TIMES.get(name, 0.0) + clock() - started


SPECS: list[TrainSpec] = []
FIT = "fit (train + validate + export)"


class TimedJob(AutoencoderJob):
    """The built-in job with a stopwatch around each hook."""

    def get_training_data(self):
        return _timed("read + window", super().get_training_data)

    def leave_out(self):
        return _timed("  of which screening", super().leave_out)

    def _kept_alarms(self, threads):
        return _timed("  of which alarms kept", super()._kept_alarms, threads)

    def train_model(self, data):
        metrics = _timed(FIT, super().train_model, data)
        TIMES["epochs"] = np.array([metrics["epochs_run"]] * 2)
        SPECS.append(self.spec)  # the bare loop runs the very network the cycle trained
        return metrics

    def eval_model(self):
        return _timed("evaluate (InferenceSession)", super().eval_model)

    def save_model(self, model_metrics, eval_results):
        return _timed("save (fsync, rename)", super().save_model, model_metrics, eval_results)


_validation_loss = _common.validation_loss


def _timed_validation(*args):
    return _timed("  of which validation", _validation_loss, *args)


_common.validation_loss = _timed_validation  # run_epochs looks it up at each call


def median(values: list) -> np.ndarray:
    """Element-wise median of numbers or (wall, CPU) pairs."""
    return np.median(np.array(values), axis=0)


# --- bare loops ---------------------------------------------------------------------------


def ready_batches(n_features: int, batch_size: int) -> np.ndarray:
    """64 batches of normalized-looking data, made beforehand and cycled through."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, batch_size, n_features)).astype(np.float32)


def bare_ort(spec: TrainSpec, steps: int) -> np.ndarray:
    """(wall, CPU) seconds of `steps` train steps of ORT's own loop on ready batches."""
    # Through smocsd's ort module, which imports onnxruntime.training without torch.
    from smocsd.training.trainers import ort

    x = ready_batches(spec.n_features, spec.batch_size)
    with tempfile.TemporaryDirectory() as d, ort._stderr_silenced():
        ort.artifacts.generate_artifacts(
            build_model(
                spec.n_features, spec.hidden, init_weights(spec.n_features, spec.hidden, 0)
            ),
            requires_grad=list(param_shapes(spec.n_features, spec.hidden)),
            loss=ort.artifacts.LossType.MSELoss,
            optimizer=ort.artifacts.OptimType.AdamW,
            artifact_directory=d,
        )
        state = ort.CheckpointState.load_checkpoint(f"{d}/checkpoint")
        module = ort.Module(
            f"{d}/training_model.onnx",
            state,
            f"{d}/eval_model.onnx",
            session_options=ort.session_options(spec.threads),  # smocsd's: threads, no denormals
        )
        optimizer = ort.Optimizer(f"{d}/optimizer_model.onnx", module)
        optimizer.set_learning_rate(spec.learning_rate)
        started = clock()
        for i in range(steps):
            module(x[i % 64], x[i % 64])
            optimizer.step()
            module.lazy_reset_grad()
        return clock() - started


def bare_numpy(spec: TrainSpec, steps: int) -> np.ndarray:
    """(wall, CPU) seconds of `steps` train steps of the numpy trainer's network and AdamW."""
    from threadpoolctl import threadpool_limits

    from smocsd.training.trainers.numpy import AdamW, Network

    x = ready_batches(spec.n_features, spec.batch_size)
    net = Network(spec.n_features, spec.hidden, init_weights(spec.n_features, spec.hidden, 0))
    optimizer = AdamW(net.params, net.grads, spec.learning_rate)
    with threadpool_limits(limits=spec.threads):
        started = clock()
        for i in range(steps):
            net.loss_and_grads(x[i % 64])
            optimizer.step()
        return clock() - started


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def bare_torch(spec: TrainSpec, steps: int) -> np.ndarray:
    """(wall, CPU) seconds for `steps` train steps of the same network in PyTorch (CPU,
    eager): the same initial weights, MSE loss and AdamW (eps 1e-6, no weight decay, as
    ORT's), torch's fastest CPU AdamW (fused)."""
    import torch

    torch.set_num_threads(spec.threads)
    torch.set_num_interop_threads(1)
    weights = init_weights(spec.n_features, spec.hidden, 0)
    sizes = layer_sizes(spec.n_features, spec.hidden)
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        linear = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weights[f"layer{i}.weight"].T.copy()))
            linear.bias.copy_(torch.from_numpy(weights[f"layer{i}.bias"]))
        layers += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    optimizer = torch.optim.AdamW(  # fused: one kernel, not a dozen ops per tensor
        model.parameters(), lr=spec.learning_rate, eps=1e-6, weight_decay=0.0, fused=True
    )
    loss_fn = torch.nn.MSELoss()
    x = torch.from_numpy(ready_batches(spec.n_features, spec.batch_size))
    started = clock()
    for i in range(steps):
        batch = x[i % 64]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch), batch)
        loss.backward()
        optimizer.step()
    return clock() - started


BARE = {"ort": bare_ort, "numpy": bare_numpy, "torch": bare_torch}


def bare(backend: str, spec: dict, steps: int) -> list[float]:
    """(wall, CPU) seconds of a bare loop, in a process of its own (see in_child)."""
    spec["hidden"] = tuple(spec["hidden"])
    return BARE[backend](TrainSpec(**spec), steps).tolist()


# The daemon's environment has no torch, this one may: onnxruntime imports torch whenever
# it can find it (onnxruntime.tools, at `import onnxruntime`), which costs a cycle a second
# and 280 MiB. So every smocsd process started here hides it, through a sitecustomize that
# the processes they spawn (the training child) run too.
NO_TORCH = "import sys\nsys.modules['torch'] = None  # bench/perf.py: as in the daemon's venv\n"
NO_TORCH_DIR: list[Path] = []  # where main() wrote that sitecustomize.py


def daemon_env(**extra: str) -> dict[str, str]:
    """os.environ, torch hidden (NO_TORCH), and `extra`."""
    path = os.pathsep.join(filter(None, [str(NO_TORCH_DIR[0]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def in_child(name: str, *args):
    """CHILD[name](*args) in a fresh interpreter, as the daemon runs each cycle, its result
    as JSON. In one process the runs would not be alike: ORT flushes denormals only on
    the thread of the process's first session (a std::call_once), and a bare ORT loop
    would leave that flush on for the numpy and PyTorch loops after it."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([name, args])],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ if "torch" in args else daemon_env(),
    ).stdout
    return json.loads(out.splitlines()[-1])


# --- 1. the cycle against the bare loop ---------------------------------------------------


def cycle_config(state: Path, db: Path, backend: str, rows: int, extra: str = "") -> str:
    return (
        f'[daemon]\nstate_dir = "{state}"\n[source]\npath = "{db}"\n[publish]\norder = []\n'
        f"[training]\nbackend = '{backend}'\nmax_rows = {rows}\n{extra}"
    )


def one_cycle(db: str, backend: str, rows: int) -> dict:
    """Phase times of one timed cycle, its train steps and its TrainSpec (as JSON)."""
    TIMES.clear()
    with tempfile.TemporaryDirectory(prefix="smocsd-perf-") as state:
        cfg = config.parse(
            cycle_config(Path(state), Path(db), backend, rows, "job = '__main__:TimedJob'\n")
        )
        started = clock()
        result = call_hooks(cfg, force=True, progress=CycleProgress(), job_state=None)
        TIMES["whole cycle"] = clock() - started
    assert result.outcome is Outcome.PROMOTED, result
    spec = SPECS.pop()
    steps = train_steps(result, spec)
    return {
        "times": {k: v.tolist() for k, v in TIMES.items()},
        "steps": steps,
        "spec": dataclasses.asdict(spec),
    }


def train_steps(result, spec: TrainSpec) -> int:
    """The train steps of the cycle just timed, which trained `spec`: its epochs (TimedJob's
    record, all networks' together) times the batches of an epoch."""
    windows = result.model_meta["data"]["train_windows"]
    return int(TIMES.pop("epochs")[0]) * -(-windows // spec.batch_size)


def retrain(db: str, backend: str, rows: int) -> dict:
    """Phase times of a retraining cycle: a champion trained on `rows` rows, then
    training.min_new_samples normal rows appended (copies of the newest, which it saw)."""
    TIMES.clear()
    with tempfile.TemporaryDirectory(prefix="smocsd-perf-") as state:
        extra = "job = '__main__:TimedJob'\nmin_interval = 0\n"
        text = cycle_config(Path(state), Path(db), backend, rows, extra)
        cfg = config.parse(text)
        first = call_hooks(cfg, force=True, progress=CycleProgress(), job_state=None)
        first_step = TIMES[FIT][1] / train_steps(first, SPECS.pop())
        with sqlite3.connect(db) as conn:  # new rows the champion knows: no alarm
            conn.execute(
                "INSERT INTO readings (ts, temperature, vibration, current, label) "
                "SELECT ts + (SELECT max(ts) - min(ts) + 10 FROM readings), temperature, "
                "vibration, current, 0 FROM readings WHERE label = 0 AND rowid > "
                "(SELECT max(rowid) FROM readings) - ?",
                (cfg.training.min_new_samples,),
            )
        TIMES.clear()
        started = clock()
        result = call_hooks(cfg, force=False, progress=CycleProgress(), job_state=first.job_state)
        TIMES["whole cycle"] = clock() - started
    assert result.outcome in (Outcome.PROMOTED, Outcome.REJECTED), result
    assert result.eval["champion_alarm_windows"] == 0, result.eval
    step = TIMES[FIT][1] / train_steps(result, SPECS.pop())
    return {
        "times": {k: v.tolist() for k, v in TIMES.items()},
        "step_us": [first_step * 1e6, step * 1e6],
    }


def screen_table(tmp: Path, rows: int, repeats: int) -> None:
    print(
        f"\nA retraining cycle, {rows:,} rows and a champion, no alarm: CPU s (median of "
        f"{repeats}), and CPU µs per train step of the first cycle and of the retraining "
        "cycle (whose screening opens the champion's session before it trains)\n"
    )
    print(
        "| backend | whole cycle | screening | alarms kept | both, share of the cycle "
        "| µs/step, first | µs/step, retraining |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend in BACKENDS:
        runs = []
        for i in range(repeats):
            db = tmp / f"screen-{backend}-{i}" / "readings.db"  # each run appends rows
            demo.write(db, rows)
            runs.append(in_child("retrain", str(db), backend, rows))
        times = [r["times"] for r in runs]
        t = {name: median([r.get(name, [0, 0]) for r in times])[1] for name in times[0]}
        added = t["  of which screening"] + t.get("  of which alarms kept", 0.0)
        first, again = median([r["step_us"] for r in runs])
        print(
            f"| {backend} | {t['whole cycle']:.2f} | {t['  of which screening']:.3f} | "
            f"{t.get('  of which alarms kept', 0.0):.3f} | {added / t['whole cycle']:.1%} "
            f"| {first:.1f} | {again:.1f} |"
        )


CHILD = {"one_cycle": one_cycle, "bare": bare, "retrain": retrain}


def cycle_table(tmp: Path, rows: int, repeats: int) -> None:
    db = tmp / "cycle" / "readings.db"
    demo.write(db, rows)
    columns: dict[str, dict[str, np.ndarray]] = {}
    info = []
    for backend in BACKENDS:
        runs, bares = [], []
        for _ in range(repeats):
            run = in_child("one_cycle", str(db), backend, rows)
            runs.append(run["times"])
            bares.append(in_child("bare", backend, run["spec"], run["steps"]))
        phases = {name: median([r.get(name, [0, 0]) for r in runs]) for name in runs[0]}
        phases["bare loop, same steps"] = median(bares)
        columns[backend] = phases
        steps, batch = run["steps"], run["spec"]["batch_size"]
        info.append(f"{backend} {steps} train steps ({steps * batch // 1000}k windows)")
    order = [
        "read + window",
        "fit (train + validate + export)",
        "  of which validation",
        "evaluate (InferenceSession)",
        "save (fsync, rename)",
        "whole cycle",
        "bare loop, same steps",
    ]
    print(f"\n{rows:,} rows, default config, one thread; {', '.join(info)}\n")
    head = " | ".join(f"{b} wall s | {b} CPU s | {b} CPU x bare" for b in BACKENDS)
    print(f"| phase | {head} |")
    print("|---|" + "---:|---:|---:|" * len(BACKENDS))
    for name in order:
        cells = []
        for backend in BACKENDS:
            wall, cpu = columns[backend][name]
            ratio = cpu / columns[backend]["bare loop, same steps"][1]
            cells.append(f"{wall:.2f} | {cpu:.2f} | {ratio:.2f}")
        label = f"**{name}**" if name == "whole cycle" else name.replace("  ", "↳ ")
        print(f"| {label} | " + " | ".join(cells) + " |")
    walls = [
        columns[b]["whole cycle"][0] / columns[b]["bare loop, same steps"][0] for b in BACKENDS
    ]
    print("| whole cycle x bare, wall clock | " + " | ".join(f"| | {r:.2f}" for r in walls) + " |")


# --- 2. backends against PyTorch ----------------------------------------------------------


def backends_table(repeats: int, steps: int = 4000) -> None:
    version = torch_version()
    names = [*BACKENDS, "torch"] if version else list(BACKENDS)
    sizes = (32, 256)
    print(f"\nCPU µs per train step, network 30-32-8-32-30, AdamW, one thread, {steps} steps\n")
    print("| backend | " + " | ".join(f"batch {b}" for b in sizes) + " | windows/s, batch 32 |")
    print("|---|" + "---:|" * (len(sizes) + 1))
    for name in names:
        cells, per_second = [], 0.0
        for batch in sizes:
            spec = dataclasses.asdict(TrainSpec(30, (32, 8), 1e-3, batch, 1, 1, 1))
            runs = [in_child("bare", name, spec, steps) for _ in range(repeats)]
            seconds = median(runs)[1]  # CPU
            cells.append(f"{seconds / steps * 1e6:.1f}")
            if batch == 32:
                per_second = steps * batch / seconds
        label = {
            "ort": "ort (onnxruntime-training)",
            "numpy": f"numpy {np.__version__}",
            "torch": f"PyTorch {version} CPU, eager",
        }[name]
        print(f"| {label} | " + " | ".join(cells) + f" | {per_second:,.0f} |")
    if not version:
        print("\nPyTorch is not installed here: see bench/requirements.txt")


# --- 3. peak RSS by rows ------------------------------------------------------------------

RAW_BYTES_PER_ROW = 8 * (2 + len(demo.CHANNELS))  # order, time and channels as read (float64)


# Started from a small interpreter: a child's ru_maxrss counts the memory it had before
# exec(), which, forked from this process, would be this process's RSS.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
out = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
sys.stdout.buffer.write(out)
"""


def peak_rss_mb(args: list[str], report: Path) -> tuple[float, str]:
    """Peak RSS of a command and its children (wait4's, which includes reaped children),
    and the outcome it printed."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(report), *args],
        capture_output=True,
        text=True,
        env=daemon_env(),
    ).stdout
    kib, code = report.read_text().split()
    outcome = json.loads(out)["outcome"] if out.strip() else f"exit {code}"
    return int(kib) / 1024, outcome


def rss_table(tmp: Path, sizes: list[int]) -> None:
    print(
        "\nPeak RSS of `smocsd train-once --force` (the training child's), MiB; "
        f"{len(demo.CHANNELS)} channels, epochs = 2\n"
    )
    head = " | ".join(f"{b} first | {b} retrain" for b in BACKENDS)
    print(f"| rows | raw readings | {head} |")
    print("|---:|---:|" + "---:|" * 2 * len(BACKENDS))
    peaks: dict[int, list[float]] = {}
    for rows in sizes:
        db = tmp / f"rss-{rows}" / "readings.db"
        demo.write(db, rows)
        cells = []
        for backend in BACKENDS:
            state = tmp / f"rss-{rows}" / backend
            state.mkdir()
            path = state / "smocsd.toml"
            path.write_text(
                cycle_config(
                    state,
                    db,
                    backend,
                    rows,
                    "min_training_samples = 1000\nepochs = 2\npatience = 2\n",
                )
            )
            command = [sys.executable, "-m", "smocsd", "train-once", "--force"]
            for _ in ("first", "retrain"):
                mb, outcome = peak_rss_mb([*command, "--config", str(path)], state / "rss")
                assert outcome in ("promoted", "rejected"), (rows, backend, outcome)
                cells.append(mb)
        peaks[rows] = cells
        raw = rows * RAW_BYTES_PER_ROW / 2**20
        print(f"| {rows:,} | {raw:.1f} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    if len(sizes) >= 2:
        a, b = sorted(sizes)[-2:]
        growth = [(y - x) * 1024 * 1024 / (b - a) for x, y in zip(peaks[a], peaks[b], strict=True)]
        print(
            f"| growth {a:,} → {b:,}, bytes/row | {RAW_BYTES_PER_ROW} | "
            + " | ".join(f"{g:.0f}" for g in growth)
            + " |"
        )


# --- 4. the idle daemon -------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own CPU, that of its reaped children) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) / CLOCK_TICK, (cutime + cstime) / CLOCK_TICK


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def idle_table(tmp: Path, seconds: float, interval: float) -> None:
    state = tmp / "idle"
    db = state / "readings.db"
    demo.write(db, 30_000)
    path = state / "smocsd.toml"
    path.write_text(
        cycle_config(state, db, "auto", 30_000).replace(
            "[daemon]\n",
            # each tick's "skipped:" line, which counts the ticks, is a debug line; live
            # scoring (on by default, bench/live.py measures it) is off: the daemon's own part
            f'[scoring]\nenabled = false\n[daemon]\ncheck_interval = "{interval:g}s"\n'
            'log_level = "debug"\n',
        )
    )
    subprocess.run(
        [sys.executable, "-m", "smocsd", "train-once", "--config", str(path)],
        check=True,
        capture_output=True,
        env=daemon_env(),
    )
    # What one check costs at its peak: train-once without --force finds nothing new.
    check_mb, outcome = peak_rss_mb(
        [sys.executable, "-m", "smocsd", "train-once", "--config", str(path)], state / "rss"
    )
    assert outcome == "skipped", outcome
    daemon = subprocess.Popen(
        [sys.executable, "-m", "smocsd", "run"],
        env=daemon_env(SMOCSD_CONFIG=str(path)),
        stderr=subprocess.PIPE,
        text=True,
    )
    ticks: list[float] = []

    def watch() -> None:
        for line in daemon.stderr:
            if "skipped:" in line:
                ticks.append(time.monotonic())

    threading.Thread(target=watch, daemon=True).start()
    try:
        while not ticks:  # the first check, at start
            time.sleep(0.1)
        time.sleep(1)
        own0, children0 = cpu_seconds(daemon.pid)
        started = time.monotonic()
        rss = []
        while time.monotonic() - started < seconds:
            time.sleep(0.5)
            rss.append(rss_mb(daemon.pid))
        own1, children1 = cpu_seconds(daemon.pid)
        elapsed = time.monotonic() - started
        checks = sum(started <= t <= started + elapsed for t in ticks)
    finally:
        daemon.terminate()
        daemon.wait(30)
    own, children = own1 - own0, children1 - children0
    print(
        f"\n`smocsd run`, nothing to train (a current model, no new rows), scoring off, "
        f"check_interval {interval:g}s, {elapsed:.0f} s measured, {checks} checks\n"
    )
    print("| measure | value |")
    print("|---|---:|")
    print(f"| daemon RSS (median, max) | {median(rss):.0f} MiB, {max(rss):.0f} MiB |")
    print(f"| a check's training child, peak RSS | {check_mb:.0f} MiB |")
    print(f"| daemon CPU | {own / elapsed * 100:.2f} % ({own:.2f} s) |")
    per_check = children / checks if checks else float("nan")
    print(f"| training children's CPU, per check | {per_check:.2f} s |")
    print(
        f"| all CPU at the default check_interval (60 s) | "
        f"{(own / elapsed + per_check / 60) * 100:.2f} % of a core |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the timed cycle")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-rows", default="10000,100000,200000,1000000")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle daemon")
    parser.add_argument("--idle-interval", type=float, default=10.0, help="its check_interval")
    parser.add_argument("--only", default="cycle,backends,rss,idle,screen")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # in_child's
    args = parser.parse_args()
    if args.child:
        name, child_args = json.loads(args.child)
        print(json.dumps(CHILD[name](*child_args)))
        return 0
    only = set(args.only.split(","))
    print(
        f"smocsd bench/perf.py: Python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} cores, median of {args.repeats}"
    )
    with tempfile.TemporaryDirectory(prefix="smocsd-perf-") as tmp_name:
        tmp = Path(tmp_name)
        NO_TORCH_DIR.append(tmp / "no-torch")
        NO_TORCH_DIR[0].mkdir()
        (NO_TORCH_DIR[0] / "sitecustomize.py").write_text(NO_TORCH)
        if "cycle" in only:
            cycle_table(tmp, args.rows, args.repeats)
        if "backends" in only:
            backends_table(args.repeats)
        if "rss" in only:
            rss_table(tmp, [int(n) for n in args.rss_rows.split(",")])
        if "idle" in only:
            idle_table(tmp, args.idle, args.idle_interval)
        if "screen" in only:
            screen_table(tmp, args.rows, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
