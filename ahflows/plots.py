"""The report's figures, each drawn on a matplotlib `Figure` with the Agg canvas: no display, no pyplot state.

Every figure is saved in each format of `Figures.formats` (PNG, and vector PDF and SVG by default) at
`Figures.dpi`; a plot function returns the path of the first format (the one report.md shows). Titles say
what is plotted, axes carry their units, a one-seed ablation has no error bars (the std of one value is
undefined: the axis says n = 1), the confusion matrices are row-normalised like metrics.json's, and the
precision-recall curve drawn is the organisers' (thresholds 0, 0.001, ..., 0.999; its trapezoid area is
the AP in the legend).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from extract.errors import AHError
from heads.metrics import AP_STEP, average_precision, macro_f1_at, thresholds

DPI = 100
FORMATS = ("png", "pdf", "svg")
CLASS_NAMES = ("No A/H", "A/H")
METRIC_LABELS = {"macro_f1": "Macro F1", "f1_ah": "F1-AH", "f1_noah": "F1-NoAH"}
AP_DEFINITION = "AP = trapezoid area of this curve (organisers' definition)"
# Fixed metadata: the same figure gives the same PDF/SVG bytes (no creation date).
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


class FigureError(AHError):
    """Figure options that cannot be honoured (an unknown format, a bad dpi)."""


@dataclass(frozen=True)
class Figures:
    """Which files each figure is written as."""
    formats: tuple[str, ...] = FORMATS
    dpi: int = DPI

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise FigureError(f"--format {','.join(self.formats) or '(empty)'}: use a comma list of {', '.join(FORMATS)}")
        if not 10 <= self.dpi <= 1200:
            raise FigureError(f"--dpi {self.dpi}: must lie in 10..1200")

    @classmethod
    def parse(cls, formats: str, dpi: int = DPI) -> "Figures":
        """'png,pdf,svg' -> Figures (order kept, repeats dropped)."""
        names = [f.strip().lower().lstrip(".") for f in formats.split(",") if f.strip()]
        return cls(tuple(dict.fromkeys(names)), dpi)

    def paths(self, path: Path) -> list[Path]:
        return [Path(path).with_suffix(f".{f}") for f in self.formats]


DEFAULT = Figures()


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


def _save(fig, path: Path, figures: Figures) -> Path:
    """Write the figure in every format; the first one's path (report.md shows it)."""
    paths = figures.paths(path)
    for p, fmt in zip(paths, figures.formats):
        fig.savefig(p, format=fmt, dpi=figures.dpi, metadata=_METADATA.get(fmt))
    return paths[0]


def plot_training_curves(history: Sequence[dict[str, float]], best_epoch: int, path: Path, title: str = "",
                         figures: Figures = DEFAULT) -> Path:
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
        ax.set_xlabel("epoch (passes over the train split)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    best = [h["val_macro_f1"] for h in history if int(h["epoch"]) == best_epoch]
    if best:
        ax_f1.plot([best_epoch], best, "o", color="tab:red")
    ax_loss.set_ylabel("loss (joint BCE per video, nats)")
    ax_f1.set_ylabel("val Macro F1 (0-1)")
    ax_f1.set_ylim(0, 1)
    ax_loss.set_title("train and val loss per epoch", fontsize=9)
    ax_f1.set_title("val Macro F1 per epoch", fontsize=9)
    fig.suptitle(title or "training curves", fontsize=10)
    return _save(fig, path, figures)


def plot_threshold_curve(val: SplitPredictions, threshold: float, path: Path,
                         sweep: tuple[float, float] = (0.25, 0.75), figures: Figures = DEFAULT) -> Path:
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
    ax.set_xlabel("decision threshold on p(A/H) (A/H when p >= threshold)")
    ax.set_ylabel("val Macro F1 (0-1)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Macro F1 against the decision threshold, val split ({len(val.labels)} videos)", fontsize=10)
    return _save(fig, path, figures)


def confusion(pred: SplitPredictions, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(row-normalised matrix as metrics.json records it, counts); rows truth, columns prediction."""
    from sklearn.metrics import confusion_matrix

    y, y_pred = pred.labels.astype(int), (pred.probs >= threshold).astype(int)
    counts = confusion_matrix(y, y_pred, labels=[0, 1])
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    return share, counts


def plot_confusion(pred: SplitPredictions, threshold: float, path: Path, figures: Figures = DEFAULT) -> Path:
    """Row-normalised confusion matrix at the threshold (the normalisation of metrics.json's `confusion`),
    each cell's count beside its share."""
    share, counts = confusion(pred, threshold)
    fig = _figure(4.4, 3.8)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{share[i, j]:.2f}\n({counts[i, j]} videos)", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks([0, 1], [f"predicted {c}" for c in CLASS_NAMES], fontsize=8)
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASS_NAMES], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="share of the true class (row-normalised)")
    ax.set_title(f"Confusion matrix, {pred.split} split ({len(pred.labels)} videos, threshold {threshold:.2f})",
                 fontsize=9)
    return _save(fig, path, figures)


def organisers_pr_curve(probs: np.ndarray, labels: np.ndarray, step: float = AP_STEP) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at thresholds 0, step, ..., < 1 (precision 0 where nothing is predicted A/H):
    the curve whose trapezoid area heads.metrics.average_precision reports."""
    p, y = np.asarray(probs, dtype=float).ravel(), np.asarray(labels).astype(int).ravel()
    th = np.arange(0, 1, step)
    pred = p[None, :] >= th[:, None]
    tp = (pred & (y[None, :] == 1)).sum(1)
    fp = (pred & (y[None, :] == 0)).sum(1)
    precision = np.divide(tp, tp + fp, out=np.zeros(len(th)), where=(tp + fp) > 0)
    return tp / max(int(y.sum()), 1), precision


def plot_pr_curves(preds: Sequence[SplitPredictions], path: Path, figures: Figures = DEFAULT) -> Path:
    """The organisers' precision-recall curve of the A/H class per split (thresholds 0..0.999 step 0.001,
    joined by straight lines); the legend's AP is the trapezoid area under exactly that curve."""
    fig = _figure()
    ax = fig.subplots()
    for p in preds:
        if p.labels.sum() == 0:
            continue
        recall, precision = organisers_pr_curve(p.probs, p.labels)
        ap = average_precision(p.probs, p.labels)
        ax.plot(recall, precision, marker=".", markersize=3, label=f"{p.split}: AP {ap:.3f}")
    ax.axhline(float(np.mean(np.concatenate([p.labels for p in preds]))), color="grey", linestyle=":",
               linewidth=1, label="share of A/H videos (chance precision)")
    ax.set_xlabel("recall of A/H (fraction of A/H videos found)")
    ax.set_ylabel("precision of A/H (fraction of flagged videos that are A/H)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=AP_DEFINITION, title_fontsize=7)
    ax.set_title("Precision-recall of the A/H class at thresholds 0, 0.001, ..., 0.999", fontsize=10)
    return _save(fig, path, figures)


def plot_ablation_bars(rows: Sequence[AblationRow], path: Path, title: str, figures: Figures = DEFAULT) -> Path:
    """Grouped bars per setting (Macro F1, F1-AH, F1-NoAH), the std over seeds as error bars; with one seed
    no error bars (its std is undefined) and the axis says n = 1."""
    metrics = [m for m in METRIC_LABELS if any(m in r.mean for r in rows)]
    fig = _figure(max(5.0, 0.9 * len(rows) + 2.0), 3.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    width = 0.8 / max(len(metrics), 1)
    seeds = sorted({int(r.seeds or 1) for r in rows})
    several = min(seeds) > 1
    for k, m in enumerate(metrics):
        means = [r.mean.get(m, np.nan) for r in rows]
        stds = [r.std.get(m, 0.0) for r in rows] if several else None
        ax.bar(x + (k - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=3 if several else 0,
               label=METRIC_LABELS[m])
    ax.set_xticks(x, [r.setting for r in rows], rotation=30 if len(rows) > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.15)                      # headroom for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    n = "n = " + ", ".join(map(str, seeds))
    ax.set_ylabel(f"score (0-1), mean ± std over seeds ({n})" if several else f"score (0-1), one seed ({n})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(metrics), loc="upper center")
    ax.set_title(title, fontsize=10)
    return _save(fig, path, figures)
