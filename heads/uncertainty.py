"""How sure is a number: participant-level bootstrap intervals and a paired bootstrap test.

Videos of one participant are not independent (same face, same voice, same way of talking), so the
bootstrap resamples PARTICIPANTS with replacement and keeps all of a drawn participant's videos: a
participant drawn k times weighs each of their videos k times. Every metric is then a function of weighted
counts (true/false positives/negatives), computed for all resamples at once with one matrix product:
  Macro F1, F1 of each class (zero_division = 0, as heads/metrics.py),
  AP of class 1 as the organisers compute it (precision/recall at thresholds np.arange(0, 1, 0.001),
  area = trapezoid over recall, i.e. sklearn.metrics.auc), NaN for a resample without positives.
With unit weights these equal heads.metrics.bah_metrics (tests/test_uncertainty.py checks it). Intervals are
the 2.5th and 97.5th percentiles of the resampled values (percentile bootstrap, 1000 resamples by default,
seeded). A group id per video (the cache meta's `pid`) defines the resampling unit; giving every video its
own id gives the video-level bootstrap, which is too narrow when a participant's videos agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from extract.store import CacheReader
from heads.metrics import AP_STEP

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
CI_METRICS = ("macro_f1", "f1_ah", "f1_noah", "ap")


def participant_ids(reader: CacheReader | None, video_ids: Sequence[str]) -> list[str]:
    """The cache meta's participant id of each video; a video without one counts as its own participant."""
    out = []
    for v in video_ids:
        pid = reader.meta(v).get("pid") if reader is not None else None
        out.append(str(pid) if pid not in (None, "") else f"video:{v}")
    return out


def participants_of_cache(cache: dict[str, Any] | None, video_ids: Sequence[str]) -> list[str]:
    """participant_ids over the cache a run's config.json names ({fingerprint, path}); every video its own
    participant when no cache folder is known (a run trained without one)."""
    path = (cache or {}).get("path")
    reader = CacheReader(path) if path and Path(path).is_dir() else None
    return participant_ids(reader, video_ids)


def resample_weights(groups: Sequence[Any], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(B, N) weights: how often each video's participant was drawn in each of B resamples of the
    participants (P draws with replacement from the P participants)."""
    _, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / max(n_groups, 1)), size=n_resamples)
    return counts[:, index].astype(np.float64)


def unit_of(groups: Sequence[Any]) -> str:
    """'participant', or 'video' when no video had a participant id (participant_ids' fallback)."""
    return "video" if all(str(g).startswith("video:") for g in groups) else "participant"


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den, dtype=np.float64), where=den > 0)


def weighted_scores(weights: np.ndarray, labels, probs, threshold: float) -> dict[str, np.ndarray]:
    """Macro F1, F1 per class and AP for each row of `weights` (B, N) over the same videos."""
    y = np.asarray(labels, dtype=float).ravel().astype(bool)
    p = np.asarray(probs, dtype=float).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pred = p >= threshold
    tp, fp = w @ (pred & y), w @ (pred & ~y)
    fn, tn = w @ (~pred & y), w @ (~pred & ~y)
    f1_ah, f1_noah = _f1(tp, fp, fn), _f1(tn, fn, fp)
    return {"macro_f1": (f1_ah + f1_noah) / 2, "f1_ah": f1_ah, "f1_noah": f1_noah, "ap": _weighted_ap(w, y, p)}


def _weighted_ap(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The organisers' AP (heads.metrics.average_precision) under each row of weights."""
    th = np.arange(0, 1, AP_STEP)
    above = (p[:, None] >= th[None, :]).astype(np.float64)           # (N, T)
    tp = w @ (above * y[:, None])                                   # (B, T)
    fp = w @ (above * ~y[:, None])
    n_pos = w @ y.astype(np.float64)                                # (B,)
    prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = tp / n_pos[:, None]
    # recall falls as the threshold rises: auc() integrates in that (decreasing) direction, hence the sign
    area = -np.trapezoid(prec, rec, axis=1) if hasattr(np, "trapezoid") else -np.trapz(prec, rec, axis=1)
    return np.where(n_pos > 0, area, np.nan)


@dataclass
class Interval:
    value: float            # the metric on the data as they are
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _interval(value: float, samples: np.ndarray, level: float) -> Interval:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return Interval(value, float("nan"), float("nan"))
    lo, hi = np.percentile(s, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Interval(value, float(lo), float(hi))


def bootstrap_intervals(labels, probs, threshold: float, groups: Sequence[Any], *, n_resamples: int = N_RESAMPLES,
                        seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """{"macro_f1": {value, low, high}, "f1_ah": ..., "f1_noah": ..., "ap": ..., plus how it was made}.
    Labels must be 0/1 (drop unlabelled videos first)."""
    y = np.asarray(labels, dtype=float).ravel()
    if np.isnan(y).any():
        raise ValueError("labels contain NaN: drop unlabelled videos before the bootstrap")
    if len(groups) != len(y):
        raise ValueError(f"{len(groups)} participant ids for {len(y)} videos")
    point = weighted_scores(np.ones((1, len(y))), y, probs, threshold)
    samples = weighted_scores(resample_weights(groups, n_resamples, seed), y, probs, threshold)
    out: dict[str, Any] = {}
    for k in CI_METRICS:
        v = float(point[k][0])
        out[k] = _interval(v if np.isfinite(v) else float("nan"), samples[k], level).to_dict()
    out.update({"level": level, "resamples": n_resamples, "seed": seed, "unit": unit_of(groups),
                "participants": len(set(map(str, groups))), "videos": int(len(y))})
    return out


def paired_difference(labels, probs_a, threshold_a: float, probs_b, threshold_b: float, groups: Sequence[Any], *,
                      metric: str = "macro_f1", n_resamples: int = N_RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> dict[str, Any]:
    """Paired participant bootstrap of metric(A) - metric(B) over the same videos: both systems are scored on
    the same resamples. `distinguishable` is True when the interval of the difference excludes 0."""
    y = np.asarray(labels, dtype=float).ravel()
    w = resample_weights(groups, n_resamples, seed)
    ones = np.ones((1, len(y)))
    a = weighted_scores(ones, y, probs_a, threshold_a)[metric][0]
    b = weighted_scores(ones, y, probs_b, threshold_b)[metric][0]
    diff = weighted_scores(w, y, probs_a, threshold_a)[metric] - weighted_scores(w, y, probs_b, threshold_b)[metric]
    iv = _interval(float(a - b), diff, level)
    finite = diff[np.isfinite(diff)]
    return {"metric": metric, "a": float(a), "b": float(b), "difference": iv.to_dict(),
            "distinguishable": bool(iv.low > 0 or iv.high < 0),
            "p_a_not_better": float(np.mean(finite <= 0)) if finite.size else float("nan"),
            "level": level, "resamples": n_resamples, "seed": seed, "unit": unit_of(groups),
            "participants": len(set(map(str, groups))), "videos": int(len(y))}


def format_interval(iv: dict[str, float] | None, digits: int = 3) -> str:
    """'0.812 [0.771, 0.850]' (or '-')."""
    if not iv or iv.get("value") is None or not np.isfinite(iv["value"]):
        return "-"
    return f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


__all__ = ["bootstrap_intervals", "paired_difference", "participant_ids", "participants_of_cache", "resample_weights", "weighted_scores",
           "format_interval", "Interval", "CI_METRICS", "N_RESAMPLES"]
