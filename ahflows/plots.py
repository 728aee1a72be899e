"""The report's figures, each drawn on a matplotlib `Figure` with the Agg canvas: no display, no pyplot state."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from heads.metrics import average_precision, macro_f1_at, thresholds

DPI = 100
CLASS_NAMES = ("No A/H", "A/H")
METRIC_LABELS = {"macro_f1": "Macro F1", "f1_ah": "F1-AH", "f1_noah": "F1-NoAH"}


@dataclass
class SplitPredictions:
    """Probabilities and labels of the labelled videos of one split."""
    split: str
    probs: np.ndarray
    labels: np.ndarray


@dataclass
class AblationRow:
    """One bar group: a setting of an ablation table, mean and std over seeds per metric."""
    table: str
    setting: str
    mean: dict[str, float]
    std: dict[str, float]
    seeds: int | None = None


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def plot_training_curves(history: Sequence[dict[str, float]], best_epoch: int, path: Path, title: str = "") -> Path:
    """Train/val loss and val Macro F1 per epoch; the chosen (best) epoch marked on both panels."""
    epochs = [int(h["epoch"]) for h in history]
    fig = _figure(7.0, 3.4)
    ax_loss, ax_f1 = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if all("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax_f1.plot(epochs, [h["val_macro_f1"] for h in history], color="tab:green", label="val Macro F1")
    for ax in (ax_loss, ax_f1):
        ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"chosen epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    best = [h["val_macro_f1"] for h in history if int(h["epoch"]) == best_epoch]
    if best:
        ax_f1.plot([best_epoch], best, "o", color="tab:red")
    ax_loss.set_ylabel("loss")
    ax_f1.set_ylabel("Macro F1")
    ax_f1.set_ylim(0, 1)
    fig.suptitle(title or "training curves", fontsize=10)
    return _save(fig, path)


def plot_threshold_curve(val: SplitPredictions, threshold: float, path: Path,
                         sweep: tuple[float, float] = (0.25, 0.75)) -> Path:
    """Macro F1 on val against the decision threshold; the swept range shaded, the chosen threshold marked."""
    ths = thresholds(0.01, 0.99, 0.01)
    f1 = macro_f1_at(val.probs, val.labels, ths)
    at = float(macro_f1_at(val.probs, val.labels, np.array([threshold]))[0])
    fig = _figure()
    ax = fig.subplots()
    ax.axvspan(*sweep, color="tab:blue", alpha=0.08, label=f"swept range [{sweep[0]:.2f}, {sweep[1]:.2f}]")
    ax.plot(ths, f1, label="val Macro F1")
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.plot([threshold], [at], "o", color="tab:red", label=f"chosen threshold {threshold:.2f} (F1 {at:.3f})")
    ax.set_xlabel("threshold (A/H when p >= threshold)")
    ax.set_ylabel("Macro F1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Macro F1 against the threshold on val ({len(val.labels)} videos)", fontsize=10)
    return _save(fig, path)


def plot_confusion(pred: SplitPredictions, threshold: float, path: Path) -> Path:
    """Confusion matrix (counts; rows truth, columns prediction) at the threshold."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = _figure(4.2, 3.6)
    ax = fig.subplots()
    y_pred = (pred.probs >= threshold).astype(int)
    ConfusionMatrixDisplay.from_predictions(pred.labels.astype(int), y_pred, labels=[0, 1],
                                            display_labels=list(CLASS_NAMES), ax=ax, colorbar=False,
                                            cmap="Blues")
    ax.set_title(f"{pred.split}: {len(pred.labels)} videos, threshold {threshold:.2f}", fontsize=10)
    return _save(fig, path)


def plot_pr_curves(preds: Sequence[SplitPredictions], path: Path) -> Path:
    """Precision-recall curve of the A/H class per split; AP by the organisers' definition in the legend."""
    from sklearn.metrics import precision_recall_curve

    fig = _figure()
    ax = fig.subplots()
    for p in preds:
        if p.labels.sum() == 0:
            continue
        precision, recall, _ = precision_recall_curve(p.labels.astype(int), p.probs)
        ap = average_precision(p.probs, p.labels)
        ax.step(recall, precision, where="post", label=f"{p.split} (AP {ap:.3f})")
    ax.axhline(float(np.mean(np.concatenate([p.labels for p in preds]))), color="grey", linestyle=":",
               linewidth=1, label="share of A/H (chance)")
    ax.set_xlabel("recall (A/H)")
    ax.set_ylabel("precision (A/H)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("precision-recall, A/H class", fontsize=10)
    return _save(fig, path)


def plot_ablation_bars(rows: Sequence[AblationRow], path: Path, title: str) -> Path:
    """Grouped bars per setting (Macro F1, F1-AH, F1-NoAH), std over seeds as error bars."""
    metrics = [m for m in METRIC_LABELS if any(m in r.mean for r in rows)]
    fig = _figure(max(5.0, 0.9 * len(rows) + 2.0), 3.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    width = 0.8 / max(len(metrics), 1)
    for k, m in enumerate(metrics):
        means = [r.mean.get(m, np.nan) for r in rows]
        stds = [r.std.get(m, 0.0) for r in rows]
        ax.bar(x + (k - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=METRIC_LABELS[m])
    ax.set_xticks(x, [r.setting for r in rows], rotation=30 if len(rows) > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.15)                      # headroom for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(metrics), loc="upper center")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
