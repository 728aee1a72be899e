"""Greedy forward ensemble selection with replacement on val (Caruana et al., 2004).

Start from the empty ensemble; at each step add the run (any run, again and again: a run added k times
weighs k) whose addition gives the best val Macro F1, the ensemble probability being the members' mean,
rounded to the challenge file's 4 decimals, at the threshold tuned on val as `ahcli ensemble` tunes it
(sweep [0.25, 0.75] step 0.01). Ties go to the run listed first. After `max_members` steps the ensemble
kept is the step with the best val Macro F1 (the earliest among equals). Step 1 is the best single run, so
the kept ensemble's val Macro F1 is never below the best single run's (scored the same way).
The curve (val and test Macro F1 after each step, test at the val threshold) shows how the numbers grow
with the number of members; test is never used to choose.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ahflows.submission import quantise
from heads.metrics import bah_metrics, sweep_threshold


@dataclass
class Step:
    members: int                 # members after this step (with repeats)
    added: int                   # index of the run added
    val_macro_f1: float
    threshold: float
    test_macro_f1: float | None


@dataclass
class Selection:
    members: list[int]           # run indices of the kept ensemble, repeats included, in the order added
    steps: list[Step] = field(default_factory=list)
    best_step: int = 1           # the step kept (1-based)
    single_val: list[float] = field(default_factory=list)    # each run alone, scored the same way

    def counts(self, n_runs: int) -> list[int]:
        return np.bincount(np.asarray(self.members, dtype=int), minlength=n_runs).tolist()


def _val_f1(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    t, f1 = sweep_threshold(quantise(probs), labels, 0.25, 0.75, 0.01)
    return f1, t


def greedy_select(val_probs: Sequence[np.ndarray], val_labels: np.ndarray, max_members: int = 10,
                  test_probs: Sequence[np.ndarray] | None = None, test_labels: np.ndarray | None = None) -> Selection:
    """Forward selection with replacement over the runs' val probabilities (labelled videos only; see the
    module doc). `test_probs`/`test_labels` only fill the curve."""
    if not val_probs:
        raise ValueError("ensemble selection needs at least one run")
    if max_members < 1:
        raise ValueError(f"max_members must be >= 1 (got {max_members})")
    val = np.stack([np.asarray(p, dtype=np.float64) for p in val_probs])
    y = np.asarray(val_labels, dtype=float)
    test = None if test_probs is None else np.stack([np.asarray(p, dtype=np.float64) for p in test_probs])
    members: list[int] = []
    sel = Selection(members, single_val=[_val_f1(p, y)[0] for p in val])
    for k in range(1, max_members + 1):
        # the mean exactly as ahflows.ensemble computes it (np.mean over the members in order)
        scores = [_val_f1(np.mean(val[members + [i]], axis=0), y) for i in range(len(val))]
        best = int(np.argmax([f for f, _ in scores]))        # first maximum: ties go to the run listed first
        f1, t = scores[best]
        members.append(best)
        test_f1 = None
        if test is not None and test_labels is not None:
            p = quantise(np.mean(test[members], axis=0))
            test_f1 = bah_metrics(test_labels, probs=p, threshold=t)["macro_f1"]
        sel.steps.append(Step(k, best, f1, t, test_f1))
    f1s = [s.val_macro_f1 for s in sel.steps]
    sel.best_step = int(np.argmax(f1s)) + 1
    sel.members = members[: sel.best_step]
    return sel


__all__ = ["greedy_select", "Selection", "Step"]
