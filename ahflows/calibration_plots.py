"""The report's "how sure is this number" section: participant-bootstrap intervals from metrics.json, and
the reliability diagram with ECE before/after temperature scaling from calibration.json (heads/calibration.py).
Everything is drawn from those two files: no cache is needed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ahflows.plots import DEFAULT, Figures
from extract.files import read_json_object
from extract.errors import AHError
from heads.calibration import Calibration, load_calibration
from heads.run_files import METRICS_FILE
from heads.uncertainty import format_interval

SPLIT_COLOURS = {"before": "#d62728", "after": "#1f77b4"}
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}      # same figure, same bytes


def _save(fig, path: Path, figures: Figures) -> Path:
    paths = figures.paths(path)
    for p, fmt in zip(paths, figures.formats):
        fig.savefig(p, format=fmt, dpi=figures.dpi, metadata=_METADATA.get(fmt))
    return paths[0]


def plot_reliability(cal: Calibration, path: Path, figures: Figures = DEFAULT) -> Path:
    """Reliability diagram (fraction of A/H videos vs mean probability per equal-width bin) before and after
    temperature scaling, one panel per split, with the ECE of each in the legend."""
    from matplotlib.figure import Figure

    splits = list(cal.diagrams)
    fig = Figure(figsize=(4.2 * max(len(splits), 1), 4.0), dpi=figures.dpi, layout="constrained")
    axes = fig.subplots(1, max(len(splits), 1), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
        for when in ("before", "after"):
            r: dict[str, Any] = cal.diagrams[split][when]
            pts = [(m, f, c) for m, f, c in zip(r["mean_prob"], r["frac_positive"], r["count"]) if c]
            e = cal.scores.get(split, {}).get(f"ece_{when}")
            label = f"{when} (ECE {e:.3f})" if e is not None else when
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=SPLIT_COLOURS[when], label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted A/H probability in bin")
        ax.set_ylabel("fraction of A/H videos in bin")
        ax.set_title(f"{split}: T = {cal.temperature:.3f}, {cal.bins} equal-width bins", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, Path(path), figures)


def _interval_rows(metrics: dict[str, Any]) -> list[str]:
    intervals = metrics.get("intervals") or {}
    rows = []
    for split in ("val", "test"):
        iv = intervals.get(split)
        if not iv:
            continue
        cells = [format_interval(iv.get(k)) for k in ("macro_f1", "f1_ah", "f1_noah", "ap")]
        rows.append(f"| {split} | " + " | ".join(cells) + f" | {iv.get('participants')} |")
    if not rows:
        return []
    unit = next(iter(v for v in intervals.values() if v)).get("unit", "participant")
    return ["| split | Macro F1 | F1-AH | F1-NoAH | AP | participants |", "|---|---:|---:|---:|---:|---:|", *rows, "",
            f"95% intervals: {unit}-level percentile bootstrap (all of a resampled participant's videos together), "
            "`ahcli compare A B --cache C` tests a difference.", ""]


def report_section(folder: Path, figures: Figures = DEFAULT) -> tuple[list[str], list[Path]]:
    """Markdown lines and figures of the section (empty when the folder has neither intervals nor a
    calibration)."""
    folder = Path(folder)
    lines: list[str] = []
    images: list[Path] = []
    try:
        metrics = read_json_object(folder / METRICS_FILE, AHError, "metrics") if (folder / METRICS_FILE).is_file() \
            else {}
    except AHError:
        metrics = {}
    lines += _interval_rows(metrics)
    cal = load_calibration(folder)
    if cal is not None:
        lines += [f"Temperature scaling (fitted on val): T = {cal.temperature:.4f}; threshold re-tuned on the "
                  f"calibrated val probabilities: {cal.threshold:.2f} (was {cal.threshold_before:.2f}).", "",
                  "| split | ECE before | ECE after | NLL before | NLL after |", "|---|---:|---:|---:|---:|"]
        for split, s in cal.scores.items():
            lines.append(f"| {split} | {s['ece_before']:.4f} | {s['ece_after']:.4f} | {s['nll_before']:.4f} | "
                         f"{s['nll_after']:.4f} |")
        lines.append("")
        if cal.diagrams:
            png = plot_reliability(cal, folder / "reliability.png", figures)
            images.append(png)
            lines += [f"![reliability diagram before and after temperature scaling]({png.name})", ""]
    if lines:
        lines = ["## How sure is this number", "", *lines]
    return lines, images


__all__ = ["plot_reliability", "report_section"]
