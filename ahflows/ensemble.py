"""Checkpoint ensembles (`ahcli ensemble`).

An ensemble averages, per video, the runs' blended probabilities (each run with its own alpha, over the
first N cached eval windows), tunes ONE threshold on val (sweep [0.25, 0.75] step 0.01), and scores val and
test at it. The ensemble probability is rounded to 4 decimals, the precision of the challenge file, BEFORE
the threshold is tuned and applied: predictions.csv, metrics.json and the submission then agree on every
decision (a prediction is always `p1 >= threshold` of the number printed). Runs trained on different caches
(fingerprints) are refused. When the cache holds the private split (or `data_root` names its split file),
the challenge files are written too: see ahflows/submission.py for their order and missing videos.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ahflows.raw_media import load_run_with_media
from ahflows.paper_tables import write_ensemble_tables
from ahflows.submission import (DECIMALS, PLACEHOLDER_P1, check_missing, private_order, private_split_file, quantise,
                                write_submission)
from extract.devices import resolve_device
from extract.errors import AHError
from extract.files import atomic_write_json, atomic_write_text, read_json_object, refuse_foreign_folder
from extract.listing import require_complete, split_coverage
from extract.locks import folder_lock
from extract.stopping import never
from extract.store import CacheReader
from extract.vocab import SPLITS
from heads.data import SplitData, load_split
from heads.infer import data_needs, predict_split
from heads.metrics import bah_metrics, sweep_threshold
from heads.run_files import is_run_folder, read_config
from heads.runs import Run
from heads.calibration import CALIBRATION_FILE, calibrate, save_calibration
from heads.uncertainty import bootstrap_intervals, participant_ids

SCORED = ("val", "test")                  # the splits whose metrics are reported (private: see submission.py)


class EnsembleError(AHError):
    """Runs that cannot be combined, or a cache without val labels."""


# ---- runs ------------------------------------------------------------------------------------------


def check_fingerprints(runs: Sequence[Path], cache_fingerprint: str) -> None:
    """Refuse runs made on different caches, or on another cache than this one (from config.json alone)."""
    fps = [((read_config(r).get("cache") or {}).get("fingerprint"), r) for r in runs]
    first_fp, first = fps[0]
    for fp, r in fps[1:]:
        if fp != first_fp:
            raise EnsembleError(f"{r}: trained on cache fingerprint {fp}, but {first} on {first_fp}; "
                                "an ensemble needs runs trained on one cache")
    if first_fp != cache_fingerprint:
        raise EnsembleError(f"runs were trained on cache fingerprint {first_fp}, but this cache is "
                            f"{cache_fingerprint}; ensemble them over the cache they were trained on")


def load_runs(runs: Sequence[Path], reader: CacheReader, device, data_root: Path | None = None,
              private_root: Path | None = None) -> list[Run]:
    """Load each run folder after the fingerprint checks. `data_root`/`private_root` let a fine-tuned run
    without cached prefix states run its encoders on the raw media (ahflows.raw_media)."""
    if not runs:
        raise EnsembleError("ensemble: give at least one run folder")
    check_fingerprints(runs, reader.fingerprint)
    return [load_run_with_media(r, cache=reader, device=device, data_root=data_root, private_root=private_root)
            for r in runs]


def run_probs(runs: Sequence[Run], data: SplitData, windows: int) -> list[np.ndarray]:
    """Per run: window-averaged blended probabilities (the run's alpha) of every video of `data`."""
    return [predict_split(r, data, windows=windows)[1] for r in runs]


# ---- the ensemble ----------------------------------------------------------------------------------


@dataclass
class SplitScores:
    split: str
    video_ids: list[str]
    labels: np.ndarray                      # NaN = unlabelled
    per_run: list[np.ndarray]               # each run's probabilities
    probs: np.ndarray                       # ensemble probability, quantised

    @property
    def labelled(self) -> np.ndarray:
        return ~np.isnan(self.labels)


def scored_splits(reader: CacheReader, allow_partial: bool, without_val: str) -> tuple[list[str], dict]:
    """The cache's splits and their coverage; refuses a cache without val (`without_val` says what fails) and a
    partial val/test split unless `allow_partial`."""
    splits = cache_splits(reader)
    if "val" not in splits:
        raise EnsembleError(f"{reader.path}: the cache holds no val split: {without_val}")
    coverage = {s: split_coverage(reader, s) for s in splits}
    for s in SCORED:
        if s in coverage:
            require_complete(coverage[s], str(reader.path), allow_partial)
    return splits, coverage


def cache_splits(reader: CacheReader) -> list[str]:
    present = {reader.meta(v)["split"] for v in reader.video_ids()}
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def score_splits(reader: CacheReader, runs: Sequence[Run], splits: Sequence[str], windows: int, device,
                 on_split: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] = never) -> dict[str, SplitScores] | None:
    """Every run's and the ensemble's probabilities per split; each split loaded once, then released.
    None when `should_stop` says so before a split."""
    needs = data_needs(runs, reader)
    out = {}
    for split in splits:
        if should_stop():
            return None
        if on_split is not None:
            on_split(split)
        data = load_split(reader, split, layers=needs.layers, device=device, modalities=needs.modalities,
                          text_window=needs.text_window)
        per_run = run_probs(runs, data, windows)
        out[split] = SplitScores(split, list(data.video_ids), data.labels.cpu().numpy().astype(np.float64),
                                 per_run, quantise(np.mean(per_run, axis=0)))
        del data
    return out


def _metrics(s: SplitScores, probs: np.ndarray, threshold: float) -> dict | None:
    keep = s.labelled
    if not keep.any():
        return None
    return bah_metrics(s.labels[keep], probs=probs[keep], threshold=threshold)


def tune_threshold(val: SplitScores) -> float:
    keep = val.labelled
    if not keep.any():
        raise EnsembleError("the cache's val split holds no labelled videos: the threshold cannot be tuned")
    t, _ = sweep_threshold(val.probs[keep], val.labels[keep], 0.25, 0.75, 0.01)
    return t


def write_predictions(path: Path, scores: dict[str, SplitScores], threshold: float) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["video_id", "split", "probability", "prediction", "label"])
    for s in scores.values():
        for vid, p, y in zip(s.video_ids, s.probs, s.labels):
            w.writerow([vid, s.split, f"{p:.{DECIMALS}f}", int(p >= threshold), "" if np.isnan(y) else int(y)])
    atomic_write_text(path, buf.getvalue())


ENSEMBLE_OWN_FILES = (".lock", "ensemble.log")


def is_ensemble_folder(path: Path) -> bool:
    """A folder this program wrote as an ensemble (its metrics.json lists member runs; it is no run)."""
    try:
        m = read_json_object(Path(path) / "metrics.json", EnsembleError)
    except (EnsembleError, FileNotFoundError):
        return False
    return "runs" in m and "threshold" in m and not is_run_folder(path)


def check_out_folder(out: Path, runs: Sequence[Path]) -> None:
    """OUT is new, empty or an earlier ensemble's, and none of the input runs (one line, nothing written)."""
    if any(Path(out).resolve() == Path(r).resolve() for r in runs):
        raise EnsembleError(f"{out}: is one of the input runs; choose another --out (nothing was changed)")
    refuse_foreign_folder(out, is_ensemble_folder, "an ensemble folder", ours=ENSEMBLE_OWN_FILES)


def run_ensemble(
    runs: Sequence[Path],
    cache: Path,
    out: Path,
    windows: int = 5,
    *,
    data_root: Path | None = None,
    private_root: Path | None = None,
    allow_missing: bool = False,
    allow_partial: bool = False,
    device: str = "auto",
    warn: Callable[[str], None] | None = None,
    on_split: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] = never,
    template: Path | None = None,
    trial: int = 0,
    calibrated: bool = False,
) -> dict | None:
    """Average the runs over `cache`, tune the threshold on val, write OUT/metrics.json, OUT/predictions.csv
    and (with a private split) the submission files. Returns the metrics.json content, or None when
    `should_stop` said so between two splits (nothing is written then: a rerun starts over, in seconds).
    A val or test split the cache holds only part of is refused unless `allow_partial`; metrics.json states
    videos scored / listed per split. OUT is locked while it is written."""

    if windows < 1:
        raise EnsembleError(f"windows must be >= 1 (got {windows})")
    out = Path(out)
    check_out_folder(out, runs)
    reader = CacheReader(cache)
    dev = resolve_device(device)
    loaded = load_runs([Path(r) for r in runs], reader, dev, data_root, private_root)
    # the organisers' template (exactly its ids, in its order) when given; trial-<trial>.txt (ahflows/submission.py)
    order = private_order(reader, private_split_file(data_root, private_root), template, trial)
    if order is not None:
        check_missing(order, allow_missing)               # before any work: refuse early
    splits, coverage = scored_splits(reader, allow_partial, "the threshold cannot be tuned")
    with folder_lock(out, "ensemble folder"):
        scores = score_splits(reader, loaded, splits, windows, device, on_split, should_stop)
        if scores is None:
            return None
        return write_ensemble(out, reader, loaded, scores, coverage, order, windows, warn, calibrated=calibrated)


def split_intervals(reader: CacheReader, s: SplitScores, probs: np.ndarray, threshold: float) -> dict | None:
    """Participant-bootstrap 95% intervals (heads/uncertainty.py) of a labelled split's metrics."""
    keep = s.labelled
    if not keep.any():
        return None
    ids = [v for v, k in zip(s.video_ids, keep) if k]
    return bootstrap_intervals(s.labels[keep], probs[keep], threshold, participant_ids(reader, ids))


def write_ensemble(out: Path, reader: CacheReader, loaded: Sequence[Run], scores: dict[str, SplitScores],
                   coverage: dict, order, windows: int, warn: Callable[[str], None] | None = None,
                   extra: dict | None = None, calibrated: bool = False) -> dict:
    """The ensemble folder from scored splits (`scores[s].probs` = the ensemble's probabilities, per_run in
    the order of `loaded`; a run may appear several times: its weight): the threshold tuned on val,
    metrics.json (with participant-bootstrap intervals), predictions.csv and the submission files when
    `order` is given. `extra` goes into metrics.json as is (e.g. how a sweep selected the members).
    With `calibrated`, a temperature fitted on val (heads/calibration.py) rescales every probability before
    the threshold is tuned: predictions.csv, metrics.json and the submission carry the calibrated values and
    OUT/calibration.json the temperature (a stale one is removed otherwise)."""
    cal = None
    if calibrated:
        scores, cal = _calibrated(scores)
    else:
        (out / CALIBRATION_FILE).unlink(missing_ok=True)
    t = tune_threshold(scores["val"])
    test = scores.get("test")
    record = {
        "threshold": t,
        "val": _metrics(scores["val"], scores["val"].probs, t),
        "test": None if test is None else _metrics(test, test.probs, t),
        "runs": [_run_record(r, i, scores, windows) for i, r in enumerate(loaded)],
        "cache_fingerprint": reader.fingerprint,
        "videos": {s: c.counts() for s, c in coverage.items()},
        "intervals": {s: split_intervals(reader, scores[s], scores[s].probs, t) for s in SCORED if s in scores},
    }
    if extra:
        record.update(extra)
    if cal is not None:
        cal.threshold = t                    # tuned on the calibrated, 4-decimal probabilities
        save_calibration(out, cal)
        record["calibration"] = {"temperature": cal.temperature, "file": CALIBRATION_FILE,
                                 "val_ece_before": cal.scores["val"]["ece_before"],
                                 "val_ece_after": cal.scores["val"]["ece_after"]}
    write_predictions(out / "predictions.csv", scores, t)
    if order is not None:
        priv = scores.get("private")
        probs = dict(zip(priv.video_ids, priv.probs.tolist())) if priv is not None else {}
        write_submission(out, order, probs, t)
        if warn is not None:
            if order.missing:
                warn(f"{len(order.missing)} private video(s) missing from the cache got placeholder lines "
                     f"(p1 = {PLACEHOLDER_P1:.4f}): {', '.join(order.missing)}")
            if order.extra:
                warn(f"{len(order.extra)} private video(s) of the cache are not in {order.source}: left out")
            if order.problems:
                warn(f"{order.source}: {len(order.problems)} line(s) could not be read: {order.problems[0]}")
            if order.source.startswith("cache"):
                warn("submission lines follow the cache's video_id order; pass --data ROOT to follow the "
                     "private split file's order")
    write_ensemble_tables(out, record)                    # ensemble.md / .tex for a paper (ahflows/paper_tables.py)
    atomic_write_json(out / "metrics.json", record)
    return record


def _calibrated(scores: dict[str, SplitScores]):
    """Every split's ensemble probabilities rescaled by a temperature fitted on the labelled val videos."""
    val = scores["val"]
    keep = val.labelled
    if not keep.any():
        raise EnsembleError("the cache's val split holds no labelled videos: the temperature cannot be fitted")
    others = {s: (sc.probs[sc.labelled], sc.labels[sc.labelled]) for s, sc in scores.items()
              if s in SCORED and s != "val"}
    cal = calibrate(val.probs[keep], val.labels[keep], tune_threshold(val), others)
    return {s: replace(sc, probs=quantise(cal.apply(sc.probs))) for s, sc in scores.items()}, cal


def _run_record(run: Run, i: int, scores: dict[str, SplitScores], windows: int) -> dict:
    """One member: where it is, its alpha/threshold, and its own scores at its own threshold."""
    rec = {"path": str(run.path), "alpha": run.alpha if run.model_config.has_text else 0.0,
           "threshold": run.threshold, "windows": windows, "modalities": run.model_config.modalities,
           "label_smoothing": run.train_config.label_smoothing}
    for split in ("val", "test"):
        s = scores.get(split)
        m = None if s is None else _metrics(s, s.per_run[i], run.threshold)
        rec[split] = None if m is None else {k: m[k] for k in ("macro_f1", "f1_ah", "f1_noah", "ap", "accuracy")}
    return rec


__all__ = ["EnsembleError", "run_ensemble", "load_runs", "check_fingerprints", "score_splits", "write_ensemble",
           "tune_threshold", "write_predictions", "split_intervals", "cache_splits", "SplitScores", "SCORED"]
