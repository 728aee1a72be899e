"""What `ahcli report` reads: predictions of an ensemble folder (predictions.csv) or of a run scored over its
cache, and the JSON / CSV files of those folders, each refused in one line (ReportError) when unreadable."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ahflows.ensemble import cache_splits, score_splits
from ahflows.plots import SplitPredictions
from extract.devices import resolve_device
from extract.errors import AHError
from extract.files import read_json_object
from extract.listing import require_complete, split_coverage
from extract.store import CacheReader
from heads.runs import load_run


class ReportError(AHError):
    """A folder that is neither a run, an ensemble nor an ablation, or a run whose cache cannot be found."""


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ReportError)


def read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"{path}: not a readable CSV file ({exc})") from exc


# ---- reading predictions ---------------------------------------------------------------------------


def predictions_from_csv(path: Path) -> dict[str, SplitPredictions]:
    """predictions.csv of an ensemble -> labelled probabilities per split."""
    by_split: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(read_rows(path), start=2):
        if not row.get("label"):
            continue
        try:
            p, y = float(row["probability"]), float(row["label"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path} line {i}: expected probability and label columns ({exc})") from exc
        probs, labels = by_split.setdefault(row.get("split", "?"), ([], []))
        probs.append(p)
        labels.append(y)
    return {s: SplitPredictions(s, np.array(p), np.array(y)) for s, (p, y) in by_split.items()}


def predictions_from_run(run_dir: Path, cache: Path, windows: int = 5, device: str = "auto",
                         splits: Sequence[str] = ("val", "test"), allow_partial: bool = False,
                         listed: dict[str, int] | None = None) -> tuple[dict[str, SplitPredictions], Any]:
    """Score a run over its cache (the same inference as `ahcli evaluate`): per split, and the loaded run.
    A split the cache holds only part of is refused unless `allow_partial`; `listed` gets each scored
    split's listed count."""

    reader = CacheReader(cache)
    run = load_run(run_dir, cache=reader, device=resolve_device(device))
    present = [s for s in splits if s in cache_splits(reader)]
    for split in present:
        cov = require_complete(split_coverage(reader, split), str(cache), allow_partial)
        if listed is not None:
            listed[split] = len(cov.listed)
    scores = score_splits(reader, [run], present, windows, device)
    out = {}
    for split, s in scores.items():
        keep = s.labelled
        if keep.any():
            out[split] = SplitPredictions(split, s.per_run[0][keep], s.labels[keep])
    return out, run


def run_cache_path(run_dir: Path, cache: Path | None) -> Path | None:
    """The cache to score a run on: the one given, else the one recorded in its config.json (if it exists)."""
    if cache is not None:
        return Path(cache)
    recorded = (read_json(Path(run_dir) / "config.json").get("cache") or {}).get("path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return None


__all__ = ["ReportError", "read_json", "read_rows", "predictions_from_csv", "predictions_from_run", "run_cache_path"]
