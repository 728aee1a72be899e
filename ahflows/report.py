"""`ahcli report`: plots (PNG, PDF and SVG by default: ahflows/plots.py `Figures`) and a `report.md` for a run
folder, an ensemble folder or an ablation folder.

What is drawn depends on what the folder holds:
- run folder (`train-heads` / `finetune`): training curves from history.csv (train and val loss, val Macro F1
  per epoch, the chosen epoch marked); with the cache (--cache, or the path recorded in config.json) the run
  scores val and test, giving Macro F1 against the threshold on val (the chosen threshold marked), confusion
  matrices for val and test and precision-recall curves.
- ensemble folder (`ahcli ensemble`): the same threshold / confusion / PR plots from predictions.csv (no
  cache needed) and the training curves of each member run that is still on disk.
- ablation folder (`ahcli ablate`): one bar chart per table of ablation.csv (modality subsets first), mean
  Macro F1 / F1-AH / F1-NoAH with the std over seeds as error bars (none for one seed: "n = 1").
Everything is drawn on matplotlib `Figure` objects with the Agg canvas: no display, no pyplot state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ahflows.ablation_table import mean_std, read_csv, videos_line
from ahflows.calibration_plots import report_section
from ahflows.plots import (AP_DEFINITION, DEFAULT, METRIC_LABELS, AblationRow, Figures, SplitPredictions,
                           plot_ablation_bars, plot_confusion, plot_pr_curves, plot_threshold_curve,
                           plot_training_curves)
from ahflows.report_inputs import (ReportError, predictions_from_csv, predictions_from_run, read_json,
                                   run_cache_path)
from extract.errors import AHError
from extract.vocab import canonical_letters, is_letters
from heads.metrics import bah_metrics
from heads.run_files import read_history

REPORT_FILE = "report.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODALITY_ORDER = ("v", "a", "t", "va", "vt", "at", "vat")


@dataclass
class ReportResult:
    folder: Path
    kind: str                                   # 'run', 'ensemble' or 'ablation'
    report: Path
    images: list[Path] = field(default_factory=list)      # the figures report.md shows (first format)
    notes: list[str] = field(default_factory=list)
    formats: tuple[str, ...] = ("png",)                      # every figure is also written in these

    @property
    def files(self) -> list[Path]:
        """Every figure file written, all formats."""
        return [p.with_suffix(f".{f}") for p in self.images for f in self.formats]


# ---- folder kinds ----------------------------------------------------------------------------------


def folder_kind(folder: Path) -> str:
    """'ablation' (ablation.csv), 'ensemble' (predictions.csv + metrics.json) or 'run' (config.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: folder not found")
    if (folder / "ablation.csv").is_file():
        return "ablation"
    if (folder / "predictions.csv").is_file() and (folder / "metrics.json").is_file():
        return "ensemble"
    if (folder / "config.json").is_file():
        return "run"
    raise ReportError(f"{folder}: not a run folder (config.json), an ensemble folder (predictions.csv + "
                      "metrics.json) or an ablation folder (ablation.csv)")


# ---- ablation.csv ----------------------------------------------------------------------------------


# What each table's chart shows (the title says what is plotted; the paper's table number goes in report.md).
TABLE_TITLES = {"4": "Macro F1, F1-AH, F1-NoAH without conflict features, on the window transcript, by text blend α",
                "5": "Macro F1, F1-AH, F1-NoAH by modality subset",
                "6": "Macro F1, F1-AH, F1-NoAH by inference windows, single checkpoint vs the A+B ensemble"}
PAPER_TABLES = {v: f"the paper's Table {k}" for k, v in TABLE_TITLES.items()}


def read_ablation(path: Path) -> list[AblationRow]:
    """ablation.csv -> the aggregated rows (table, setting, mean/std per metric) of the test split (else val)."""
    try:
        rows = [r for r in read_csv(path) if r.seed == "mean"]
    except AHError as exc:
        raise ReportError(str(exc)) from exc
    if not rows:
        raise ReportError(f"{path}: no aggregated rows")
    split = "test" if any(r.split == "test" for r in rows) else "val"
    return [AblationRow(f"{TABLE_TITLES.get(r.table, 'Table ' + r.table)} ({split} split)", r.config.removeprefix("modality="),
                        {m: getattr(r, m) for m in METRIC_LABELS}, dict(r.std), r.n_seeds)
            for r in rows if r.split == split]


def _modality_key(setting: str) -> str | None:
    s = setting.strip().lower().replace("+", "").replace("-", "").replace(" ", "")
    return canonical_letters(s) if is_letters(s) else None


def ablation_groups(rows: Sequence[AblationRow]) -> list[tuple[str, list[AblationRow]]]:
    """Rows grouped by table (modality subsets first, in the paper's order)."""
    groups: dict[str, list[AblationRow]] = {}
    for r in rows:
        groups.setdefault(r.table, []).append(r)
    ordered = []
    for table, members in groups.items():
        if all(_modality_key(m.setting) for m in members):
            rank = {k: i for i, k in enumerate(MODALITY_ORDER)}
            members = sorted(members, key=lambda m: rank.get(_modality_key(m.setting), 99))
            ordered.insert(0, (table, members))
        else:
            ordered.append((table, members))
    return ordered


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "table"


# ---- report.md -------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _metrics_table(rows: Sequence[tuple[str, dict | None, int | None]]) -> list[str]:
    """Rows (name, metrics, videos the split file lists or None when unknown)."""
    lines = ["| | Macro F1 | F1-AH | F1-NoAH | AP | accuracy | videos scored / listed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m, listed in rows:
        if not m:
            continue
        videos = _fmt(m.get("videos")) + ("" if listed is None else f" / {listed}")
        if listed is not None and isinstance(m.get("videos"), int) and m["videos"] < listed:
            videos += " (PARTIAL)"
        lines.append(f"| {name} | {_fmt(m.get('macro_f1'))} | {_fmt(m.get('f1_ah'))} | {_fmt(m.get('f1_noah'))} | "
                     f"{_fmt(m.get('ap'))} | {_fmt(m.get('accuracy'))} | {videos} |")
    return lines


def _img(lines: list[str], images: list[Path], path: Path, caption: str) -> None:
    images.append(path)
    lines += [f"![{caption}]({path.name})", ""]


def _prediction_plots(folder: Path, preds: dict[str, SplitPredictions], threshold: float, lines: list[str],
                      images: list[Path], notes: list[str], figures: Figures = DEFAULT) -> None:
    if "val" in preds:
        lines += ["## Threshold", "", f"Chosen threshold {threshold:.2f}, tuned on val in [0.25, 0.75].", ""]
        _img(lines, images, plot_threshold_curve(preds["val"], threshold, folder / "threshold.png", figures=figures),
             "Macro F1 against the threshold on val")
    else:
        notes.append("no labelled val videos: no threshold plot")
    shown = [s for s in ("val", "test") if s in preds]
    if shown:
        lines += ["## Confusion matrices", "", "Rows: truth, columns: prediction, at the chosen threshold; each row "
                  "normalised to the share of its true class (as `confusion` in metrics.json), counts in brackets.", ""]
        for s in shown:
            _img(lines, images, plot_confusion(preds[s], threshold, folder / f"confusion_{s}.png", figures=figures),
                 f"confusion matrix, {s}")
        lines += ["## Precision-recall", "",
                  f"The organisers' curve: precision and recall at thresholds 0, 0.001, ..., 0.999; {AP_DEFINITION}.", ""]
        _img(lines, images, plot_pr_curves([preds[s] for s in shown], folder / "pr.png", figures=figures),
             "precision-recall curves")


def _history(run_dir: Path) -> list[dict[str, Any]]:
    """history.csv's rows (written one per epoch as a run goes), [] when there is none yet."""
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    try:
        return read_history(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not a readable history ({exc})") from exc


def best_so_far(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The epoch the run would keep now: the best val Macro F1, the earlier on ties (heads/train.py's rule)."""
    return max(history, key=lambda h: (h["val_macro_f1"], -h["epoch"]))


def _run_curves(run_dir: Path, out: Path, name: str, figures: Figures = DEFAULT) -> Path | None:
    history, metrics_path = _history(run_dir), run_dir / "metrics.json"
    if not history:
        return None
    if metrics_path.is_file():
        best, what = int(read_json(metrics_path).get("best_epoch", history[-1]["epoch"])), "chosen epoch"
    else:
        best, what = int(best_so_far(history)["epoch"]), "best so far, run not finished"
    return plot_training_curves(history, best, out, title=f"{name}: loss and val Macro F1 per epoch ({what} {best})",
                                figures=figures)


def report_unfinished_run(folder: Path, figures: Figures = DEFAULT) -> ReportResult:
    """A run still training or interrupted: its curves and best epoch so far, from history.csv alone."""
    history = _history(folder)
    if not history:
        raise ReportError(f"{folder}: no epoch finished yet (history.csv has no rows); report it after the first "
                          "epoch")
    best = best_so_far(history)
    lines = [f"# Run report: {folder.name} (not finished)", "",
             f"{len(history)} epoch(s) finished; no metrics.json yet: the run is still training, or was "
             "interrupted (finish it with --resume). Scores come once it has finished.", "",
             "## Best epoch so far", "", "| epoch | val Macro F1 | F1-AH | F1-NoAH | threshold |",
             "|---:|---:|---:|---:|---:|",
             f"| {best['epoch']} | {best['val_macro_f1']:.4f} | {best['val_f1_ah']:.4f} | {best['val_f1_noah']:.4f} | "
             f"{best['threshold']:.2f} |", ""]
    images: list[Path] = []
    curves = _run_curves(folder, folder / "curves.png", folder.name, figures)
    if curves is not None:
        lines += ["## Training curves", ""]
        _img(lines, images, curves, "training curves")
    return _finish(folder, "run", lines, images, [f"run not finished: {len(history)} epoch(s) in history.csv"],
                   figures)


def report_run(folder: Path, cache: Path | None = None, windows: int = 5, device: str = "auto",
               allow_partial: bool = False, figures: Figures = DEFAULT) -> ReportResult:
    folder = Path(folder)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        return report_unfinished_run(folder, figures)
    metrics = read_json(metrics_path)
    lines = [f"# Run report: {folder.name}", ""]
    images: list[Path] = []
    notes: list[str] = []
    cfg = read_json(folder / "config.json")
    model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    train = cfg.get("train", {}) if isinstance(cfg, dict) else {}
    top = int(train.get("unfreeze_top") or 0)
    lines += [f"Modalities `{model.get('modalities', '?')}`, conflict features "
              f"{'on' if model.get('conflict', True) else 'off'}, "
              f"{f'top-{top} encoder blocks trained' if top else 'encoders frozen'}, "
              f"label smoothing {train.get('label_smoothing', '?')}, "
              f"best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}, threshold "
              f"{_fmt(metrics.get('threshold'))}, alpha {_fmt(metrics.get('alpha'))}.", ""]
    curves = _run_curves(folder, folder / "curves.png", folder.name, figures)
    if curves is not None:
        lines += ["## Training curves", ""]
        _img(lines, images, curves, "training curves")
    where = run_cache_path(folder, cache)
    trained = (metrics.get("videos") or {}).get("val") or {}
    table = [("val (at training)", metrics.get("val"), trained.get("listed"))]
    if where is None:
        notes.append("no cache given and the recorded one is not on disk: pass --cache CACHE for the "
                     "threshold, confusion and precision-recall plots")
    else:
        listed: dict[str, int] = {}
        preds, run = predictions_from_run(folder, where, windows=windows, device=device, allow_partial=allow_partial,
                                          listed=listed)
        threshold = float(run.threshold)
        table = [(s, _split_metrics(p, threshold), listed.get(s)) for s, p in preds.items()]
        _prediction_plots(folder, preds, threshold, lines, images, notes, figures)
    lines[4:4] = ["## Scores", "", *_metrics_table(table), ""]
    return _finish(folder, "run", lines, images, notes, figures)


def _split_metrics(p: SplitPredictions, threshold: float) -> dict:
    return bah_metrics(p.labels, probs=p.probs, threshold=threshold)


def report_ensemble(folder: Path, figures: Figures = DEFAULT) -> ReportResult:
    folder = Path(folder)
    metrics = read_json(folder / "metrics.json")
    if not isinstance(metrics, dict) or "threshold" not in metrics:
        raise ReportError(f"{folder / 'metrics.json'}: no threshold (not an ensemble's metrics.json)")
    threshold = float(metrics["threshold"])
    preds = predictions_from_csv(folder / "predictions.csv")
    lines = [f"# Ensemble report: {folder.name}", ""]
    images: list[Path] = []
    notes: list[str] = []
    members = metrics.get("runs") or []
    videos = metrics.get("videos") or {}
    table = [(s, metrics.get(s), (videos.get(s) or {}).get("listed")) for s in ("val", "test")]
    lines += ["## Scores", "", *_metrics_table([(f"ensemble, {s}", m, n) for s, m, n in table]), ""]
    if members:
        lines += ["## Members", "", "| run | modalities | label smoothing | threshold | val Macro F1 | test Macro F1 |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in members:
            lines.append(f"| `{Path(r.get('path', '?')).name}` | {r.get('modalities', '?')} | "
                         f"{_fmt(r.get('label_smoothing'))} | {_fmt(r.get('threshold'))} | "
                         f"{_fmt((r.get('val') or {}).get('macro_f1'))} | {_fmt((r.get('test') or {}).get('macro_f1'))} |")
        lines.append("")
    _prediction_plots(folder, preds, threshold, lines, images, notes, figures)
    curves_done = False
    for i, r in enumerate(members):
        run_dir = Path(r.get("path", ""))
        png = _run_curves(run_dir, folder / f"curves_{i}_{_slug(run_dir.name)}.png", run_dir.name, figures) \
            if run_dir.is_dir() else None
        if png is None:
            notes.append(f"member {run_dir}: no history on disk, no training curves")
            continue
        if not curves_done:
            lines += ["## Training curves of the members", ""]
            curves_done = True
        _img(lines, images, png, f"training curves of {run_dir.name}")
    return _finish(folder, "ensemble", lines, images, notes, figures)


def _ablation_videos(path: Path) -> str:
    """The videos scored / listed per split, as ablation.csv records them."""
    videos: dict[str, dict] = {}
    for r in read_csv(path):
        if r.listed is not None:
            videos.setdefault(r.split, {"scored": r.videos, "listed": r.listed})
    return videos_line(videos)


def report_ablation(folder: Path, figures: Figures = DEFAULT) -> ReportResult:
    folder = Path(folder)
    rows = read_ablation(folder / "ablation.csv")
    lines = [f"# Ablation report: {folder.name}", "", _ablation_videos(folder / "ablation.csv"), ""]
    if (folder / "ablation.md").is_file():
        extra = ", LaTeX in [ablation.tex](ablation.tex)" if (folder / "ablation.tex").is_file() else ""
        lines += [f"The full tables are in [ablation.md](ablation.md){extra}.", ""]
    images: list[Path] = []
    for k, (table, members) in enumerate(ablation_groups(rows)):
        name = table or "ablation"
        seeds = {m.seeds for m in members if m.seeds}
        n = f"{min(seeds)}" if seeds and min(seeds) == max(seeds) else (f"{min(seeds)}-{max(seeds)}" if seeds else "")
        title = name + (f", n = {n} seed{'' if n == '1' else 's'}" if n else "")
        png = plot_ablation_bars(members, folder / f"ablation_{k}_{_slug(name)}.png", title, figures)
        paper = next((v for t, v in PAPER_TABLES.items() if name.startswith(t)), "")
        lines += [f"## {name}" + (f" ({paper})" if paper else ""), "",
                  "| setting | " + " | ".join(METRIC_LABELS.values()) + " | seeds |",
                  "|---|" + "---:|" * (len(METRIC_LABELS) + 1)]
        for m in members:
            cells = [mean_std(m.mean.get(x), m.std.get(x), int(m.seeds or 1), digits=4) for x in METRIC_LABELS]
            lines.append(f"| {m.setting} | " + " | ".join(cells) + f" | n = {m.seeds or 1} |")
        lines.append("")
        _img(lines, images, png, f"{name} bar chart")
    return _finish(folder, "ablation", lines, images, [], figures)


def _finish(folder: Path, kind: str, lines: list[str], images: list[Path], notes: list[str],
            figures: Figures = DEFAULT) -> ReportResult:
    if kind in ("run", "ensemble"):            # bootstrap intervals and calibration (ahflows/calibration_plots.py)
        section, drawn = report_section(folder, figures)
        lines += section
        images += drawn
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if len(figures.formats) > 1:
        lines += [f"Every figure is also written as {', '.join(f.upper() for f in figures.formats[1:])} "
                  f"(same name), {figures.dpi} dpi for raster formats.", ""]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return ReportResult(folder, kind, path, images, notes, figures.formats)


def write_report(folder: Path, cache: Path | None = None, windows: int = 5, device: str = "auto",
                 preface: Sequence[str] = (), allow_partial: bool = False, figures: Figures = DEFAULT) -> ReportResult:
    """Write the figures (every format of `figures`; PNG, PDF and SVG by default) and report.md of a run,
    ensemble or ablation folder. `preface`: lines put under the title (e.g. the demo's note that its data
    are synthetic)."""
    kind = folder_kind(folder)
    if kind == "ablation":
        res = report_ablation(folder, figures)
    elif kind == "ensemble":
        res = report_ensemble(folder, figures)
    else:
        res = report_run(folder, cache=cache, windows=windows, device=device, allow_partial=allow_partial,
                         figures=figures)
    if preface:
        text = res.report.read_text(encoding="utf-8").split("\n")
        res.report.write_text("\n".join(text[:2] + list(preface) + [""] + text[2:]), encoding="utf-8")
    return res


def is_png(path: Path) -> bool:
    """True for a non-empty file that starts with the PNG signature."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size <= len(PNG_SIGNATURE):
        return False
    with open(path, "rb") as fh:
        return fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def linked_files(report: Path) -> list[str]:
    """Relative targets of the Markdown links and images in a report."""
    text = Path(report).read_text(encoding="utf-8")
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]


__all__ = ["ReportError", "ReportResult", "SplitPredictions", "AblationRow", "write_report", "folder_kind",
           "report_run", "report_ensemble", "report_ablation", "read_ablation", "predictions_from_csv",
           "predictions_from_run", "plot_training_curves", "plot_threshold_curve", "plot_confusion",
           "plot_pr_curves", "plot_ablation_bars", "is_png", "linked_files", "REPORT_FILE", "Figures"]
