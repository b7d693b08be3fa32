"""The built-in job with a pause, loaded as training.job = "pausingjob:PausingJob".

Its own module, not tests/userjob.py: it imports the built-in job (numpy, ONNX Runtime),
which the tests of userjob's light jobs should not pay for.
"""

from __future__ import annotations

import time
from pathlib import Path

from smocsd.training.autoencoder import AutoencoderJob


class PausingJob(AutoencoderJob):
    """Trains and evaluates as the built-in job, then creates job_options["paused"] and
    waits for job_options["resume"] to exist before it saves: a test acts at a known
    point of a cycle, between its training and its save, whatever the machine's speed."""

    def save_model(self, model_metrics: dict, eval_results: dict) -> dict:
        paused = Path(self.config.job_options["paused"])
        if paused.is_dir():  # several models: a file each, named by the model
            paused = paused / self.config.model.name
        paused.touch()
        resume = Path(self.config.job_options["resume"])
        while not resume.exists():
            self.progress.between_batches()  # honours a stop; counts as progress
            time.sleep(0.05)
        return super().save_model(model_metrics, eval_results)
