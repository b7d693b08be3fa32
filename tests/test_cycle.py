"""The training cycle: the five hooks in order, gating, promotion, failures and the outbox."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import smocsd, write_config

from smocsd import TrainingJob
from smocsd.app import cycle as cycle_mod
from smocsd.common import config
from smocsd.common.modelmeta import ModelMeta
from smocsd.common.modelmeta import load as load_meta
from smocsd.data import demo
from smocsd.delivery.outbox import Outbox
from smocsd.store import ModelStore


@pytest.fixture
def clean_plant(tmp_path):
    """As `plant`, without the demo's sensor dropouts and time gaps: exact row and window counts."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000, dropouts=False, gaps=False)
    return state, write_config(tmp_path / "smocsd.toml", state)


def load(path, **sections):
    """The config at `path` with some keys of some sections replaced."""
    cfg = config.load(path)
    for name, changes in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **changes)})
    return cfg


def cycle(cfg, force=False) -> dict:
    """One real cycle (its hooks in a child process); the message it queued or its skip."""
    outbox = Outbox(cfg.state_dir / "outbox.db")
    try:
        result, queued = cycle_mod.run(cfg, outbox, force=force)
    finally:
        outbox.close()
    assert queued
    return result.message(cfg)


def trained_on_demo(plant, more_rows: int, score: str = "channel-max") -> tuple[Path, dict]:
    """`plant` with `more_rows` demo rows more, trained on them all: (current's dir, metadata)."""
    state, path = plant
    demo.write(state / "readings.db", more_rows)
    cfg = load(path, training={"max_rows": 3000 + more_rows, "epochs": 8}, model={"score": score})
    assert cycle(cfg, force=True)["outcome"] == "promoted"
    model_dir = state / "models/autoencoder/current"
    return model_dir, json.loads((model_dir / "metadata.json").read_text())


def recording_job(tmp_path, state, **options) -> Path:
    """A config running tests/userjob.py's RecordingJob, which logs its hooks to `hooks.jsonl`."""
    return write_config(
        tmp_path / "user.toml",
        state,
        training={"job": "userjob:RecordingJob"},
        job={"log": str(tmp_path / "hooks.jsonl"), **options},
    )


def hooks(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "hooks.jsonl").read_text().splitlines()]


def test_user_job_hooks_run_in_order_and_their_results_are_published(tmp_path, plant):
    state, _ = plant
    cfg_path = recording_job(tmp_path, state)
    proc = smocsd("train-once", config=cfg_path, check=True)
    result = json.loads(proc.stdout)
    called = hooks(tmp_path)
    assert [h["hook"] for h in called] == [
        "build_model",
        "get_training_data",
        "train_model",
        "eval_model",
        "save_model",
    ]
    assert called[0] == {
        "hook": "build_model",
        "has_db": True,
        "state_dir": str(state),
        "logger": "smocsd.job.autoencoder",
    }
    assert called[1]["rows"] == 3000 and called[2]["n"] == 3000
    assert called[4]["metrics"] == {"n": 3000} and called[4]["eval"] == {"score": 0.5}
    assert result["outcome"] == "promoted" and result["version"] == 7
    assert result["metrics"] == {"n": 3000} and result["eval"] == {"score": 0.5}
    assert result["model_meta"] == {"kind": "recording"}
    # the very object printed is the one waiting in the outbox
    waiting = json.loads(smocsd("outbox", "list", "--json", config=cfg_path, check=True).stdout)
    assert waiting == [result]
    # the job's state is kept for the next cycle: only new rows are seen
    demo.write(state / "readings.db", 10)
    smocsd("train-once", config=cfg_path, check=True)
    assert hooks(tmp_path)[-4]["rows"] == 10


def test_a_failing_hook_is_published_as_failed_and_state_is_not_committed(tmp_path, plant):
    state, _ = plant
    path = recording_job(tmp_path, state, fail="train")
    proc = smocsd("train-once", config=path)
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["outcome"] == "failed"
    assert result["error"] == "RuntimeError: boom in train_model"
    assert "boom in train_model" in proc.stderr
    assert hooks(tmp_path)[-1]["hook"] == "train_model"
    waiting = json.loads(smocsd("outbox", "list", "--json", config=path, check=True).stdout)
    assert [m["outcome"] for m in waiting] == ["failed"]
    # nothing was committed, so the next cycle sees the same rows again
    smocsd("train-once", config=recording_job(tmp_path, state), check=True)
    assert hooks(tmp_path)[-4]["rows"] == 3000


def test_skipping_is_not_published(tmp_path, plant):
    state, _ = plant
    path = recording_job(tmp_path, state, skip=True)
    proc = smocsd("train-once", config=path, check=True)
    assert json.loads(proc.stdout) == {"outcome": "skipped", "reason": "told to skip"}
    assert json.loads(smocsd("outbox", "list", "--json", config=path).stdout) == []


def test_gating_first_training_new_rows_and_interval(tmp_path, plant):
    state, path = plant
    cfg = load(path, training={"min_training_samples": 5000, "max_rows": 8000})
    first = cycle(cfg)
    assert first == {
        "outcome": "skipped",
        "reason": "3000 rows of 5000 needed for the first training",
    }
    assert cycle(cfg, force=True)["outcome"] == "skipped"  # --force keeps min_training_samples

    cfg = load(path, training={"min_interval": 3600.0})
    assert cycle(cfg)["outcome"] == "promoted"
    assert cycle(cfg)["reason"] == "0 new rows of 500 needed"
    demo.write(state / "readings.db", 500)
    assert re.fullmatch(r"last training \d+s ago, min_interval is 3600s", cycle(cfg)["reason"])
    cfg = load(path)  # min_interval 0
    assert cycle(cfg)["outcome"] in ("promoted", "rejected")
    demo.write(state / "readings.db", 499)
    assert cycle(cfg)["reason"] == "499 new rows of 500 needed"
    assert cycle(cfg, force=True)["outcome"] in ("promoted", "rejected")
    demo.write(state / "readings.db", 500)
    assert cycle(cfg)["outcome"] in ("promoted", "rejected")


def test_result_and_metadata_follow_the_contract(tmp_path, clean_plant):
    state, path = clean_plant
    result = cycle(load(path))
    assert set(result) == {
        "schema",
        "message_id",
        "device_id",
        "model",
        "version",
        "outcome",
        "timestamp",
        "metrics",
        "eval",
        "model_meta",
    }
    assert result["schema"] == "smocsd.training-result/1"
    assert result["device_id"] == "gw-test" and result["version"] == 1
    meta = json.loads((state / "models/autoencoder/current/metadata.json").read_text())
    assert meta == result["model_meta"]
    assert meta["format"] == "smocsd.model/1" and meta["version"] == 1
    assert meta["channels"] == ["temperature", "vibration", "current"]
    assert meta["window_size"] == 10 and meta["stride"] == 1
    assert meta["input_name"] == "input" and meta["output_name"] == "reconstruction"
    assert meta["data"]["rows"] == 3000 and meta["data"]["last_order"] == 3000
    assert meta["data"]["windows"] == 3000 - 10 + 1
    assert set(meta["metrics"]) >= {"train_loss", "val_loss", "epochs_run", "duration_s"}
    assert set(meta["eval"]) >= {"val_score_p50", "val_score_p99", "previous_val_loss"}
    onnx_file = state / "models/autoencoder/v000001/model.onnx"
    assert meta["files"]["model.onnx"] == {
        "sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
        "bytes": onnx_file.stat().st_size,
    }
    fit = meta["threshold_fit"]
    assert fit["method"] == "lognormal-tolerance" and fit["false_alarm_rate"] == 0.0001
    assert meta["threshold"] == pytest.approx(
        math.exp(fit["log_median"] + fit["k"] * fit["log_scale"])
    )
    assert (
        meta["threshold"]
        == meta["eval"]["threshold"]
        > meta["score_quantiles"]["validation"]["p50"]
    )
    level = meta["alarm"].pop("level")  # fitted on the training rows, one limit a channel
    assert (level["gap"], level["baseline"]) == (100, 50) and len(level["limit"]) == 3
    assert all(0 < limit < 10 for limit in level["limit"])
    assert meta["alarm"] == {
        "kind": "k-of-n",
        "above": 2,
        "of": 3,
        "sustained": {"above": 20, "of": 30, "level": 1.25},
    }
    assert meta["time"]["interval_s"] == 10.0 and meta["time"]["max_gap_s"] == 30.0
    assert set(meta["channel_error"]) == set(meta["channels"])
    assert sum(c["share"] for c in meta["channel_error"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("score", ["channel-max", "mse"])
def test_the_model_is_usable_with_onnxruntime_and_numpy_alone(tmp_path, plant, score):
    """Scores unseen plant data using only metadata.json, model.onnx and onnxruntime, with
    the default score and with "mse", the score of every model saved before it."""
    import onnxruntime as ort

    model_dir, meta = trained_on_demo(plant, 27000, score)
    assert meta["score"] == score and ("channel_scale" in meta) == (score == "channel-max")
    assert ("sustained" in meta["alarm"]) == (score == "channel-max")

    fresh = demo.simulate(20000, start_index=40000, seed=99, dropouts=False, gaps=False)
    x = np.column_stack([fresh[c] for c in meta["channels"]])
    # The README's recipe, line for line.
    numpy, onnxruntime = np, ort
    z = ((x - meta["normalization"]["mean"]) / meta["normalization"]["scale"]).astype("float32")
    w, c = meta["window_size"], len(meta["channels"])
    windows = numpy.lib.stride_tricks.sliding_window_view(z, (w, c))[:, 0].reshape(
        len(z) - w + 1, -1
    )
    recon = onnxruntime.InferenceSession(str(model_dir / "model.onnx")).run(
        None, {meta["input_name"]: windows}
    )[0]
    errors = ((recon - windows) ** 2).reshape(len(windows), w, c).mean(axis=1)
    if meta["score"] == "channel-max":
        errors = errors / numpy.array(meta["channel_scale"], "float32")
        score = errors.max(axis=1)
    else:
        score = errors.mean(axis=1)
    over = score > meta["threshold"]
    above_threshold = over  # the test's own: what Model.score calls `over`
    if "level" in meta["alarm"]:
        g, b, limit = (meta["alarm"]["level"][key] for key in ("gap", "baseline", "limit"))
        sums = numpy.cumsum(numpy.r_[numpy.zeros((1, c)), z], axis=0, dtype="float64")
        now = (sums[w:] - sums[:-w])[g + b :] / w
        before = (sums[b:] - sums[:-b])[: len(now)] / b
        moved = (abs(now - before) > numpy.array(limit)) & (abs(now) > abs(before))
        over = over | numpy.r_[numpy.zeros(g + b, bool), moved.any(axis=1)]
    k, n = meta["alarm"]["above"], meta["alarm"]["of"]
    alarm = numpy.convolve(over, numpy.ones(n, int))[: len(over)] >= k
    if "sustained" in meta["alarm"]:
        k, n, level = (meta["alarm"]["sustained"][key] for key in ("above", "of", "level"))
        high = numpy.cumsum(errors > level, axis=0)
        high[n:] -= high[:-n].copy()
        alarm |= (high >= k).any(axis=1)
    drivers = errors / errors.sum(axis=1, keepdims=True)

    anomalous = np.lib.stride_tricks.sliding_window_view(fresh["label"], w).max(axis=1) == 1
    assert anomalous.sum() > 50
    assert above_threshold[anomalous].mean() > 0.5, above_threshold[anomalous].mean()
    assert above_threshold[~anomalous].mean() < 0.05, above_threshold[~anomalous].mean()
    assert np.allclose(drivers.sum(axis=1), 1, atol=1e-5)
    # smocsd.scoring.Model decides exactly alike.
    from smocsd.scoring import Model

    scored = Model.of(model_dir, ModelMeta.parse(meta)).score(x, fresh["ts"])
    assert scored.end.tolist() == list(range(w - 1, len(x)))
    assert scored.over.tolist() == above_threshold.tolist()
    assert (scored.over | scored.moved).tolist() == over.tolist()
    assert scored.alarm.tolist() == alarm.tolist()
    # The level rule, with either score: the recipe's windows moved are Model.score's.
    assert scored.moved.any()
    assert scored.moved.tolist() == numpy.r_[numpy.zeros(g + b, bool), moved.any(axis=1)].tolist()


def test_if_better_rejects_a_worse_model_and_keeps_current(tmp_path, plant, caplog):
    state, path = plant
    good = load(path, training={"backend": "numpy", "epochs": 10})
    assert cycle(good)["outcome"] == "promoted"
    # a model from another backend (cold start) with a single, tiny step is worse
    worse = load(path, training={"backend": "ort", "epochs": 1, "learning_rate": 1e-6})
    caplog.clear()
    with caplog.at_level("DEBUG"):
        result = cycle(worse, force=True)
    assert result["outcome"] == "rejected", result
    loss, previous = result["eval"]["val_loss"], result["eval"]["previous_val_loss"]
    assert previous < loss
    # the cycle's one line (the training child logs the rest): what it did, and why
    (record,) = [r for r in caplog.records if r.name == "smocsd.app.cycle"]
    line = record.getMessage()
    assert record.levelname == "INFO"
    assert line.startswith(
        f"autoencoder: rejected v2: val_loss {loss:.4g} is worse than v1's {previous:.4g}; "
        "3000 rows ("
    ), line
    assert ", 3/3 epochs, " in line and re.search(r", took [\d.]+s$", line), line
    store = ModelStore(state / "models/autoencoder", 5)
    assert store.current() == 1 and store.versions() == [1, 2]
    always = load(
        path,
        training={"backend": "ort", "epochs": 1, "learning_rate": 1e-6},
        model={"promote": "always"},
    )
    assert cycle(always, force=True)["outcome"] == "promoted"
    assert store.current() == 3


def test_a_rollback_during_a_cycle_wins_over_its_promotion(tmp_path, plant):
    """`models rollback` while a cycle trains: the cycle saves its version `rejected`,
    saying why, and `current` stays where the operator put it."""
    state, _ = plant
    always = write_config(tmp_path / "always.toml", state, model={"promote": "always"})
    for _ in range(2):
        smocsd("train-once", "--force", config=always, check=True)
    store = ModelStore(state / "models/autoencoder", 5)
    assert store.current() == 2
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    pausing = write_config(
        tmp_path / "pausing.toml",
        state,
        model={"promote": "always"},
        training={"job": "pausingjob:PausingJob"},
        job={"paused": str(paused), "resume": str(resume)},
    )
    cmd = [sys.executable, "-m", "smocsd", "train-once", "--force", "--config", str(pausing)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        deadline = time.monotonic() + 120
        while not paused.exists():  # trained v3 and evaluated it against v2
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the cycle never reached save_model"
            time.sleep(0.05)
        rolled = smocsd("models", "rollback", config=always, check=True)
        assert rolled.stdout == "current -> v000001\n"
        resume.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    rejection = "current was moved from v2 to v1 during this cycle (smocsd models rollback)"
    assert (result["outcome"], result["version"]) == ("rejected", 3), result
    assert result["eval"]["rejection"].startswith(rejection)
    assert result["eval"]["previous_version"] == 2  # what it was judged against
    assert store.current() == 1 and store.versions() == [1, 2, 3]
    assert store.check(3) is None  # saved whole, by the same protocol
    meta = store.metadata(3)
    assert (meta.outcome, meta.eval["rejection"]) == ("rejected", result["eval"]["rejection"])
    assert meta.to_json() == result["model_meta"] and meta.result_id == result["message_id"]
    waiting = json.loads(smocsd("outbox", "list", "--json", config=always, check=True).stdout)
    assert [m["message_id"] for m in waiting][-1] == result["message_id"]


def test_bad_rows_never_reach_training_and_are_reported(tmp_path, clean_plant, capfd):
    state, path = clean_plant
    conn = sqlite3.connect(state / "readings.db")
    conn.execute("UPDATE readings SET temperature = NULL WHERE id % 100 = 0")
    conn.execute("UPDATE readings SET vibration = 'n/a' WHERE id = 1501")
    conn.commit()
    conn.close()
    result = cycle(load(path))
    assert result["outcome"] == "promoted"
    assert result["model_meta"]["data"]["dropped_rows"] == 31
    # over 1 % (BAD_SHARE): a failing sensor or ingest, worth a warning
    err = capfd.readouterr().err.splitlines()
    said = [line for line in err if "31 of 3000 rows have NULL, NaN, inf or non-numeric" in line]
    assert len(said) == 1 and " WARNING " in said[0], err
    assert np.isfinite(result["metrics"]["val_loss"])


def test_a_channel_without_values_fails_with_a_clear_error(tmp_path, plant):
    state, path = plant
    conn = sqlite3.connect(state / "readings.db")
    conn.execute("UPDATE readings SET current = NULL")
    conn.commit()
    conn.close()
    result = cycle(load(path))
    assert result["outcome"] == "failed"
    assert result["error"] == "DataError: channel(s) current have no valid value in the rows read"


def test_a_missing_table_fails_the_cycle_with_one_line(tmp_path):
    path = write_config(tmp_path / "c.toml", tmp_path / "state")
    (tmp_path / "state").mkdir()
    sqlite3.connect(tmp_path / "state/readings.db").execute("CREATE TABLE other (x)").close()
    proc = smocsd("train-once", config=path)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"].endswith(
        "readings.db: no such table readings (source.table)"
    )


def test_training_job_is_exported_with_the_five_hooks():
    hooks = {"build_model", "get_training_data", "train_model", "eval_model", "save_model"}
    assert TrainingJob.__abstractmethods__ == hooks


def test_gaps_and_disordered_times_are_reported_and_never_windowed(tmp_path, clean_plant, capfd):
    state, path = clean_plant
    conn = sqlite3.connect(state / "readings.db")
    conn.execute("UPDATE readings SET ts = ts + 3600 WHERE id > 1000")  # an hour offline
    conn.execute("UPDATE readings SET ts = ts - 25 WHERE id = 2000")  # clock stepped back
    conn.execute("UPDATE readings SET ts = NULL WHERE id = 2500")
    conn.commit()
    conn.close()
    result = cycle(load(path))
    assert result["outcome"] == "promoted"
    meta = result["model_meta"]
    assert meta["time"] == {
        "interval_s": 10.0,
        "max_gap_s": 30.0,
        "gaps": 2,  # the hour offline, and the 35 s step after the row set back
        "out_of_order": 1,
        "duplicate_times": 0,
        "rows_without_time": 1,
    }
    # 2991 windows of 10 rows, less 9 across the hour, 10 across the steps before and
    # after the row set back, 10 across the row without a time.
    assert meta["data"]["windows"] == 2991 - 9 - 10 - 10
    log = capfd.readouterr().err  # the training child's log
    assert "goes backwards 1 times and repeats 0 times (first at order value 2000)" in log
    assert "1 rows have no usable 'ts' value" in log


def test_iso_text_times_are_read(tmp_path):
    """A historian's table: text timestamps, column names with spaces and units."""
    state = tmp_path / "state"
    state.mkdir()
    data = demo.simulate(3000, seed=4, dropouts=False, gaps=False)
    conn = sqlite3.connect(state / "plant.db")
    conn.execute('CREATE TABLE readings ("Time Stamp" TEXT, "Temp (°C)" REAL, "Vib RMS" REAL)')
    stamps = np.datetime_as_string(data["ts"].astype("datetime64[s]"), unit="s")
    rows = zip(
        (str(s).replace("T", " ") for s in stamps),
        data["temperature"].tolist(),
        data["vibration"].tolist(),
        strict=True,
    )
    conn.executemany("INSERT INTO readings VALUES (?, ?, ?)", rows)
    conn.commit()
    conn.close()
    path = write_config(
        tmp_path / "c.toml",
        state,
        source={
            "path": "plant.db",
            "time_column": "Time Stamp",
            "channels": ["Temp (°C)", "Vib RMS"],
        },
    )
    result = cycle(config.load(path))
    assert result["outcome"] == "promoted", result
    meta = result["model_meta"]
    assert meta["channels"] == ["Temp (°C)", "Vib RMS"]
    assert meta["time"]["interval_s"] == 10.0 and meta["time"]["gaps"] == 0


def test_scoring_with_the_model_alone_finds_anomalies_and_their_channels(tmp_path, plant):
    """smocsd.scoring.Model is the README's recipe: threshold, alarm rule and channel shares."""
    from smocsd.scoring import Model, shares

    model_dir, meta = trained_on_demo(plant, 17000)
    model = Model.of(model_dir, ModelMeta.parse(meta))
    fresh = demo.simulate(24000, start_index=40000, seed=99, regimes=False)
    x = np.column_stack([fresh[c] for c in model.channels])
    scored = model.score(x, fresh["ts"])
    alarm = scored.row_alarm(len(x))
    normal = fresh["label"] == 0
    assert alarm[normal].mean() < 0.03
    starts = np.flatnonzero(np.diff(fresh["label"], prepend=0) == 1)
    ends = np.flatnonzero(np.diff(fresh["label"], append=0) == -1) + 1
    found = [alarm[a:b].any() for a, b in zip(starts, ends, strict=True)]
    assert len(found) >= 2 and np.mean(found) >= 0.5, found
    # Where the alarm is on inside a vibration burst, vibration drives the error.
    culprit = shares(scored.errors)[scored.alarm]
    assert culprit.shape[1] == 3 and np.allclose(culprit.sum(axis=1), 1, atol=1e-5)


def test_both_backends_make_the_same_decisions(tmp_path):
    """ort trains on x86_64 gateways, numpy on the rest: a fleet must alarm alike."""
    from smocsd.scoring import Model

    fresh = demo.simulate(8000, start_index=20000, seed=7)
    x = np.column_stack([fresh[c] for c in ("temperature", "vibration", "current")])
    decisions = {}
    for backend in ("ort", "numpy"):
        state = tmp_path / backend
        demo.write(state / "readings.db", 3000)
        path = write_config(tmp_path / f"{backend}.toml", state, training={"backend": backend})
        result = cycle(config.load(path))
        assert result["model_meta"]["backend"] == backend
        model_dir = state / "models/autoencoder/current"
        model = Model.of(model_dir, load_meta(model_dir / "metadata.json"))
        decisions[backend] = model.score(x, fresh["ts"])
    ort, np_ = decisions["ort"], decisions["numpy"]
    assert ort.score == pytest.approx(np_.score, rel=1e-3, abs=1e-6)
    assert (ort.over == np_.over).mean() >= 0.999
    assert (ort.alarm == np_.alarm).mean() >= 0.999
