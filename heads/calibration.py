"""Calibrated probabilities: temperature scaling fitted on val, and the expected calibration error.

A run's probability is a blend of two heads averaged over windows, and an ensemble's the mean of its runs',
so the temperature acts on the logit of that FINAL probability p: p_T = sigmoid(logit(p) / T), one scalar T
> 0 fitted on the labelled val videos by minimising the binary cross-entropy (a bounded 1-D search over
log T, scipy's minimize_scalar). T > 1 softens an over-confident model, T < 1 sharpens an under-confident
one. The ranking of the videos does not change, but the organisers' AP can: it reads precision and
recall on a fixed grid of thresholds (0, 0.001, ...), and probabilities crowded near 0 or 1 share a grid step
until a temperature spreads them. The decision threshold is then re-tuned on the
calibrated val probabilities (the same sweep [0.25, 0.75] step 0.01): the model's decisions stay those of
a threshold tuned on val, now expressed on the calibrated scale.

ECE here is the positive-class ECE with 15 equal-width bins over p in [0, 1] (the last bin includes 1):
sum over bins of (videos in bin / videos) x |fraction of A/H videos in bin - mean p in bin|: exactly what
the reliability diagram shows.

The fitted record is stored beside the run or ensemble as calibration.json and applied where that folder's
probabilities are reported (`ahcli evaluate`, `ahcli predict`, `ahcli compare`; an ensemble made with
--calibrate writes calibrated predictions and submission files).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from extract.errors import AHError
from extract.files import atomic_write_json, read_json_object
from heads.metrics import sweep_threshold

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15
EPS = 1e-6
LOG_T_BOUNDS = (-5.0, 5.0)          # T in [0.0067, 148]


class CalibrationError(AHError):
    """A calibration.json that cannot be read, or a val split without both classes."""


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T)."""
    return 1.0 / (1.0 + np.exp(-_logit(probs) / float(temperature)))


def nll(probs, labels) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-6, 1 - 1e-6])."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(probs, labels) -> float:
    """The T > 0 minimising the BCE of sigmoid(logit(p) / T) on labelled videos."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        raise CalibrationError("temperature scaling needs labelled val videos of both classes")
    z = _logit(probs)

    def loss(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), EPS, 1 - EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    res = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    best = float(res.x)
    return float(np.exp(best if loss(best) <= loss(0.0) else 0.0))     # never worse than T = 1 on val


@dataclass
class Reliability:
    edges: list[float]
    mean_prob: list[float | None]         # per bin; None for an empty bin
    frac_positive: list[float | None]
    count: list[int]


def reliability(probs, labels, bins: int = ECE_BINS) -> Reliability:
    """Equal-width bins over [0, 1] of the positive-class probability."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_p = np.bincount(which, weights=p, minlength=bins)
    sum_y = np.bincount(which, weights=y, minlength=bins)
    mean_p = [float(sum_p[b] / count[b]) if count[b] else None for b in range(bins)]
    frac = [float(sum_y[b] / count[b]) if count[b] else None for b in range(bins)]
    return Reliability(edges.tolist(), mean_p, frac, count.astype(int).tolist())


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Positive-class expected calibration error, equal-width bins (see the module doc)."""
    r = reliability(probs, labels, bins)
    n = sum(r.count)
    if n == 0:
        return float("nan")
    return float(sum(c / n * abs(f - m) for c, f, m in zip(r.count, r.frac_positive, r.mean_prob) if c))


@dataclass
class Calibration:
    temperature: float
    threshold: float                      # re-tuned on the calibrated val probabilities
    threshold_before: float
    bins: int = ECE_BINS
    scores: dict[str, dict[str, float]] = field(default_factory=dict)   # split -> ece/nll before/after
    # split -> {"before": Reliability as a dict, "after": ...}: the reliability diagram's numbers
    diagrams: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: str = "temperature scaling on logit(p), fitted on val (BCE); positive-class ECE, equal-width bins"

    def apply(self, probs) -> np.ndarray:
        return apply_temperature(probs, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_scores(probs, labels, cal_probs, bins: int = ECE_BINS) -> dict[str, float]:
    return {"ece_before": ece(probs, labels, bins), "ece_after": ece(cal_probs, labels, bins),
            "nll_before": nll(probs, labels), "nll_after": nll(cal_probs, labels), "videos": int(len(labels))}


def calibrate(val_probs, val_labels, threshold_before: float, others: dict[str, tuple[Any, Any]] | None = None,
              bins: int = ECE_BINS, lo: float = 0.25, hi: float = 0.75, step: float = 0.01) -> Calibration:
    """Fit T on val, re-tune the threshold on the calibrated val probabilities, and score ECE/NLL before and
    after on val and on `others` ({split: (probs, labels)}, labelled videos only)."""
    t = fit_temperature(val_probs, val_labels)
    cal_val = apply_temperature(val_probs, t)
    threshold, _ = sweep_threshold(cal_val, val_labels, lo, hi, step)
    scores, diagrams = {}, {}
    for split, (p, y) in {"val": (val_probs, val_labels), **(others or {})}.items():
        if len(y):
            q = apply_temperature(p, t)
            scores[split] = split_scores(p, y, q, bins)
            diagrams[split] = {"before": asdict(reliability(p, y, bins)), "after": asdict(reliability(q, y, bins))}
    return Calibration(t, float(threshold), float(threshold_before), bins, scores, diagrams)


def save_calibration(folder: Path, cal: Calibration) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    atomic_write_json(path, cal.to_dict())
    return path


def load_calibration(folder: Path) -> Calibration | None:
    """The folder's calibration.json, or None when it has none (a bad file is refused in one line)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    d = read_json_object(path, CalibrationError, "calibration record")
    try:
        cal = Calibration(**d)
    except TypeError as exc:
        raise CalibrationError(f"{path}: not a calibration record ({exc})") from exc
    t, th = cal.temperature, cal.threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
        raise CalibrationError(f"{path}: temperature must be a positive number, got {t!r}")
    if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0 <= th <= 1:
        raise CalibrationError(f"{path}: threshold must be a number in [0, 1], got {th!r}")
    return cal


__all__ = ["Calibration", "CalibrationError", "calibrate", "fit_temperature", "apply_temperature", "ece", "nll",
           "reliability", "Reliability", "save_calibration", "load_calibration", "CALIBRATION_FILE", "ECE_BINS"]
