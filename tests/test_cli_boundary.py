"""One line, never a traceback: bad option values and file-system failures end a command with one `error:`
line naming what is wrong (the traceback only with AH_DEBUG=1)."""
from __future__ import annotations

import shutil

import pytest

from conftest import extract_args
from extract.store import CacheReader


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


@pytest.mark.parametrize("name,content,command,words", [
    ("manifest.json", '{"format": 2, "spec": [], "fingerprint": "a", "backend": "zarr"}', "info",
     "'spec' must be an object"),
    ("manifest.json", '{"format": "2", "spec": {}, "fingerprint": "a", "backend": "zarr"}', "train",
     "'format' must be an integer"),
    ("index.json", "[]", "train", "index.json: not an index"),
    ("index.json", '{"videos": [1, 2]}', "train", "entry 0 is not"),
    ("listed.json", '{"splits": {"train": 5}}', "train", "'splits' must map each split"),
])
def test_hand_edited_cache_json_is_one_line(report_run_case, ahcli_fork, tmp_path, name, content, command, words):
    cache = tmp_path / "cache"
    shutil.copytree(report_run_case.cache, cache)
    (cache / name).write_text(content)
    argv = {"info": ("cache", "info", cache), "train": ("train-heads", cache, tmp_path / "run", "--epochs", "1")}
    res = ahcli_fork.run(*argv[command])
    assert res.rc != 0 and "Traceback" not in res.err
    errors = [line for line in res.err_lines if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], res.err


@pytest.mark.parametrize("content", ["[]", '{"videos": 5}', '{"videos": [{"key": []}]}'])
def test_verify_reports_a_malformed_index_and_an_error_file_of_the_wrong_shape(report_run_case, tmp_path, content):
    cache = tmp_path / "cache"
    shutil.copytree(report_run_case.cache, cache)
    (cache / "index.json").write_text(content)
    (cache / "errors").mkdir(exist_ok=True)
    (cache / "errors" / "x.json").write_text("[5]")
    reader = CacheReader(cache)
    assert [p["video_id"] for p in reader.verify()] == ["index.json"]
    assert reader.errors() == [{"video_id": "x", "split": None, "message": f"unreadable error file {cache / 'errors' / 'x.json'}"}]
