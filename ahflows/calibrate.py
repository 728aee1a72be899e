"""`ahcli calibrate RUN --cache C`: temperature scaling of a run folder, fitted on val (heads/calibration.py).

The run's window-averaged blended probabilities of the labelled val videos (the first N cached eval windows,
as `ahcli evaluate` scores them) fit T; the threshold is re-tuned on the calibrated val probabilities; ECE
and NLL before/after are measured on val and, when the cache holds it, test. RUN/calibration.json then
holds T, the threshold and the reliability diagram's numbers, and `evaluate`, `predict` and `compare` apply
it. An ensemble is calibrated when it is made (`ahcli ensemble ... --calibrate`, `ahcli sweep ... --calibrate`)
because its predictions.csv and submission files must carry the calibrated values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ahflows.calibration_plots import plot_reliability
from ahflows.ensemble import is_ensemble_folder
from ahflows.plots import DEFAULT, Figures
from ahflows.raw_media import load_run_with_media
from extract.devices import resolve_device
from extract.errors import AHError
from extract.locks import folder_lock
from extract.store import CacheReader
from heads.calibration import Calibration, calibrate, save_calibration
from heads.data import load_split
from heads.infer import data_needs, predict_split, require_inputs
from heads.run_files import is_run_folder, read_metrics


class CalibrateError(AHError):
    """A folder that is not a finished run, or a cache without labelled val videos."""


def calibrate_run(run_dir: Path, cache: Path, windows: int = 5, device: str = "auto",
                  figures: Figures = DEFAULT) -> Calibration:
    """Fit, store (RUN/calibration.json) and draw (RUN/reliability.png) a run's temperature scaling."""
    run_dir = Path(run_dir)
    if is_ensemble_folder(run_dir):
        raise CalibrateError(f"{run_dir}: an ensemble folder is calibrated when it is written: rerun "
                             "`ahcli ensemble ... --calibrate` (its predictions and submission change)")
    if not is_run_folder(run_dir):
        raise CalibrateError(f"{run_dir}: not a run folder (config.json missing)")
    read_metrics(run_dir)                               # a finished run only (one line otherwise)
    if windows < 1:
        raise CalibrateError(f"windows must be >= 1 (got {windows})")
    reader = CacheReader(cache)
    dev = resolve_device(device)
    run = load_run_with_media(run_dir, cache=reader, device=dev)
    require_inputs(run, reader)
    needs = data_needs([run], reader)
    present = {reader.meta(v)["split"] for v in reader.video_ids()}
    labelled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("val", "test"):
        if split not in present:
            continue
        data = load_split(reader, split, layers=needs.layers, device=dev, modalities=needs.modalities,
                          text_window=needs.text_window)
        _, p, y = predict_split(run, data, windows=windows)
        keep = ~np.isnan(y)
        labelled[split] = (p[keep], y[keep])
        del data
    if "val" not in labelled or not len(labelled["val"][1]):
        raise CalibrateError(f"{cache}: no labelled val videos to fit the temperature on")
    val_p, val_y = labelled.pop("val")
    cal = calibrate(val_p, val_y, run.threshold, labelled)
    with folder_lock(run_dir, "run folder"):
        save_calibration(run_dir, cal)
        plot_reliability(cal, run_dir / "reliability.png", figures)
    return cal


__all__ = ["calibrate_run", "CalibrateError"]
