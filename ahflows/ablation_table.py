"""The ablation table: one row per (table, setting, split, seed) plus aggregated 'mean' rows; its one CSV
writer and reader (ablation.csv) and its Markdown rendering (ablation.md)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from extract.errors import AHError
from extract.files import atomic_write_text
from extract.vocab import ALL_LETTERS

METRICS = ("macro_f1", "f1_ah", "f1_noah")
CSV_COLUMNS = ("table", "config", "split", "seed", "n_seeds", "macro_f1", "macro_f1_std", "f1_ah", "f1_ah_std",
               "f1_noah", "f1_noah_std", "ap", "accuracy", "threshold", "alpha", "windows", "best_epoch", "seconds",
               "videos", "listed")
OLD_COLUMNS = CSV_COLUMNS[:-2]        # ablation.csv files written before videos / listed were recorded
B_SMOOTHING = 0.1


class AblationTableError(AHError):
    """An ablation.csv that is not in the format `ahcli ablate` writes."""


@dataclass
class Row:
    table: str
    config: str
    split: str
    seed: int | str
    macro_f1: float
    f1_ah: float
    f1_noah: float
    ap: float | None = None
    accuracy: float | None = None
    threshold: float | None = None
    alpha: float | None = None
    windows: int | None = None
    best_epoch: int | None = None
    seconds: float | None = None
    n_seeds: int = 1
    std: dict[str, float] = field(default_factory=dict)
    videos: int | None = None         # videos of the split scored
    listed: int | None = None         # videos its split file lists


def aggregate(rows: Sequence[Row]) -> list[Row]:
    """One 'mean' row per (table, config, split): means, and sample std over seeds (0 for one seed)."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.table, r.config, r.split), []).append(r)
    out = []
    for (table, config, split), rs in groups.items():
        def mean(k: str) -> float | None:
            vals = [getattr(r, k) for r in rs if getattr(r, k) is not None]
            return float(np.mean(vals)) if vals else None

        std = {k: float(np.std([getattr(r, k) for r in rs], ddof=1)) if len(rs) > 1 else 0.0 for k in METRICS}
        out.append(Row(table, config, split, "mean", mean("macro_f1"), mean("f1_ah"), mean("f1_noah"), mean("ap"),
                       mean("accuracy"), mean("threshold"), rs[0].alpha, rs[0].windows, None, mean("seconds"),
                       n_seeds=len(rs), std=std, videos=rs[0].videos, listed=rs[0].listed))
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        d = dataclasses.asdict(r)
        for k in METRICS:
            d[f"{k}_std"] = r.std.get(k) if r.std else None
        w.writerow([_fmt(d.get(c)) for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def mean_std(mean: float | None, std: float | None, n: int, digits: int = 3, pm: str = "±") -> str:
    """'0.912 ± 0.013' over n > 1 seeds; '0.912' for one seed (the deviation of one value is undefined:
    the tables say 'n = 1' in their seeds column instead of printing '± 0.000')."""
    if mean is None:
        return "-"
    if n > 1 and std is not None:
        return f"{mean:.{digits}f} {pm} {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def cell(r: Row | None, k: str) -> str:
    if r is None:
        return "-"
    return mean_std(getattr(r, k), r.std.get(k), r.n_seeds)


def seeds_cell(rows: Sequence[Row | None]) -> str:
    """'n = 3' (the seeds behind a table row; 'n = 1, 3' if its cells differ)."""
    ns = sorted({r.n_seeds for r in rows if r is not None})
    return "n = " + ", ".join(str(n) for n in ns) if ns else "-"


TABLE4 = [("no_conflict", "No conflict features (v+a+t only)"), ("window_text", "Window-aligned transcript only"),
          ("alpha=0", "Text blend α = 0.0 (full-fusion only)"), ("alpha=0.5", "Text blend α = 0.5"),
          ("alpha=0.6", "Text blend α = 0.6 (ours)"), ("alpha=1", "Text blend α = 1.0 (text-only at inference)")]
TABLE5 = [("modality=v", "Video only"), ("modality=a", "Audio only"), ("modality=t", "Text only"),
          ("modality=va", "Video + Audio"), ("modality=vt", "Video + Text"), ("modality=at", "Audio + Text"),
          ("modality=vat", "All three (ours)")]
TABLE6 = [("windows=1", "Inference: 1 window"), ("windows=3", "Inference: 3 windows"),
          ("windows=5", "Inference: 5 windows (ours)"), ("single_A", "Single checkpoint A (5 windows)"),
          ("single_B", "Single checkpoint B (5 windows)"), ("ensemble_AB", "Ensemble of 2 checkpoints (5 win.)")]


@dataclass
class Block:
    """One table as the paper lays it out: a row label, then (split, metric) cells of aggregated rows."""
    title: str
    first: str                                  # header of the label column
    splits: list[str]
    rows: list[tuple[str, list[Row | None]]]    # (label, the aggregated row of each split)


def blocks(agg: Sequence[Row]) -> list[Block]:
    """Tables 4, 5 and 6 with the rows present (Table 5 on val and test, the others on test, else val)."""
    by = {(r.table, r.config, r.split): r for r in agg}
    test = ["test"] if any(r.split == "test" for r in agg) else ["val"]
    spec = [("Table 4. Component ablation (" + test[0] + " split)", "4", TABLE4, test, "Configuration"),
            ("Table 5. Modality ablation (" + ("validation and test splits" if test == ["test"] else "val split") + ")",
             "5", TABLE5, ["val", "test"] if test == ["test"] else ["val"], "Modality"),
            ("Table 6. Inference settings (" + test[0] + " split)", "6", TABLE6, test, "Setting")]
    out = []
    for title, tab, items, splits, first in spec:
        rows = [(label, [by.get((tab, c, s)) for s in splits]) for c, label in items
                if any((tab, c, s) in by for s in splits)]
        if rows:
            out.append(Block(title, first, splits, rows))
    return out


def markdown(agg: Sequence[Row], meta: dict[str, Any]) -> str:
    def table(b: Block) -> list[str]:
        head = [b.first] + [f"{s} {m}" if len(b.splits) > 1 else m for s in b.splits
                            for m in ("Macro F1", "F1-AH", "F1-NoAH")] + ["seeds"]
        lines = [f"## {b.title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for label, rs in b.rows:
            vals = [cell(r, k) for r in rs for k in METRICS] + [seeds_cell(rs)]
            lines.append("| " + " | ".join([label] + vals) + " |")
        return lines + [""]

    out = [f"# Ablation: {meta['cache']}", "",
           f"Cache fingerprint `{meta['fingerprint']}`; seeds {meta['seeds']}; "
           f"{meta['trainings']} trainings in {meta['seconds']:.0f} s on {meta['device']}.",
           f"Options: {json.dumps(meta['base'], sort_keys=True) if meta['base'] else 'the paper defaults'}.",
           f"Tables 4 and 5 use {meta['windows']} inference window(s) (the paper: 1); each setting's threshold "
           "is swept on val at that setting. Cells: mean ± sample std (ddof = 1) over the n seeds of the last "
           "column; with n = 1 the mean alone (no deviation).", videos_line(meta.get("videos")),
           ""]
    test = ["test"] if any(r.split == "test" for r in agg) else ["val"]
    for b in blocks(agg):
        out += table(b)
    if meta["quick"]:
        out.append("- Quick: only v, a, t and vat trained; the component rows of Table 4 and the ensemble are absent.")
    else:
        out += [f"- {meta['a_note']}; checkpoint B = vat, eps {B_SMOOTHING}, frozen.",
                f"- Window-aligned transcript: {'trained' if meta['window_text'] else 'not in the cache: row absent'}."]
    out.append(f"- Windows are capped at the {meta['cap']} eval window(s) the cache holds.")
    margin = full_vs_single(agg, test[0])
    if margin is not None:
        out.append(f"- Full model vs the best single modality ({test[0]} Macro F1): {margin:+.3f}.")
    return "\n".join(out) + "\n"


def videos_line(videos: dict[str, Any] | None) -> str:
    """'Videos used or scored / listed in the split files: train 24/24, val 12/12, test 4/8 (PARTIAL).'"""
    if not videos:
        return "Videos scored / listed: not recorded."
    parts = [f"{s} {v['scored']}/{v['listed']}" + (" (PARTIAL: --allow-partial)" if v["scored"] < v["listed"] else "")
             for s, v in videos.items()]
    return "Videos used or scored / listed in the split files: " + ", ".join(parts) + "."


def full_vs_single(agg: Sequence[Row], split: str = "test") -> float | None:
    by = {(r.config, r.split): r.macro_f1 for r in agg if r.table == "5"}
    full = by.get(("modality=vat", split))
    singles = [by[(f"modality={m}", split)] for m in ALL_LETTERS if (f"modality={m}", split) in by]
    if full is None or not singles:
        return None
    return full - max(singles)


_INTS = ("n_seeds", "windows", "best_epoch", "videos", "listed")
_FLOATS = ("macro_f1", "f1_ah", "f1_noah", "ap", "accuracy", "threshold", "alpha", "seconds")


def read_csv(path: Path) -> list[Row]:
    """ablation.csv as written by `write_csv` (refused in one line when its columns differ)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) not in (CSV_COLUMNS, OLD_COLUMNS):
                raise AblationTableError(f"{path}: not an ablation.csv of `ahcli ablate` (columns "
                                         f"{', '.join(reader.fieldnames or [])})")
            raw = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise AblationTableError(f"{path}: unreadable ({exc})") from exc
    rows = []
    for i, r in enumerate(raw, start=2):
        try:
            val = {k: (float(r[k]) if r[k] != "" else None) for k in _FLOATS}
            val |= {k: (int(float(r[k])) if r.get(k) not in ("", None) else None) for k in _INTS}
            std = {k: float(r[f"{k}_std"]) for k in METRICS if r[f"{k}_std"] != ""}
            seed = r["seed"] if r["seed"] == "mean" else int(r["seed"])
        except (ValueError, TypeError) as exc:
            raise AblationTableError(f"{path}:{i}: bad value ({exc})") from exc
        rows.append(Row(r["table"], r["config"], r["split"], seed, n_seeds=val.pop("n_seeds") or 1, std=std, **val))
    return rows
