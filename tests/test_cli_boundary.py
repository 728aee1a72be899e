"""One line, never a traceback: bad option values and file-system failures end a command with one `error:`
line naming what is wrong (the traceback only with AH_DEBUG=1)."""
from __future__ import annotations

import pytest

from conftest import extract_args


@pytest.mark.parametrize("argv,words", [
    (("train-heads", "{cache}", "{tmp}/r1", "--batch-size", "0"), "batch_size"),
    (("train-heads", "{cache}", "{tmp}/r2", "--weight-decay", "-5"), "weight_decay"),
    (("train-heads", "{cache}", "{tmp}/r3", "--device", "foo"), "not a device name"),
    (("evaluate", "{run}", "{cache}", "--split", "test", "--device", "meta"), "only cpu and cuda"),
    (("ensemble", "{run}", "--cache", "{cache}", "--out", "{file}/sub"), "Not a directory"),
])
def test_bad_values_and_os_failures_are_one_line(report_run_case, ahcli_fork, tmp_path, argv, words):
    (tmp_path / "afile").write_text("x")
    names = {"cache": report_run_case.cache, "run": report_run_case.run_b, "tmp": tmp_path,
             "file": tmp_path / "afile"}
    res = ahcli_fork.run(*[a.format(**names) for a in argv])
    assert res.rc != 0 and "Traceback" not in res.err
    errors = [line for line in res.err_lines if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], res.err


def test_extract_with_negative_workers_is_one_line(synth_tree, tiny_specs, ahcli_fork, tmp_path):
    argv = extract_args(synth_tree[0] / "data", tmp_path / "c", tiny_specs["zarr"])
    argv[argv.index("--workers") + 1] = "-1"
    res = ahcli_fork.run(*argv)
    assert res.rc != 0 and "Traceback" not in res.err and "--workers >= 0" in res.err
