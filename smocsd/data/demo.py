"""Simulated plant readings, so the default config trains with no other software, and a
labelled benchmark for detection.

One machine, sampled every 10 s, with three channels (temperature, vibration, current).
The data looks like a real gateway's, warts included, because a detector tuned on clean
synthetic data says little about the plant:

* **Process.** A daily temperature cycle; load steps every 20-120 minutes that move
  current, vibration and temperature together, smoothed by the machine's inertia
  (first-order lag, 5 min); a 10-minute vibration oscillation; sensor noise
  (standard deviations `NOISE`: 0.3 °C, 0.04, 0.25 A).
* **Regimes** (normal, `label = 0`). A day/night duty pattern: night shifts (22:00-06:00
  UTC) run mostly at low load, day shifts mostly at medium or high load; and recipes,
  3-12 hour spells at a different setpoint (temperature +2 °C or -1.5 °C, with matching
  small shifts of current and vibration), approached with a 15-minute lag. A day of data
  contains most of them, so a model trained on it has seen them.
* **Start-up drift** (normal). After a (re)start the machine is cold: temperature starts
  up to 8 °C low and settles exponentially (time constant 20 min, so within 1.5-2 h),
  vibration starts up to 0.12 high (12 min), and the load ramps up from zero. The first
  rows of the timeline are such a start-up.
* **Time gaps.** Now and then (about 0.75 per `BLOCK` rows) the gateway records nothing
  for 5-60 minutes and `ts` jumps; the daily cycle moves on with wall time, the load is
  in a new step afterwards, and in 40 % of the gaps the machine was stopped too, so a
  start-up drift follows whose size depends on how long it cooled down.
* **Sensor dropouts** (data quality, not process: `label = 0`). Spans of 2-30 rows
  (20 s to 5 min) in which one channel reads NaN, written to SQLite as NULL; about two
  per `BLOCK` rows.
* **Anomalies** (`label = 1`, exactly on the rows they change), about one per 8000 rows,
  lasting 3-15 minutes: vibration bursts (bearing fault), current sag or dropout while
  the load stays (supply fault), a stuck temperature sensor (frozen at its value at
  onset, with vibration rising), an overheating drift (temperature ramps up). A third
  are subtle, 0.3-3 standard deviations of the channel noise; the rest are 0.3-1.2 times
  the clear-cut sizes (vibration +1.5, current -80 %, temperature +15 °C). Dropouts keep
  60 rows away from anomalies, gaps 60 rows, so a window of up to 50 rows that covers
  an anomaly is never cut by them.

Everything is a function of (seed, row index): the timeline is cut into blocks of
`BLOCK` rows whose events and noise come from their own random streams, so the same
rows come out however they are split across calls, and running `write` again appends
rows that continue the same timeline, which is how "new data arriving" looks to the
daemon. Generation is vectorized: a million rows take well under a few seconds.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import sqlite_utils

SAMPLE_S = 10.0
DAY_S = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CHANNELS = ("temperature", "vibration", "current")
NOISE = np.array([0.3, 0.04, 0.25])  # per-channel noise standard deviation
BLOCK = 8000  # rows per block of events; also the mean spacing of anomalies

_LOAD_LEVELS = np.array([0.3, 0.6, 0.9])
_DAY_P = np.array([0.2, 0.45, 0.35])  # load level probabilities 06:00-22:00
_NIGHT_P = np.array([0.6, 0.3, 0.1])  # 22:00-06:00
_FLAT_P = np.full(3, 1 / 3)  # regimes off: the old uniform load steps
_RECIPES = np.array([[0.0, 0.0, 0.0], [2.0, 0.05, 0.6], [-1.5, -0.03, -0.4]])  # T, V, C
_RECIPE_P = [0.6, 0.25, 0.15]
_TAU_LOAD, _TAU_RECIPE, _TAU_COOL = 300.0, 900.0, 1800.0  # seconds
_COLD_T, _TAU_T = -8.0, 1200.0  # start-up: temperature offset when cold, settling
_COLD_V, _TAU_V = 0.12, 720.0  # vibration
_MARGIN = 60  # rows kept between an anomaly and a dropout or gap
_NOISE, _LOAD, _RECIPE, _GAPS, _DROPS, _ANOMALY = range(6)  # random streams


def _rng(seed: int, block: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, block, seed % 2**63])


@dataclass(frozen=True)
class _Events:
    """What happens in one block of rows; positions are global row indices."""

    anomalies: tuple[tuple[int, int, int, bool, float, np.ndarray], ...]  # start, n, kind, …
    gap_pos: np.ndarray  # first row after the gap
    gap_dur: np.ndarray  # int64 seconds missing
    gap_stop: np.ndarray  # the machine was stopped during the gap
    gap_u: np.ndarray  # uniform draw for the load level after the gap
    load_start: np.ndarray  # load steps (the first at the block start)
    load_u: np.ndarray
    recipe_start: np.ndarray  # recipe spells (the first at the block start)
    recipe: np.ndarray
    drops: tuple[tuple[int, int, int], ...]  # start, n, channel


@lru_cache(maxsize=65536)
def _events(seed: int, k: int) -> _Events:
    lo = k * BLOCK
    rng = _rng(seed, k, _ANOMALY)
    anomalies = []
    for slot in (lo, lo + BLOCK // 2):  # two slots, each with an anomaly half the time
        present, n, kind = rng.random() < 0.5, int(rng.integers(18, 91)), int(rng.integers(4))
        start = slot + int(rng.integers(2 * _MARGIN, BLOCK // 2 - 2 * _MARGIN - n))
        subtle = bool(rng.random() < 1 / 3)
        size = (
            math.exp(rng.uniform(math.log(0.3), math.log(3.0))) if subtle else rng.uniform(0.3, 1.2)
        )
        shape = rng.random(n)
        if present:
            anomalies.append((start, n, kind, subtle, size, shape))
    spans = [(s - _MARGIN, s + n + _MARGIN) for s, n, *_ in anomalies]

    def clear(start: int, n: int = 1) -> bool:
        return all(start + n <= a or start >= b for a, b in spans)

    rng = _rng(seed, k, _GAPS)
    count = int(rng.poisson(0.75))
    pos = rng.integers(max(lo, 1), lo + BLOCK, size=count)
    dur = 10 * np.round(np.exp(rng.uniform(math.log(30), math.log(360), size=count))).astype(
        np.int64
    )
    stop, gap_u = rng.random(count) < 0.4, rng.random(count)
    keep = np.array([clear(int(p)) for p in pos], bool)
    pos, order = np.unique(pos[keep], return_index=True)
    dur, stop, gap_u = dur[keep][order], stop[keep][order], gap_u[keep][order]

    rng = _rng(seed, k, _LOAD)
    steps = rng.integers(120, 721, size=BLOCK // 120 + 1)
    load_start = lo + np.concatenate([[0], np.cumsum(steps)])
    load_start = load_start[load_start < lo + BLOCK]
    load_u = rng.random(len(steps) + 1)[: len(load_start)]

    rng = _rng(seed, k, _RECIPE)
    spells = rng.integers(1080, 4321, size=BLOCK // 1080 + 1)
    recipe_start = lo + np.concatenate([[0], np.cumsum(spells)])
    recipe_start = recipe_start[recipe_start < lo + BLOCK]
    recipe = rng.choice(len(_RECIPES), size=len(spells) + 1, p=_RECIPE_P)[: len(recipe_start)]

    rng = _rng(seed, k, _DROPS)
    drops = []
    for _ in range(int(rng.poisson(2.0))):
        n = round(math.exp(rng.uniform(math.log(2), math.log(30))))
        start, channel = lo + int(rng.integers(0, BLOCK - n)), int(rng.choice(3, p=[0.4, 0.3, 0.3]))
        if clear(start, n):
            drops.append((start, n, channel))
    return _Events(
        tuple(anomalies),
        pos,
        dur,
        stop,
        gap_u,
        load_start,
        load_u,
        recipe_start,
        recipe,
        tuple(drops),
    )


_offsets: dict[int, list[int]] = {}  # seed -> seconds of gaps before block k, for k = 0, 1, …


def _offset_before(seed: int, k: int) -> int:
    acc = _offsets.setdefault(seed, [0])
    while len(acc) <= k:
        acc.append(acc[-1] + int(_events(seed, len(acc) - 1).gap_dur.sum()))
    return acc[k]


def _gaps(seed: int, k0: int, k1: int, on: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gap positions, durations and stop flags in blocks k0..k1."""
    if not on:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    ev = [_events(seed, k) for k in range(k0, k1 + 1)]
    return (
        np.concatenate([e.gap_pos for e in ev]),
        np.concatenate([e.gap_dur for e in ev]),
        np.concatenate([e.gap_stop for e in ev]),
    )


def _ts(seed: int, idx: np.ndarray, gaps: bool) -> np.ndarray:
    """Timestamps of global rows `idx`: 10 s apart, plus every gap at or before them."""
    if len(idx) == 0:
        return np.zeros(0)
    k0, k1 = int(idx.min()) // BLOCK, int(idx.max()) // BLOCK
    pos, dur, _ = _gaps(seed, k0, k1, gaps)
    base = _offset_before(seed, k0) if gaps else 0
    cum = base + np.concatenate([[0], np.cumsum(dur)])
    seconds = np.int64(SAMPLE_S) * idx + cum[np.searchsorted(pos, idx, side="right")]
    return T0 + seconds.astype(np.float64)  # integers below 2**53: exact


def _lag(
    starts: np.ndarray,
    levels: np.ndarray,
    ts0: np.ndarray,
    reset: np.ndarray,
    v: np.ndarray,
    tau: float,
) -> np.ndarray:
    """Value at each segment start of a first-order lag following piecewise-constant
    `levels`; it starts at `v`, and at `reset` segments at zero."""
    out = np.empty_like(levels)
    for j in range(len(starts)):
        if j:
            prev = levels[j - 1]
            v = prev + (v - prev) * math.exp(-(ts0[j] - ts0[j - 1]) / tau)
        if reset[j]:
            v = np.zeros_like(v)
        out[j] = v
    return out


@lru_cache(maxsize=4096)
def _load_table(
    seed: int, k: int, startup: bool, regimes: bool, gaps: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load steps starting in block k: start row, level, lagged value at start, ts at start.

    The lag is run from the start of block k-1 (from a cold start at row 0), so a block's
    values never depend on where a call began."""
    k0 = max(k - 1, 0)
    starts, us, resets = [], [], []
    for j in range(k0, k + 1):
        ev = _events(seed, j)
        gap_pos = ev.gap_pos if gaps else ev.gap_pos[:0]
        keep = ~np.isin(ev.load_start, gap_pos)
        starts += [ev.load_start[keep], gap_pos]
        us += [ev.load_u[keep], ev.gap_u[: len(gap_pos)]]
        resets += [np.zeros(keep.sum(), bool), ev.gap_stop[: len(gap_pos)] & startup]
    start = np.concatenate(starts)
    order = np.argsort(start, kind="stable")
    start, u, reset = start[order], np.concatenate(us)[order], np.concatenate(resets)[order]
    ts0 = _ts(seed, start, gaps)
    if regimes:
        hour = (ts0 % DAY_S) / 3600
        night = (hour >= 22) | (hour < 6)
        cdf = np.where(night[:, None], np.cumsum(_NIGHT_P), np.cumsum(_DAY_P))
    else:
        cdf = np.broadcast_to(np.cumsum(_FLAT_P), (len(start), 3))
    level = _LOAD_LEVELS[np.minimum((u[:, None] >= cdf).sum(axis=1), 2)]
    cold = k0 == 0 and startup
    v0 = _lag(start, level[:, None], ts0, reset, np.array([0.0 if cold else level[0]]), _TAU_LOAD)
    mine = start >= k * BLOCK
    return start[mine], level[mine], v0[mine, 0], ts0[mine]


@lru_cache(maxsize=4096)
def _recipe_table(
    seed: int, k: int, gaps: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Recipe spells starting in block k: start row, offsets (T, V, C), lagged offsets, ts."""
    k0 = max(k - 1, 0)
    ev = [_events(seed, j) for j in range(k0, k + 1)]
    start = np.concatenate([e.recipe_start for e in ev])
    level = _RECIPES[np.concatenate([e.recipe for e in ev])]
    ts0 = _ts(seed, start, gaps)
    v0 = _lag(start, level, ts0, np.zeros(len(start), bool), level[0], _TAU_RECIPE)
    mine = start >= k * BLOCK
    return start[mine], level[mine], v0[mine], ts0[mine]


def _follow(tables: list[tuple], idx: np.ndarray, ts: np.ndarray, tau: float) -> np.ndarray:
    """The lagged piecewise-constant signal of `tables` (one per block) at rows idx."""
    start, level, v0, ts0 = (np.concatenate(parts) for parts in zip(*tables, strict=True))
    j = np.searchsorted(start, idx, side="right") - 1
    decay = np.exp(-(ts - ts0[j]) / tau)
    if level.ndim == 2:
        decay = decay[:, None]
    return level[j] + (v0[j] - level[j]) * decay


def simulate(
    rows: int,
    start_index: int = 0,
    seed: int = 0,
    anomalies: bool = True,
    *,
    realism: bool = True,
    startup: bool | None = None,
    regimes: bool | None = None,
    dropouts: bool | None = None,
    gaps: bool | None = None,
) -> dict[str, np.ndarray]:
    """Rows start_index .. start_index+rows-1 of the timeline of `seed`.

    Returns float64 arrays `ts` (epoch seconds), `temperature`, `vibration`, `current`
    (NaN during a sensor dropout) and int64 `label` (1 on injected anomalies).

    `anomalies=False` leaves the anomalies out (all labels 0). The keyword-only switches
    turn the realistic effects off one by one: `startup` (start-up drift and load ramp
    after a start), `regimes` (day/night duty and recipes; load steps stay, uniformly),
    `dropouts` (NaN spans), `gaps` (`ts` jumps; without them no restart follows row 0).
    Each defaults to `realism`, so `realism=False` gives the plain process with
    anomalies. A switch never moves the other events: the anomalies are at the same
    rows with every combination.
    """
    if rows < 0 or start_index < 0:
        raise ValueError("rows and start_index must not be negative")
    startup, regimes, dropouts, gaps = (
        realism if flag is None else flag for flag in (startup, regimes, dropouts, gaps)
    )
    if rows == 0:
        empty = np.zeros(0)
        return {"ts": empty, **{c: empty.copy() for c in CHANNELS}, "label": np.zeros(0, np.int64)}
    a, b = start_index, start_index + rows
    k1 = (b - 1) // BLOCK
    # Anomalies last at most 90 rows: the rows from the start of one that began before
    # `a` are evaluated too, so that a stuck sensor freezes at the same value.
    lo = max(0, a - 100)
    idx = np.arange(lo, b)
    ts = _ts(seed, idx, gaps)

    noise = np.concatenate(
        [_rng(seed, k, _NOISE).standard_normal((BLOCK, 3)) for k in range(lo // BLOCK, k1 + 1)]
    )
    noise = noise[lo - (lo // BLOCK) * BLOCK :][: len(idx)] * NOISE
    blocks = range(lo // BLOCK, k1 + 1)
    load = _follow(
        [_load_table(seed, k, startup, regimes, gaps) for k in blocks], idx, ts, _TAU_LOAD
    )
    if regimes:
        recipe = _follow([_recipe_table(seed, k, gaps) for k in blocks], idx, ts, _TAU_RECIPE)
    else:
        recipe = np.zeros((len(idx), 3))
    warm_t = warm_v = 0.0
    if startup:  # restarts: row 0 (from cold) and the gaps during which the machine stopped
        # A restart more than a block back has settled to far below a float's resolution:
        # only those since the block before are looked at (row 0 counts only from there).
        first = max(lo // BLOCK - 1, 0)
        pos, dur, stop = _gaps(seed, first, k1, gaps)
        r_pos = np.concatenate([[0], pos[stop]])
        cold = np.concatenate([[1.0 if first == 0 else 0.0], -np.expm1(-dur[stop] / _TAU_COOL)])
        r = np.searchsorted(r_pos, idx, side="right") - 1
        r_ts = np.concatenate([[T0], _ts(seed, r_pos[1:], gaps)])
        since = ts - r_ts[r]
        warm_t = _COLD_T * cold[r] * np.exp(-since / _TAU_T)
        warm_v = _COLD_V * cold[r] * np.exp(-since / _TAU_V)

    day = np.sin(2 * np.pi * ((ts % DAY_S) / DAY_S - 0.25))
    spin = np.sin(2 * np.pi * (ts % 600.0) / 600.0)
    temperature = 45 + 6 * day + 12 * load + recipe[:, 0] + warm_t + noise[:, 0]
    vibration = 0.4 + 1.2 * load + 0.15 * spin + recipe[:, 1] + warm_v + noise[:, 1]
    current = 8 + 14 * load + recipe[:, 2] + noise[:, 2]
    label = np.zeros(len(idx), np.int64)

    events = [_events(seed, k) for k in range(max(lo // BLOCK - 1, 0), k1 + 1)]
    if anomalies:
        for start, n, kind, subtle, size, shape in (x for e in events for x in e.anomalies):
            i, j = start - lo, start + n - lo
            if j <= 0 or i >= len(idx):
                continue
            assert i >= 0, "an anomaly began before the rows evaluated"
            s = slice(i, min(j, len(idx)))
            m = len(idx[s])
            if kind == 0:  # bearing fault: vibration bursts
                amp = size * NOISE[1] if subtle else 1.5 * size
                vibration[s] += amp * (0.5 + shape[:m])
            elif kind == 1:  # supply fault: current sags or collapses while the load stays
                current[s] -= size * NOISE[2] if subtle else 0.8 * min(size, 1.15) * current[s]
            elif kind == 2:  # stuck temperature sensor, while vibration rises
                temperature[s] = temperature[i]
                vibration[s] += size * NOISE[1] if subtle else 0.6 * size
            else:  # overheating drift: a ramp that ends at twice the size
                top = 2 * size * NOISE[0] if subtle else 15 * size
                temperature[s] += np.linspace(top / n, top, n)[:m]
            label[s] = 1
    channels = [temperature, vibration, current]
    if dropouts:
        for start, n, channel in (x for e in events for x in e.drops):
            i, j = max(start - lo, 0), min(start + n - lo, len(idx))
            if i < j:
                channels[channel][i:j] = np.nan
    cut = a - lo
    out = {"ts": ts[cut:]}
    out.update((name, values[cut:]) for name, values in zip(CHANNELS, channels, strict=True))
    out["label"] = label[cut:]
    return out


def write(db_path: Path, rows: int, seed: int = 0, table: str = "readings", **options) -> int:
    """Creates or extends the demo table; returns the number of rows now in it.

    The new rows continue the timeline after the rows already in the table (one row per
    id, as this function writes them); NaN (a sensor dropout) is written as NULL.
    `options` are `simulate`'s keyword-only switches.
    """
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # as ingest software would, so readers never block
        db = sqlite_utils.Database(conn)
        t = db[table]
        if not t.exists():
            t.create(
                {
                    "id": int,
                    "ts": float,
                    "temperature": float,
                    "vibration": float,
                    "current": float,
                    "label": int,
                },
                pk="id",
            )
        existing = t.count
        data = simulate(rows, start_index=existing, seed=seed, **options)
        columns = ["ts", *CHANNELS, "label"]
        values = [
            [None if v != v else v for v in data[c].tolist()] if c in CHANNELS else data[c].tolist()
            for c in columns
        ]
        names = ", ".join(f"[{c}]" for c in columns)
        with conn:
            conn.executemany(
                f"INSERT INTO [{table}] ({names}) VALUES ({', '.join('?' * len(columns))})",
                zip(*values, strict=True),
            )
        return t.count
    finally:
        conn.close()
