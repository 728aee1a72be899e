"""The organisers' BAH metrics against hand-computed cases, and the threshold sweep."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from heads.metrics import (average_precision, bah_metrics, macro_f1, macro_f1_at, predict, sweep_threshold,
                           thresholds)


def test_hand_computed_f1_accuracy_confusion():
    y = [1, 1, 1, 0, 0]
    p = [1, 1, 0, 1, 0]
    # class 1: tp 2, fp 1, fn 1 -> F1 = 4/6; class 0: tp 1, fp 1, fn 1 -> F1 = 2/4
    m = bah_metrics(y, preds=p)
    assert m["f1_ah"] == pytest.approx(2 / 3)
    assert m["f1_noah"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2) / 5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # rows are the truth (0 then 1), normalised
    assert m["confusion"] == [[0.5, 0.5], [pytest.approx(1 / 3), pytest.approx(2 / 3)]]
    assert m["ap"] is None
    assert macro_f1(y, p) == pytest.approx(m["macro_f1"])


def test_one_class_never_predicted_scores_zero_for_it():
    m = bah_metrics([1, 0, 1, 0], preds=[1, 1, 1, 1])
    assert m["f1_noah"] == 0.0
    assert m["f1_ah"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(1 / 3)


def test_prediction_is_p_at_least_threshold():
    assert predict([0.49, 0.5, 0.51], 0.5).tolist() == [0, 1, 1]
    m = bah_metrics([0, 1, 1], probs=[0.49, 0.5, 0.51], threshold=0.5)
    assert m["accuracy"] == 1.0


def organisers_ap(probs, gt):
    """The loop of the organisers' bah_metrics.average_precision, written out plainly."""
    from sklearn.metrics import auc

    prec, rec = [], []
    for th in np.arange(0, 1, 0.001).tolist():
        pred = (probs >= th).astype(float)
        tp = np.sum((pred == 1) & (gt == 1))
        fp = np.sum((pred == 1) & (gt == 0))
        fn = np.sum((pred == 0) & (gt == 1))
        prec.append(tp / (tp + fp) if tp + fp > 0 else 0.0)
        rec.append(tp / (tp + fn))
    return float(auc(np.array(rec), np.array(prec)))


def test_ap_hand_computed_trapezoid():
    probs = np.array([0.9, 0.4, 0.6, 0.1])
    gt = np.array([1, 1, 0, 0])
    # (recall, precision) as the threshold rises: (1, 1/2) -> (1, 2/3) -> (1/2, 1/2) -> (1/2, 1) -> (0, 0)
    # trapezoids: 1/2 * (2/3 + 1/2) / 2 + 1/2 * (1 + 0) / 2 = 7/24 + 6/24 = 13/24
    assert average_precision(probs, gt) == pytest.approx(13 / 24, abs=1e-12)
    assert average_precision(probs, gt) == pytest.approx(organisers_ap(probs, gt), abs=1e-12)
    # and it is not sklearn's step-wise average precision
    assert abs(average_precision_score(gt, probs) - 13 / 24) > 0.05


def test_ap_matches_the_organisers_loop_on_random_data():
    rng = np.random.default_rng(0)
    probs = rng.random(200)
    gt = (rng.random(200) < 0.4 + 0.3 * probs).astype(int)
    assert average_precision(probs, gt) == pytest.approx(organisers_ap(probs, gt), abs=1e-12)
    assert bah_metrics(gt, probs=probs, threshold=0.5)["ap"] == pytest.approx(organisers_ap(probs, gt))


def test_threshold_grid_is_inclusive():
    t = thresholds(0.25, 0.75, 0.01)
    assert len(t) == 51 and t[0] == 0.25 and t[-1] == 0.75 and 0.5 in t.tolist()


def test_vectorised_macro_f1_equals_sklearn():
    rng = np.random.default_rng(1)
    probs, y = rng.random(77), rng.integers(0, 2, 77)
    ths = thresholds()
    ours = macro_f1_at(probs, y, ths)
    ref = [f1_score(y, (probs >= t).astype(int), average="macro", labels=[0, 1], zero_division=0) for t in ths]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_sweep_finds_the_separating_threshold():
    probs = np.array([0.1, 0.2, 0.3, 0.45, 0.62, 0.7, 0.8])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    t, f1 = sweep_threshold(probs, y)
    # every t in (0.45, 0.62] separates perfectly; the lowest on the grid is 0.46
    assert t == pytest.approx(0.46)
    assert f1 == 1.0


def test_sweep_ties_go_to_the_lowest_threshold_and_stay_in_range():
    probs = np.array([0.05, 0.95, 0.05, 0.95])
    y = np.array([0, 1, 1, 0])              # every threshold in [0.25, 0.75] gives the same F1
    t, f1 = sweep_threshold(probs, y)
    assert t == 0.25 and f1 == pytest.approx(0.5)
    t, _ = sweep_threshold(np.array([0.99, 0.98, 0.01]), np.array([1, 1, 0]), lo=0.3, hi=0.6, step=0.1)
    assert t == pytest.approx(0.3)


def test_nan_labels_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        bah_metrics([1, np.nan], preds=[1, 0])
