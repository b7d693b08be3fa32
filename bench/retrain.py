"""Retraining against faults: does a fault become "normal" after a few retrains, with and
without the protection of the training cycle (smocsd/training/screen.py and the challenger's check
that it still alarms where the champion did, autoencoder.KEEP_ALARMS)?

    .venv/bin/python bench/retrain.py [--quick] [--rounds 8] [--backends ort,numpy]
        [--scenarios none,step32,...] [--promote if-better|always]

Data: the demo plant (`smocsd.data.demo`, anomalies off: only its normal rows), not SKAB or
the Tennessee Eastman set in /work/shared/data. At the default gates a run needs 20,000
normal rows before the fault and 1,500 rows a round after it, all of one plant in one
timeline: TEP has 1,460 normal rows (plus 160 before each fault), SKAB's valve1 about 750
normal rows per experiment, 16 separate runs of the test bed; tiling them would make the
"normal" a loop of seams.

Each scenario puts one fault into the vibration channel, in units of its noise's standard
deviation sd = demo.NOISE[1] = 0.04 (the channel itself spans 0.5 to 1.8, sd 0.3, with the
load). +8 sd is too small here: the first model alarms on 1 % of such rows, about as
on normal ones (0.3 %), so there is nothing for the protection to keep.
v1 alarms on about all rows at +32 sd (1.28, the demo's own clear-cut bearing faults are
+0.2 to +2.7) and on a fifth to a third at +16 sd:

- none: the control, no fault; its "fault rows" are all new rows, so "alarmed" is the
  false alarm rate, and the outcomes say whether a healthy plant's model is ever renewed;
- step32 and step16: vibration jumps by +32 sd (+16 sd) from round 1 on, for good;
- drift: it moves away linearly from round 1 on, +5 sd every round (1,500 rows), so v1
  starts to see it in round 3;
- intermittent: +32 sd for 200 rows, normal for 300, over and over (only the 200 count);
- accepted: a lasting +32 sd shift (a new normal, say a replaced pump) that the operator
  accepts after round 2, as `smocsd accept --from FIRST` does: a Labels(state_dir).add(
  Kind.ACCEPT, first fault row, newest row) label, after which the daemon's next check
  trains at once: a cycle right away, round "2+a". Here alarms should STOP after it.
- accepted-late: the same, but 6 rows arrive between the accept and that next check (a
  minute, the default check_interval, of the demo's 10 s sampling), as they do on a
  running gateway.

Each scenario runs per training backend (ort, numpy) in two modes, on the same rows:

- protected: the built-in job (training.job = "autoencoder");
- unprotected: `Unprotected` below (training.job = "retrain:Unprotected"), the built-in job
  with nothing left out of training and only the old val_loss rule for promotion.

Per run: a fresh state dir and config at the default gates (min_new_samples 1,000,
min_training_samples 10,000, max_rows 200,000, 50 epochs with patience 5, model.promote
"if-better" unless --promote always) except min_interval = 0 and no brokers; 20,000
normal rows; one cycle (the daemon's: `smocsd.app.daemon.Parts(cfg).cycle()`, training in a
spawned child) trains v1; then each round appends 1,500 rows (the fault's rows among them)
and runs one cycle. After each cycle the current model scores every row from the first
fault row on with the code of `smocsd score --from FIRST --json` (`smocsd.app.live.decide`,
the labels' excluded periods, the rule's look-back rows before FIRST), and the share of
fault rows whose window is anomalous is recorded: over all fault rows so far ("all") and
over the newest round's ("new"). Rows without a window (demo sensor dropouts) are not
counted. "v1" is what the first model says of the same rows: the detection to keep.

Prints, per scenario and backend, a plain-text table: each cycle's outcome and version
("prom v3", "rej v3", "skip"), the rows it left out of training (eval's left_out_rows),
and the alarmed shares; then one summary line and, per mode, why each retrain that was
not promoted was not ("keeps 62% of 1103 alarm windows": the challenger alarms on only
that share of the windows the champion alarmed on, KEEP_ALARMS). Two runs go at a time
(--jobs): a full run is 28 runs, 256 cycles, about 3 minutes on 2 cores (190 s with the
demo's three networks); --quick (3 rounds, ort only) about a minute.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import smocsd
from smocsd.app.daemon import Parts
from smocsd.app.live import decide
from smocsd.common import config
from smocsd.common.labels import Kind, Labels
from smocsd.data import demo
from smocsd.data.sources import open_source
from smocsd.scoring import Model
from smocsd.store import ModelStore
from smocsd.training.autoencoder import AutoencoderJob
from smocsd.training.result import CycleResult, Outcome
from smocsd.training.screen import LeaveOut

BENCH = Path(__file__).resolve().parent
BASE_ROWS = 20_000
ROUND_ROWS = 1_500
SIGMA = float(demo.NOISE[1])  # the vibration channel's noise
MODES = ("protected", "unprotected")


class Unprotected(AutoencoderJob):
    """The built-in job as it was before screening: it trains on every row it reads, and a
    challenger is rejected only for a worse val_loss than the champion's. The screening
    still runs, so the job's state holds the record the cycle keeps for any job, but
    nothing it found is left out."""

    def leave_out(self) -> LeaveOut:
        super().leave_out()  # the screening's record in the job's state; nothing else
        return LeaveOut()

    def _rejection(self, previous, alarms, kept):
        return super()._rejection(previous, alarms, None)


# --- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    # rows since the fault began -> (is a fault row, vibration offset)
    fault: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    accept_after: int | None = None  # the round after which the operator accepts
    accept_gap: int = 0  # rows that arrive between the accept and the next check


def _step(size: float) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return lambda k: (np.ones(len(k), bool), np.full(len(k), size * SIGMA))


def _drift(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(len(k), bool), 5 * SIGMA * k / ROUND_ROWS


def _intermittent(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    on = k % 500 < 200
    return on, np.where(on, 32 * SIGMA, 0.0)


SCENARIOS = (
    Scenario(
        "none",
        "control, no fault: the rows after v1 are normal ('fault rows' are all of them, "
        "alarmed = false alarms)",
        _step(0),
    ),
    Scenario("step32", "step fault: vibration +32 sd from round 1 on, for good", _step(32)),
    Scenario("step16", "subtle step fault: vibration +16 sd from round 1 on, for good", _step(16)),
    Scenario("drift", "slow drift: vibration +5 sd per round (1500 rows), linearly", _drift),
    Scenario(
        "intermittent",
        "intermittent fault: vibration +32 sd for 200 rows, off for 300",
        _intermittent,
    ),
    Scenario(
        "accepted",
        "regime change: vibration +32 sd for good, accepted by the operator after round 2",
        _step(32),
        accept_after=2,
    ),
    Scenario(
        "accepted-late",
        "as accepted, but 6 more rows (a minute of the demo's 10 s sampling) arrive between "
        "`smocsd accept` and the next check",
        _step(32),
        accept_after=2,
        accept_gap=6,
    ),
)


# --- one run


@dataclass
class Step:
    """One cycle and what the current model said of the fault rows after it."""

    label: str  # the round ("0" trains v1, "2+a" is the cycle right after an accept)
    fault_rows: int  # fault rows in the table
    outcome: str
    version: int | None
    left_out: int | None
    rejection: str | None
    alarmed: float  # share of all fault rows so far
    alarmed_new: float  # share of the newest round's fault rows
    v1_alarmed: float
    v1_alarmed_new: float

    def cycle(self) -> str:
        short = {"promoted": "prom", "rejected": "rej", "skipped": "skip", "failed": "FAIL"}
        word = short.get(self.outcome, self.outcome)
        return f"{word} v{self.version}" if self.version is not None else word


@dataclass
class RunResult:
    scenario: str
    backend: str
    mode: str
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def write_config(path: Path, state: Path, backend: str, protected: bool, promote: str) -> Path:
    job = "autoencoder" if protected else "retrain:Unprotected"
    path.write_text(
        f'[daemon]\nstate_dir = "{state}"\ndevice_id = "bench"\nlog_level = "error"\n'
        f'[training]\njob = "{job}"\nbackend = "{backend}"\nmin_interval = 0\n'
        f'[model]\npromote = "{promote}"\n'
        "[publish]\norder = []\n"
    )
    return path


def count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM readings").fetchone()[0]


def append(db: Path, rows: int, seed: int, first_fault: int, scenario: Scenario) -> np.ndarray:
    """`rows` more normal rows of the demo timeline, the fault added to its rows; returns
    the order values (rowid) of those fault rows."""
    before = count(db)
    demo.write(db, rows, seed=seed, anomalies=False)
    ids = np.arange(before + 1, before + rows + 1)
    is_fault, offset = scenario.fault(ids - first_fault)
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "UPDATE readings SET vibration = vibration + ?, label = 1 WHERE id = ?",
            zip(offset[is_fault].tolist(), ids[is_fault].tolist(), strict=True),
        )
    return ids[is_fault]


def score(cfg: config.Config, model: Model, first: int) -> dict[int, bool]:
    """Order -> anomalous, for the windows ending at or after `first`, as `smocsd score
    --from FIRST --json` decides them (smocsd/app/cli.py cmd_score)."""
    after = first - 1
    context = model.window_size - 1 + model.look_back - 1
    source = open_source(cfg.source)
    try:
        readings = source.read_newest(source.count_after(after) + context)
    finally:
        source.close()
    excluded = [(x.first, x.last) for x in Labels(cfg.state_dir).read() if x.kind is Kind.EXCLUDE]
    rows, _, _ = decide(model, readings, after, None, excluded)
    return {r.order: r.anomalous for r in rows}


def shares(decided: dict[int, bool], fault: np.ndarray, new_from: int) -> tuple[float, float]:
    """(share of the fault rows alarmed, of those at or after order `new_from`)."""
    fault = fault[np.isin(fault, np.fromiter(decided, np.int64, len(decided)))]
    alarmed = np.array([decided[int(o)] for o in fault], bool)
    new = fault >= new_from
    return (
        float(alarmed.mean()) if len(alarmed) else float("nan"),
        float(alarmed[new].mean()) if new.any() else float("nan"),
    )


def load_current(cfg: config.Config) -> Model:
    store = ModelStore.of(cfg)
    current = store.current()
    assert current is not None, "no current model"
    return Model.of(store.path(current), store.metadata(current))


def run(
    scenario: Scenario, backend: str, mode: str, rounds: int, seed: int, promote: str, tmp: Path
) -> RunResult:
    started = time.monotonic()
    state = tmp / f"{scenario.name}-{backend}-{mode}"
    state.mkdir()
    cfg = config.load(
        write_config(state / "smocsd.toml", state, backend, mode == MODES[0], promote)
    )
    db = cfg.source.path
    demo.write(db, BASE_ROWS, seed=seed, anomalies=False)
    first = BASE_ROWS + 1  # the first fault row's order value (rowid)
    out = RunResult(scenario.name, backend, mode)
    parts = Parts(cfg)
    v1: Model | None = None
    fault = np.zeros(0, np.int64)
    new_from = first

    def cycle(label: str) -> None:
        nonlocal v1
        result: CycleResult = parts.cycle()[0]
        if result.outcome is Outcome.FAILED:
            out.problems.append(f"round {label}: {result.error}")
        if v1 is None:
            v1 = load_current(cfg)  # kept in memory: keep_versions prunes it later
        if len(fault):
            now = shares(score(cfg, load_current(cfg), first), fault, new_from)
            then = shares(score(cfg, v1, first), fault, new_from)
        else:
            now = then = (float("nan"), float("nan"))
        out.steps.append(
            Step(
                label,
                len(fault),
                result.outcome.value,
                result.version,
                result.eval.get("left_out_rows"),
                result.eval.get("rejection") or result.reason,
                *now,
                *then,
            )
        )

    try:
        cycle("0")
        for r in range(1, rounds + 1):
            new_from = count(db) + 1
            fault = np.concatenate([fault, append(db, ROUND_ROWS, seed, first, scenario)])
            cycle(str(r))
            if r == scenario.accept_after:
                # smocsd accept --from FIRST: up to the newest row, then the next check
                Labels(cfg.state_dir).add(
                    Kind.ACCEPT, first, count(db), "bench: a lasting change, the new normal"
                )
                if scenario.accept_gap:
                    fault = np.concatenate(
                        [fault, append(db, scenario.accept_gap, seed, first, scenario)]
                    )
                cycle(f"{r}+a")
    finally:
        parts.close()
    out.seconds = time.monotonic() - started
    return out


# --- the tables


def pct(x: float) -> str:
    if x != x:
        return "-"
    return f"{100 * x:.1f}%" if x < 0.095 else f"{100 * x:.0f}%"


def table(scenario: Scenario, backend: str, runs: dict[str, RunResult]) -> list[str]:
    prot, unprot = runs[MODES[0]], runs[MODES[1]]
    lines = [
        f"## {scenario.name} ({backend}): {scenario.about}",
        "",
        f"{'':5} {'fault':>6}  {'v1 (reference)':^11}  | {'protected':^31} | {'unprotected':^31}",
        f"{'round':5} {'rows':>6}  {'all':>5} {'new':>5}  | "
        + " | ".join(f"{'cycle':9} {'left out':>8} {'all':>5} {'new':>5}" for _ in MODES),
    ]
    lines.append("-" * len(lines[-1]))
    for a, b in zip(prot.steps, unprot.steps, strict=True):
        cells = [
            f"{s.cycle():9} {'-' if s.left_out is None else s.left_out:>8} "
            f"{pct(s.alarmed):>5} {pct(s.alarmed_new):>5}"
            for s in (a, b)
        ]
        lines.append(
            f"{a.label:5} {a.fault_rows:>6}  {pct(a.v1_alarmed):>5} {pct(a.v1_alarmed_new):>5}  | "
            + " | ".join(cells)
        )
    lines.append(summary(scenario, prot, unprot))
    for r in (prot, unprot):
        why = [f"{s.label}: {short(s.rejection)}" for s in r.steps if s.outcome != "promoted"]
        if why:
            lines.append(f"  {r.mode}, not promoted: " + "; ".join(why))
        lines += [f"  {r.mode}: FAILED {p}" for p in r.problems]
    return lines


def short(reason: str | None) -> str:
    """A rejection or skip reason in a few words."""
    if reason is None:
        return "?"
    if reason.startswith("alarms on "):  # autoencoder._rejection: KEEP_ALARMS
        kept, _, rest = reason[len("alarms on ") :].partition(" of the ")
        return f"keeps {kept} of {rest.split(' windows')[0]} alarm windows"
    if reason.startswith("val_loss"):
        return "val_loss worse"
    return reason


def summary(scenario: Scenario, prot: RunResult, unprot: RunResult) -> str:
    last_p, last_u = prot.steps[-1], unprot.steps[-1]
    if scenario.accept_after is not None:
        after = next(s for s in prot.steps if s.label.endswith("+a"))
        u_after = next(s for s in unprot.steps if s.label.endswith("+a"))
        later = [s.alarmed_new for s in prot.steps[prot.steps.index(after) + 1 :]]
        return (
            f"summary: accepted after round {scenario.accept_after}; the retrain right after "
            f"alarms on {pct(after.alarmed)} of the fault rows (protected, {after.cycle()}), "
            f"{pct(u_after.alarmed)} (unprotected); newest rounds after it, protected: "
            f"{', '.join(pct(x) for x in later) or '-'} alarmed."
        )
    promoted = (
        f"promoted {sum(s.outcome == 'promoted' for s in prot.steps[1:])} vs "
        f"{sum(s.outcome == 'promoted' for s in unprot.steps[1:])} of {len(prot.steps) - 1} "
        "retrains."
    )
    if scenario.name == "none":
        return (
            f"summary: after round {last_p.label}, false alarms on the {last_p.fault_rows} new "
            f"rows: v1 {pct(last_p.v1_alarmed)}, protected {pct(last_p.alarmed)}, unprotected "
            f"{pct(last_u.alarmed)}; {promoted}"
        )
    return (
        f"summary: after round {last_p.label}, of the {last_p.fault_rows} fault rows v1 "
        f"alarms on {pct(last_p.v1_alarmed)}, the protected current model on "
        f"{pct(last_p.alarmed)} (newest round {pct(last_p.alarmed_new)}), the unprotected "
        f"one on {pct(last_u.alarmed)} (newest round {pct(last_u.alarmed_new)}); {promoted}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, the ort backend only")
    parser.add_argument("--rounds", type=int, help="retrains after v1 (default 8, --quick 3)")
    parser.add_argument("--backends", help="comma-separated (default ort,numpy; --quick ort)")
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--seed", type=int, default=0, help="the demo plant's seed")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument(
        "--promote",
        choices=("if-better", "always"),
        default="if-better",
        help="model.promote (default: the default, if-better)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 8)
    backends = (args.backends or ("ort" if args.quick else "ort,numpy")).split(",")
    wanted = args.scenarios.split(",")
    scenarios = [s for s in SCENARIOS if s.name in wanted]
    # The training child imports training.job's module: bench/ must be on its path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    started = time.monotonic()
    results: dict[tuple[str, str, str], RunResult] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.jobs) as pool,
    ):
        futures = {
            pool.submit(run, s, b, m, rounds, args.seed, args.promote, Path(tmp)): (s.name, b, m)
            for s in scenarios
            for b in backends
            for m in MODES
        }
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results[futures[future]] = r
            print(f"{r.scenario} {r.backend} {r.mode}: {r.seconds:.0f}s", file=sys.stderr)
    print(
        f"{len(scenarios)} scenario(s) x {len(backends)} backend(s) x 2 modes, {rounds} rounds "
        f"of {ROUND_ROWS} rows after {BASE_ROWS} normal rows (demo plant, seed {args.seed}), "
        f"model.promote = {args.promote!r}, smocsd {smocsd.__version__}; "
        "alarmed = share of fault rows whose window the current model calls anomalous "
        "(all so far / newest round)\n"
    )
    for s in scenarios:
        for b in backends:
            print("\n".join(table(s, b, {m: results[s.name, b, m] for m in MODES})))
            print()
    print(f"took {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
