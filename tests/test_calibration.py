"""Temperature scaling (heads/calibration.py): the fit, ECE, the stored record. The run/ensemble tests (a
deliberately over-confident run: ECE after <= before on val; applied by evaluate and compare; a calibrated
ensemble's files; the report section) are in tests/test_sweep.py, over its runs."""
from __future__ import annotations

import json

import numpy as np
import pytest



def _overconfident(seed: int = 0, n: int = 400):
    """Labels drawn from a true probability q; the model says sigmoid(4 logit q): right ranking, far too sure."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < q).astype(float)
    z = np.log(q) - np.log1p(-q)
    return 1 / (1 + np.exp(-4 * z)), y


def test_temperature_softens_an_overconfident_model():
    from heads.calibration import apply_temperature, calibrate, ece, nll
    from heads.metrics import average_precision

    p, y = _overconfident()
    cal = calibrate(p, y, 0.5, {"test": _overconfident(1)})
    assert 3.0 < cal.temperature < 5.5                      # about the 4 that made it over-confident
    for split in ("val", "test"):
        s = cal.scores[split]
        assert s["ece_after"] < s["ece_before"] and s["nll_after"] < s["nll_before"]
    q = apply_temperature(p, cal.temperature)
    assert ece(q, y) == pytest.approx(cal.scores["val"]["ece_after"]) and nll(q, y) < nll(p, y)
    assert np.array_equal(np.argsort(p, kind="stable"), np.argsort(q, kind="stable"))     # ranking kept
    # the organisers' AP reads a 0.001 threshold grid: spreading the crowded extremes can only help it here
    assert average_precision(q, y) >= average_precision(p, y)
    assert 0.25 <= cal.threshold <= 0.75
    assert sum(cal.diagrams["val"]["after"]["count"]) == len(y)


def test_ece_uses_equal_width_bins():
    from heads.calibration import ece, reliability

    r = reliability([0.05, 0.05, 0.95, 1.0], [0, 1, 1, 1], bins=10)
    assert r.count[0] == 2 and r.count[9] == 2 and sum(r.count) == 4      # 1.0 falls in the last bin
    assert ece([0.05, 0.05, 0.95, 1.0], [0, 1, 1, 1], bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)
    assert ece([0.0, 1.0], [0, 1]) == 0.0


def test_a_calibration_file_that_is_not_one_is_refused(tmp_path):
    from heads.calibration import CALIBRATION_FILE, CalibrationError, load_calibration

    assert load_calibration(tmp_path) is None
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"temperature": -1, "threshold": 0.5,
                                                         "threshold_before": 0.5}))
    with pytest.raises(CalibrationError, match="temperature must be a positive number"):
        load_calibration(tmp_path)
