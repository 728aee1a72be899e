"""heads/uncertainty.py: the participant bootstrap equals the organisers' metrics at unit weights, resamples
participants (not videos), and the paired test calls a system against itself no difference."""
from __future__ import annotations

import numpy as np
import pytest


def _case(seed: int = 0, n: int = 300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, p


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_unit_weights_equal_the_organisers_metrics(threshold):
    from heads.metrics import bah_metrics
    from heads.uncertainty import weighted_scores

    y, p = _case()
    m = bah_metrics(y, probs=p, threshold=threshold)
    s = weighted_scores(np.ones((1, len(y))), y, p, threshold)
    for k in ("macro_f1", "f1_ah", "f1_noah", "ap"):
        assert s[k][0] == pytest.approx(m[k], abs=1e-12), k


def test_integer_weights_equal_repeating_the_videos():
    """A participant drawn twice is the same as their videos listed twice (checked against sklearn's code)."""
    from heads.metrics import bah_metrics
    from heads.uncertainty import weighted_scores

    y, p = _case(1, 60)
    w = np.random.default_rng(2).integers(0, 3, len(y))
    rep = np.repeat(np.arange(len(y)), w)
    m = bah_metrics(y[rep], probs=p[rep], threshold=0.5)
    s = weighted_scores(w[None, :].astype(float), y, p, 0.5)
    for k in ("macro_f1", "f1_ah", "f1_noah", "ap"):
        assert s[k][0] == pytest.approx(m[k], abs=1e-12), k


def test_resampling_draws_whole_participants():
    from heads.uncertainty import resample_weights

    groups = ["p1", "p1", "p1", "p2", "p3", "p3"]
    w = resample_weights(groups, n_resamples=200, seed=4)
    assert w.shape == (200, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 3, 4]].sum(1) == 3).all()              # 3 participants drawn per resample
    assert not (w[:, 0] == w[:, 3]).all()


def test_participant_and_video_resampling_give_different_widths():
    """20 participants with 10 videos each; a participant's videos are all right or all wrong. Videos are then
    not independent: the video bootstrap believes in 200 observations and gives a far narrower interval."""
    from heads.uncertainty import bootstrap_intervals

    rng = np.random.default_rng(5)
    pids = np.repeat(np.arange(20), 10)
    y = np.tile([0.0, 1.0], 100)
    right = rng.random(20) < 0.7                            # per participant
    p = np.where(right[pids], np.where(y == 1, 0.8, 0.2), np.where(y == 1, 0.2, 0.8))
    by_participant = bootstrap_intervals(y, p, 0.5, [f"p{g}" for g in pids])
    by_video = bootstrap_intervals(y, p, 0.5, [f"video:{i}" for i in range(len(y))])
    assert by_participant["unit"] == "participant" and by_participant["participants"] == 20
    assert by_video["unit"] == "video" and by_video["participants"] == 200
    assert by_participant["macro_f1"]["value"] == by_video["macro_f1"]["value"]

    def width(iv):
        return iv["macro_f1"]["high"] - iv["macro_f1"]["low"]

    assert width(by_participant) > 2 * width(by_video), (width(by_participant), width(by_video))


def test_intervals_are_seeded_and_bracket_the_value():
    from heads.uncertainty import bootstrap_intervals

    y, p = _case(3, 80)
    groups = [str(i // 4) for i in range(80)]
    a = bootstrap_intervals(y, p, 0.5, groups, seed=7)
    assert a == bootstrap_intervals(y, p, 0.5, groups, seed=7)
    assert a != bootstrap_intervals(y, p, 0.5, groups, seed=8)
    for k in ("macro_f1", "f1_ah", "f1_noah", "ap"):
        assert a[k]["low"] <= a[k]["value"] <= a[k]["high"]
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_intervals(np.array([0.0, np.nan]), np.array([0.1, 0.2]), 0.5, ["a", "b"])


def test_paired_difference_self_is_zero_and_a_clear_gap_is_found():
    from heads.uncertainty import paired_difference

    y, p = _case(6, 200)
    groups = [str(i // 2) for i in range(200)]
    same = paired_difference(y, p, 0.5, p, 0.5, groups)
    assert same["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0} and not same["distinguishable"]
    noise = np.random.default_rng(9).random(200)
    gap = paired_difference(y, p, 0.5, noise, 0.5, groups)
    assert gap["distinguishable"] and gap["difference"]["low"] > 0 and gap["a"] > gap["b"]
