"""Simulated plant readings, so the default config trains with no other software.

A machine sampled every 10 s: a daily temperature cycle, load changes that move
current and vibration together, sensor noise, and a few injected anomalies
(vibration bursts, a current dropout, a stuck temperature sensor, a slow drift).
Rows with `label = 1` are the injected anomalies; `label` is not a channel.
Running it again appends rows that continue the same timeline, which is how
"new data arriving" looks to the daemon.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import sqlite_utils

SAMPLE_S = 10.0
DAY_S = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def simulate(rows: int, start_index: int = 0, seed: int = 0, anomalies: bool = True) -> dict:
    """Columns ts, temperature, vibration, current, label for rows start_index.. ."""
    rng = np.random.default_rng(seed + start_index)
    t = T0 + (start_index + np.arange(rows)) * SAMPLE_S
    # Load: piecewise-constant regimes of 20-120 minutes, smoothed by the machine's inertia.
    steps = np.repeat(
        rng.choice([0.3, 0.6, 0.9], size=rows // 120 + 2),
        rng.integers(120, 720, size=rows // 120 + 2),
    )[:rows]
    if len(steps) < rows:
        steps = np.pad(steps, (0, rows - len(steps)), mode="edge")
    load = np.convolve(np.pad(steps, (29, 0), mode="edge"), np.ones(30) / 30, mode="valid")
    day = np.sin(2 * np.pi * ((t % DAY_S) / DAY_S - 0.25))
    temperature = 45 + 6 * day + 12 * load + rng.normal(0, 0.3, rows)
    vibration = 0.4 + 1.2 * load + 0.15 * np.sin(2 * np.pi * t / 600) + rng.normal(0, 0.04, rows)
    current = 8 + 14 * load + rng.normal(0, 0.25, rows)
    label = np.zeros(rows, np.int64)
    if anomalies and rows >= 2000:
        for _ in range(max(1, rows // 8000)):
            kind = rng.integers(4)
            i = int(rng.integers(200, rows - 400))
            n = int(rng.integers(20, 90))
            if kind == 0:  # bearing fault: vibration bursts
                vibration[i : i + n] += rng.normal(1.5, 0.6, n)
            elif kind == 1:  # supply dropout: current collapses while load stays
                current[i : i + n] *= 0.2
            elif kind == 2:  # stuck temperature sensor
                temperature[i : i + n] = temperature[i]
                vibration[i : i + n] += 0.6
            else:  # overheating drift
                temperature[i : i + n] += np.linspace(0, 15, n)
            label[i : i + n] = 1
    return {
        "ts": t,
        "temperature": temperature,
        "vibration": vibration,
        "current": current,
        "label": label,
    }


def write(db_path: Path, rows: int, seed: int = 0, table: str = "readings") -> int:
    """Creates or extends the demo table; returns the number of rows now in it."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # as ingest software would, so readers never block
        db = sqlite_utils.Database(conn)
        t = db[table]
        existing = t.count if t.exists() else 0
        data = simulate(rows, start_index=existing, seed=seed)
        columns = list(data)
        records = (
            dict(zip(columns, values, strict=True))
            for values in zip(*(data[c].tolist() for c in columns), strict=True)
        )
        t.insert_all(
            records,
            pk="id",
            columns={
                "id": int,
                "ts": float,
                "temperature": float,
                "vibration": float,
                "current": float,
                "label": int,
            },
            batch_size=5000,
        )
        return t.count
    finally:
        conn.close()
