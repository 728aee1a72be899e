"""Output folders belong to us or to nobody: a command writes only into a new or empty folder, or one that
already holds its own kind of output, never into one of its inputs; a refusal changes no file."""
from __future__ import annotations

import shutil
from pathlib import Path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ensemble_into_one_of_its_input_runs_is_refused(report_run_case, ahcli_fork, tmp_path):
    run = tmp_path / "B"
    shutil.copytree(report_run_case.run_b, run)
    before = _snapshot(run)
    res = ahcli_fork.run("ensemble", run, "--cache", report_run_case.cache, "--out", run)
    assert res.rc != 0 and "is one of the input runs" in res.err
    assert _snapshot(run) == before


def test_ensemble_into_a_foreign_folder_is_refused_and_into_its_own_allowed(report_run_case, ahcli_fork, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "metrics.json").write_text('{"mine": 1}')
    res = ahcli_fork.run("ensemble", report_run_case.run_b, "--cache", report_run_case.cache, "--out", foreign)
    assert res.rc != 0 and "is not an ensemble folder" in res.err
    assert _snapshot(foreign) == {"metrics.json": b'{"mine": 1}'}
    earlier = tmp_path / "ens"
    shutil.copytree(report_run_case.ensemble, earlier)
    res = ahcli_fork.run("ensemble", report_run_case.run_b, "--cache", report_run_case.cache, "--out", earlier)
    assert res.rc == 0, res.err                                      # an earlier ensemble's folder: rewritten


def test_train_heads_into_a_non_empty_folder_that_is_no_run_is_refused(report_run_case, ahcli_fork, tmp_path):
    encoders = tmp_path / "enc"
    shutil.copytree(Path(report_run_case.spec).parent / "text", encoders)
    before = _snapshot(encoders)
    res = ahcli_fork.run("train-heads", report_run_case.cache, encoders, "--epochs", "1", "--dim", "16")
    assert res.rc != 0 and "is not a run folder" in res.err and len(res.err_lines) == 1
    assert _snapshot(encoders) == before
