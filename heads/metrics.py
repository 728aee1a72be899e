"""The BAH challenge metrics, as the organisers' bah_metrics.py computes them (see docs/BAH_LAYOUT.md).

- Macro F1 (the ranking metric): mean of the F1 of class 0 (No A/H) and class 1 (A/H).
- F1 of each class, weighted F1, accuracy, the row-normalised confusion matrix (rows: truth, columns:
  prediction, classes 0 then 1).
- AP of the positive class: predictions `p >= th` for th in np.arange(0, 1, 0.001); precision (0 when
  nothing is predicted positive) and recall at each; area = sklearn.metrics.auc(recall, precision)
  (trapezoid; NOT average_precision_score).
A probability is predicted positive when p >= threshold, everywhere in this project.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, auc, confusion_matrix, f1_score

AP_STEP = 0.001


def _as_labels(labels) -> np.ndarray:
    y = np.asarray(labels, dtype=float).ravel()
    if np.isnan(y).any():
        raise ValueError("labels contain NaN: drop unlabelled videos before scoring")
    return y.astype(int)


def predict(probs, threshold: float) -> np.ndarray:
    """Hard predictions: 1 where p >= threshold."""
    return (np.asarray(probs, dtype=float) >= threshold).astype(int)


def macro_f1(labels, preds) -> float:
    return float(f1_score(_as_labels(labels), np.asarray(preds, dtype=int), labels=[0, 1], average="macro",
                          zero_division=0))


def average_precision(probs, labels, step: float = AP_STEP) -> float:
    """Organisers' AP of class 1: auc(recall, precision) over thresholds np.arange(0, 1, step)."""
    p = np.asarray(probs, dtype=float).ravel()
    y = _as_labels(labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive label")
    th = np.arange(0, 1, step)
    pred = p[None, :] >= th[:, None]                    # (thresholds, videos)
    tp = (pred & (y[None, :] == 1)).sum(1)
    fp = (pred & (y[None, :] == 0)).sum(1)
    prec = np.divide(tp, tp + fp, out=np.zeros(len(th)), where=(tp + fp) > 0)
    rec = tp / n_pos
    return float(auc(rec, prec))


def bah_metrics(labels, probs=None, preds=None, threshold: float | None = None) -> dict:
    """All organisers' metrics. Give `preds`, or `probs` and `threshold`; `ap` needs `probs`."""
    y = _as_labels(labels)
    if preds is None:
        if probs is None or threshold is None:
            raise ValueError("bah_metrics needs preds, or probs and a threshold")
        preds = predict(probs, threshold)
    preds = np.asarray(preds, dtype=int).ravel()
    per_class = f1_score(y, preds, labels=[0, 1], average=None, zero_division=0)
    cm = confusion_matrix(y, preds, labels=[0, 1], normalize="true")
    out = {
        "macro_f1": float(np.mean(per_class)),
        "f1_ah": float(per_class[1]),
        "f1_noah": float(per_class[0]),
        "weighted_f1": float(f1_score(y, preds, labels=[0, 1], average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y, preds)),
        "confusion": np.nan_to_num(cm).round(6).tolist(),
        "ap": None,
        "videos": int(len(y)),
        "positive": int(y.sum()),
    }
    if probs is not None and y.sum() > 0:
        out["ap"] = average_precision(probs, y)
    return out


def thresholds(lo: float = 0.25, hi: float = 0.75, step: float = 0.01) -> np.ndarray:
    """lo, lo+step, ..., hi (inclusive), rounded so that 0.25 + 0.01 k prints as it reads."""
    n = int(np.floor((hi - lo) / step + 1e-9)) + 1
    return np.round(lo + step * np.arange(n), 10)


def macro_f1_at(probs, labels, ths: np.ndarray) -> np.ndarray:
    """Macro F1 (0/1 classes, zero_division=0) at each threshold, vectorised; equals sklearn's."""
    p = np.asarray(probs, dtype=float).ravel()
    y = _as_labels(labels).astype(bool)
    pred = p[None, :] >= np.asarray(ths)[:, None]
    tp = (pred & y).sum(1)
    fp = (pred & ~y).sum(1)
    fn = (~pred & y).sum(1)
    tn = (~pred & ~y).sum(1)

    def f1(tp_, fp_, fn_):
        den = 2 * tp_ + fp_ + fn_
        return np.divide(2 * tp_, den, out=np.zeros(len(tp_)), where=den > 0)

    return (f1(tp, fp, fn) + f1(tn, fn, fp)) / 2


class OneClassWarning(UserWarning):
    """A threshold tuned on labels of one class: every threshold scores alike, so the value means nothing."""


def sweep_threshold(probs, labels, lo: float = 0.25, hi: float = 0.75, step: float = 0.01) -> tuple[float, float]:
    """The threshold in [lo, hi] (step `step`) with the best Macro F1, and that F1.

    Ties go to the lowest threshold (the first maximum in increasing order). Labels of one class only give a
    OneClassWarning (the CLI prints it as one `warning:` line).
    """
    y = _as_labels(labels)
    if len(y) and y.min() == y.max():
        warnings.warn(f"the decision threshold is tuned on {len(y)} labelled video(s) of class {int(y[0])} only: "
                      "every threshold scores alike there, so the tuned value is arbitrary; give the val split "
                      "videos of both classes", OneClassWarning, stacklevel=2)
    ths = thresholds(lo, hi, step)
    f1s = macro_f1_at(probs, labels, ths)
    best = int(np.argmax(f1s))       # argmax returns the first maximum
    return float(ths[best]), float(f1s[best])
