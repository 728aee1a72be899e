"""`ahcli compare A B --cache C`: is the Macro F1 difference between two run/ensemble folders noise?

Each folder's probabilities of the labelled val and test videos: a run folder is scored over the cache
(the first N cached eval windows, its own alpha), an ensemble folder is read from its predictions.csv (the
numbers its metrics.json was made from). Each is scored at its own threshold (tuned on val; a calibrated
run's calibrated probabilities at its re-tuned threshold, as `ahcli evaluate` scores it). The two are
paired video by video and the participants are resampled with replacement (heads/uncertainty.py): the
difference is distinguishable from noise when the 95% interval of A - B excludes 0.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahflows.ensemble import EnsembleError, is_ensemble_folder
from ahflows.raw_media import load_run_with_media
from extract.devices import resolve_device
from extract.errors import AHError
from extract.files import read_json_object
from extract.store import CacheReader
from heads.data import load_split
from heads.infer import data_needs, predict_split, require_inputs
from heads.run_files import check_fingerprint, is_run_folder
from heads.uncertainty import N_RESAMPLES, paired_difference, participant_ids

COMPARED = ("test", "val")


class CompareError(AHError):
    """Folders that are neither runs nor ensembles, or that scored different videos."""


@dataclass
class Scored:
    threshold: float
    probs: dict[str, dict[str, float]]          # split -> video_id -> probability (labelled videos)
    labels: dict[str, dict[str, int]]


def _ensemble_scores(folder: Path, reader: CacheReader) -> Scored:
    m = read_json_object(folder / "metrics.json", EnsembleError, "ensemble metrics")
    if m.get("cache_fingerprint") != reader.fingerprint:
        raise CompareError(f"{folder}: made on cache fingerprint {m.get('cache_fingerprint')}, but {reader.path} "
                           f"is {reader.fingerprint}")
    probs: dict[str, dict[str, float]] = {s: {} for s in COMPARED}
    labels: dict[str, dict[str, int]] = {s: {} for s in COMPARED}
    with open(folder / "predictions.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["split"] in COMPARED and row["label"] in ("0", "1"):
                probs[row["split"]][row["video_id"]] = float(row["probability"])
                labels[row["split"]][row["video_id"]] = int(row["label"])
    return Scored(float(m["threshold"]), probs, labels)


def _run_scores(folder: Path, reader: CacheReader, windows: int, device) -> Scored:
    run = load_run_with_media(folder, cache=reader, device=device)
    check_fingerprint(folder, run.fingerprint, reader.fingerprint)
    require_inputs(run, reader)
    needs = data_needs([run], reader)
    probs: dict[str, dict[str, float]] = {}
    labels: dict[str, dict[str, int]] = {}
    present = {reader.meta(v)["split"] for v in reader.video_ids()}
    for split in COMPARED:
        probs[split], labels[split] = {}, {}
        if split not in present:
            continue
        data = load_split(reader, split, layers=needs.layers, device=device, modalities=needs.modalities,
                          text_window=needs.text_window)
        ids, p, y = predict_split(run, data, windows=windows)
        if run.calibration is not None:              # as `ahcli evaluate` scores it
            p = run.calibration.apply(p)
        for v, pv, yv in zip(ids, p, y):
            if not np.isnan(yv):
                probs[split][v], labels[split][v] = float(pv), int(yv)
    return Scored(run.threshold if run.calibration is None else run.calibration.threshold, probs, labels)


def folder_scores(folder: Path, reader: CacheReader, windows: int = 5, device="cpu") -> Scored:
    folder = Path(folder)
    if is_run_folder(folder):
        return _run_scores(folder, reader, windows, device)
    if is_ensemble_folder(folder):
        return _ensemble_scores(folder, reader)
    raise CompareError(f"{folder}: neither a run folder (config.json) nor an ensemble folder (metrics.json + "
                       "predictions.csv)")


def compare_folders(a: Path, b: Path, cache: Path, *, windows: int = 5, n_resamples: int = N_RESAMPLES,
                    seed: int = 0, device: str = "auto") -> dict:
    """{"a", "b", "splits": {split: heads.uncertainty.paired_difference(...)}} over the videos both scored."""
    if n_resamples < 1:
        raise CompareError(f"resamples must be >= 1 (got {n_resamples})")
    reader = CacheReader(cache)
    dev = resolve_device(device)
    sa, sb = folder_scores(a, reader, windows, dev), folder_scores(b, reader, windows, dev)
    out = {"a": str(a), "b": str(b), "threshold_a": sa.threshold, "threshold_b": sb.threshold, "splits": {}}
    for split in COMPARED:
        ids = sorted(sa.probs[split])
        if not ids:
            continue
        if set(ids) != set(sb.probs[split]):
            raise CompareError(f"{a} and {b} scored different {split} videos ({len(ids)} vs "
                               f"{len(sb.probs[split])}); compare folders made on the same cache")
        y = np.array([sa.labels[split][v] for v in ids], dtype=float)
        if any(sb.labels[split][v] != sa.labels[split][v] for v in ids):
            raise CompareError(f"{a} and {b} disagree on the labels of {split} videos")
        pa = np.array([sa.probs[split][v] for v in ids])
        pb = np.array([sb.probs[split][v] for v in ids])
        out["splits"][split] = paired_difference(y, pa, sa.threshold, pb, sb.threshold, participant_ids(reader, ids),
                                                 n_resamples=n_resamples, seed=seed)
    if not out["splits"]:
        raise CompareError(f"{cache}: no labelled val or test videos to compare on")
    return out


__all__ = ["compare_folders", "folder_scores", "CompareError", "Scored"]
