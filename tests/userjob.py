"""User TrainingJobs for the tests, loaded as training.job = "userjob:ClassName"."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from smocsd import Saved, TrainingJob


class RecordingJob(TrainingJob):
    """Appends each hook's name (and what it was given) to job_options["log"]."""

    def _record(self, event: str, **detail) -> None:
        with Path(self.config.job_options["log"]).open("a") as f:
            f.write(json.dumps({"hook": event, **detail}) + "\n")

    def build_model(self) -> None:
        self._record(
            "build_model",
            has_db=self.db_manager is not None,
            state_dir=str(self.state_dir),
            logger=self.logger.name,
        )

    def get_training_data(self):
        rows = self.db_manager.count_after(self.state.get("seen"))
        self._record("get_training_data", rows=rows)
        if self.config.job_options.get("skip"):
            self.skip_reason = "told to skip"
            return None
        return list(range(rows))

    def train_model(self, data) -> dict:
        self._record("train_model", n=len(data))
        fail = self.config.job_options.get("fail")
        if fail == "train":
            raise RuntimeError("boom in train_model")
        if fail in ("SIGSEGV", "SIGKILL"):  # a crash in native code; the OOM killer
            os.kill(os.getpid(), getattr(signal, fail))
        if fail == "exit":
            os._exit(3)
        if fail == "hang":  # e.g. a dead NFS mount: no progress, no exception
            time.sleep(3600)
        self.trained = len(data)
        if fail == "nan":
            return {"n": self.trained, "loss": float("nan"), "peak": float("inf")}
        return {"n": self.trained}

    def eval_model(self) -> dict:
        self._record("eval_model")
        return {"score": 0.5}

    def save_model(self, model_metrics: dict, eval_results: dict):
        self._record("save_model", metrics=model_metrics, eval=eval_results)
        self.state["seen"] = self.trained
        outcome = self.config.job_options.get("outcome", "promoted")
        if self.config.job_options.get("typed"):  # the dataclass, not the contract's dict
            return Saved(7, outcome, {"kind": "recording"})
        return {"version": 7, "outcome": outcome, "model_meta": {"kind": "recording"}}
