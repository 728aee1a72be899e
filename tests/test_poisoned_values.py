"""Values that would be accepted and then poison results are refused in one line: a NaN or out-of-range
threshold or alpha (given or in a run's metrics.json), a config.json that does not fit its weights."""
from __future__ import annotations

import json
import shutil

import pytest

from heads.data import load_split
from heads.infer import evaluate_split
from heads.run_files import RunError
from heads.runs import load_run


@pytest.fixture()
def run_copy(report_run_case, tmp_path):
    shutil.copytree(report_run_case.run_b, tmp_path / "B")
    return tmp_path / "B"


def _edit(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (data[section] if section else data)[name] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("key,value", [("threshold", float("nan")), ("alpha", 7), ("threshold", "0.5")])
def test_a_bad_threshold_or_alpha_in_metrics_json_is_refused(run_copy, key, value):
    _edit(run_copy / "metrics.json", **{key: value})
    with pytest.raises(RunError, match=f"metrics.json: {key} must be a number in \\[0, 1\\]"):
        load_run(run_copy)


def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(run_copy):
    _edit(run_copy / "config.json", model__dim=3000)
    with pytest.raises(RunError, match="has shape .* but the config expects .*config.json edited"):
        load_run(run_copy)


@pytest.mark.parametrize("kw", [{"threshold": float("nan")}, {"alpha": 7.0}, {"threshold": -0.1}])
def test_evaluate_refuses_a_nan_or_out_of_range_value(report_run_case, kw):
    from extract.store import CacheReader

    run = load_run(report_run_case.run_b)
    data = load_split(CacheReader(report_run_case.cache), "val", device="cpu")
    with pytest.raises(RunError, match="must be a number in \\[0, 1\\]"):
        evaluate_split(run, data, **kw)
