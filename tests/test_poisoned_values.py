"""Values that would be accepted and then poison results are refused in one line: a NaN or out-of-range
threshold or alpha (given or in a run's metrics.json), a config.json that does not fit its weights."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

import ahcli.app as cli
from extract.files import json_text
from heads.data import load_split
from heads.infer import evaluate_split
from heads.metrics import OneClassWarning, sweep_threshold
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


def test_json_on_stdout_is_valid_json_even_with_undefined_numbers():
    text = json_text({"ap": float("nan"), "rows": [np.float32("inf"), np.float64(0.25), 3], "path": PurePosixPath("a/b")})
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON output"))
    assert parsed == {"ap": None, "rows": [None, 0.25, 3], "path": "a/b"}


def test_every_json_line_of_the_cli_goes_through_json_text():
    """A bare json.dumps on stdout would print NaN for an undefined metric (not JSON)."""
    offenders = [f"{p}:{i}" for p in sorted((Path(__file__).parents[1] / "ahcli").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "json.dumps(" in line and ("echo(" in line or "print(" in line)]
    assert not offenders, offenders


def test_a_threshold_tuned_on_one_class_warns():
    with pytest.warns(OneClassWarning, match="tuned on 3 labelled video\\(s\\) of class 0 only"):
        sweep_threshold(np.array([0.1, 0.6, 0.9]), np.array([0, 0, 0]))


def test_the_cli_prints_a_warning_as_one_line_on_stderr(monkeypatch, capsys):
    def command() -> None:
        warnings.warn("the decision threshold is tuned on one class", OneClassWarning)

    monkeypatch.setattr(cli, "app", command)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # restored after the test
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cli.main()
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "warning: the decision threshold is tuned on one class"
