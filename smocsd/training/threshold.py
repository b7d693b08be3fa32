"""The anomaly threshold: an upper tolerance bound on the scores of normal windows.

A bare percentile of a few dozen validation windows fails on real plants three ways: a
high percentile of few windows is mostly noise, one anomaly among them moves it, and the
plant drifts a little after training, so normal windows soon score above it. The fit
here answers all three (bench/detect.py compares it with percentiles, fixed margins, MAD
and peaks-over-threshold: it is the one that does well on every labelled set there):

- Scores are reconstruction MSEs: positive and right-skewed, close to log-normal. Their
  log is summarized by median and MAD, which ignore up to half the windows being
  anomalous, so a contaminated training period does not drag the threshold up.
- The threshold is the log-normal's `1 - false_alarm_rate` quantile, widened into a
  one-sided tolerance bound: with `CONFIDENCE`, at most `false_alarm_rate` of windows
  like the ones it was fitted on lie above it. The bound widens as the evidence shrinks,
  so a model trained on a few hundred rows gets the margin it needs, and one trained on
  days of rows does not lose sensitivity to it. Drift after training still raises the
  false alarm rate above the budget (the benchmark measures by how much); the budget is
  the knob, not a promise about data the model has not seen.
- Overlapping windows share rows, so they count as `stride / window_size` of a window
  each: n windows of size w at stride 1 are about n / w independent observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
METHOD = "lognormal-tolerance"
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)

# Log-scores closer than this are one value: a model that reconstructs every window alike
# still gets a threshold just above them instead of a division by zero.
_MIN_LOG_SCALE = 1e-6
# MAD of a normal sample, in standard deviations.
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class ThresholdFit:
    threshold: float
    false_alarm_rate: float
    log_median: float
    log_scale: float  # robust standard deviation of log(score)
    windows: int
    effective_windows: float
    k: float  # threshold = exp(log_median + k * log_scale)

    def to_meta(self) -> dict:
        return {
            "method": METHOD,
            "false_alarm_rate": self.false_alarm_rate,
            "confidence": CONFIDENCE,
            "log_median": self.log_median,
            "log_scale": self.log_scale,
            "windows": self.windows,
            "effective_windows": self.effective_windows,
            "k": self.k,
        }


def tolerance_factor(false_alarm_rate: float, n: float) -> float:
    """One-sided normal tolerance factor: the `1 - false_alarm_rate` quantile bound with
    `CONFIDENCE` from `n` observations (Natrella's approximation, good to a few % for n >= 2)."""
    z_p = NormalDist().inv_cdf(1 - false_alarm_rate)
    z_g = NormalDist().inv_cdf(CONFIDENCE)
    return z_p + z_g * math.sqrt(1 / n + z_p * z_p / (2 * n))


def fit(scores: np.ndarray, window_size: int, stride: int, false_alarm_rate: float) -> ThresholdFit:
    """The threshold from the scores of the windows the model was trained and validated on."""
    if len(scores) == 0:
        raise ValueError("no window scores to fit a threshold on")
    logs = np.log(np.maximum(scores.astype(np.float64), np.finfo(np.float32).tiny))
    median = float(np.median(logs))
    scale = max(_MAD_TO_SD * float(np.median(np.abs(logs - median))), _MIN_LOG_SCALE)
    effective = max(len(scores) * min(1.0, stride / window_size), 2.0)
    k = tolerance_factor(false_alarm_rate, effective)
    return ThresholdFit(
        threshold=math.exp(median + k * scale),
        false_alarm_rate=false_alarm_rate,
        log_median=median,
        log_scale=scale,
        windows=len(scores),
        effective_windows=effective,
        k=k,
    )


def quantiles(scores: np.ndarray) -> dict[str, float]:
    """Score quantiles for metadata, so a consumer can pick another operating point."""
    if len(scores) == 0:
        return {}
    values = np.quantile(scores, QUANTILES)
    out = {f"p{q * 100:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)}
    out["max"] = float(scores.max())
    return out
