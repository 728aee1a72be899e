"""Operable where the real work runs (issue 15), on real `ahcli` processes: progress lines and log files
with the output redirected to files, a live history, SIGTERM/SIGINT mid-run then an exact resume, one
writer per folder, and no silent subsets. Processes come from tests/conftest.py: `ahcli_fork` (forked
children of a warm interpreter: real processes, real signals, stdout/stderr to files) and `run_module`
(`python -m ahcli`)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import extract_args, run_module
from extract.store import CacheReader

# Long enough (a hundred ~25 ms epochs) that a signal lands mid-run; checkpoints at the default interval
# (60 s): only the interrupted epoch's checkpoint is written, which is the point.
LONG_RUN = ["--epochs", "120", "--patience", "120", "--dim", "32", "--head-hidden", "32", "--batch-size", "2",
            "--accum", "1", "--lr", "1e-3", "--device", "cpu"]


def _wait_for(cond, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _rows(run: Path) -> int:
    """Epoch rows in history.csv (0 while it does not exist yet)."""
    try:
        return max(0, len((run / "history.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module")
def full_run(ref_caches, ahcli_fork, tmp_path_factory) -> Path:
    """The uninterrupted LONG_RUN: what every interrupted-and-resumed run must end with."""
    run = tmp_path_factory.mktemp("full") / "run"
    res = ahcli_fork.run("train-heads", ref_caches["zarr"], run, *LONG_RUN)
    assert res.rc == 0, res.err
    return run


# ------------------------------------------------------------------ 1. progress without a terminal

def test_extract_prints_progress_to_a_file_at_once_and_keeps_a_log(tmp_path, synth_tree, tiny_specs, ahcli_fork,
                                                                   ref_caches):
    cache = tmp_path / "cache"
    ahcli_fork.start(*extract_args(synth_tree[0] / "data", cache, tiny_specs["zarr"]), "--progress",
                     "--log-every", "600", "--json")
    err = ahcli_fork.workdir / f"{ahcli_fork._n}.err"
    _wait_for(lambda: "extract: 0/18 videos" in _read(err), what="the first progress line")
    assert not (cache / "index.json").exists(), "the line must come while the extraction runs, not at its end"
    res = ahcli_fork.wait()
    assert res.rc == 0, res.err
    summary = json.loads(res.out)                      # --json: stdout is the summary alone
    assert summary["extracted"] == 18 and summary["failed"] == {} and not summary["interrupted"]
    assert "extract: 18/18 videos (100%)" in res.err and "ETA" in res.err and "videos/s" in res.err
    logs = list((cache / "logs").glob("extract-*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert "$ ahcli extract" in log and "extract: 0/18 videos" in log and "extracted 18 videos" in log
    assert CacheReader(cache).digest() == CacheReader(ref_caches["zarr"]).digest()
    assert not (cache / ".lock").exists(), "the lock file goes with the writer"


def test_train_heads_prints_epochs_to_a_file_and_history_grows_while_it_runs(tmp_path, ref_caches, ahcli_fork,
                                                                            full_run):
    run = tmp_path / "run"
    ahcli_fork.start("train-heads", ref_caches["zarr"], run, *LONG_RUN, "--log-every", "600")
    err = ahcli_fork.workdir / f"{ahcli_fork._n}.err"
    _wait_for(lambda: _rows(run) >= 3, what="three epochs")
    printed = len(re.findall(r"^epoch +\d+", _read(err), re.M))
    assert printed >= 1 and not (run / "metrics.json").exists(), "epoch lines while the run goes on"
    assert abs(_rows(run) - printed) <= 1                # one row per finished epoch, flushed at once
    assert "$ ahcli train-heads" in _read(run / "train.log")
    res = ahcli_fork.wait()
    assert res.rc == 0, res.err
    assert (run / "history.csv").read_text() == (full_run / "history.csv").read_text()
    assert "run written to" in (run / "train.log").read_text()


# ------------------------------------------------------------------ 3. clean interruption

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_checkpoints_then_resume_gives_the_uninterrupted_run(sig, code, tmp_path, ref_caches,
                                                                           ahcli_fork, full_run):
    run = tmp_path / "run"
    pid = ahcli_fork.start("train-heads", ref_caches["zarr"], run, *LONG_RUN)
    _wait_for(lambda: _rows(run) >= 5, what="five epochs")
    os.kill(pid, sig)
    res = ahcli_fork.wait()
    assert res.rc == code, (res.rc, res.err[-2000:])
    assert "Traceback" not in res.err
    stopped = [line for line in res.err_lines if line.startswith(f"interrupted by {sig.name}")]
    assert len(stopped) == 1, res.err[-2000:]
    assert f"checkpointed in {run}" in stopped[0]
    resume = shlex.split(stopped[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["ahcli", "train-heads"] and resume[-1] == "--resume"
    assert not (run / "metrics.json").exists() and (run / "state.safetensors").exists()
    assert _rows(run) < 120
    assert stopped[0] in (run / "train.log").read_text()

    res = ahcli_fork.run(*resume[1:])                   # the printed command, as printed
    assert res.rc == 0, res.err
    want, got = json.loads((full_run / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    want.pop("seconds"), got.pop("seconds")
    assert got == want
    assert (run / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()
    assert (run / "history.csv").read_text() == (full_run / "history.csv").read_text()


def test_sigterm_mid_extraction_writes_what_it_has_then_the_rerun_completes(tmp_path, synth_tree, tiny_specs,
                                                                          ahcli_fork, ref_caches):
    cache = tmp_path / "cache"
    args = extract_args(synth_tree[0] / "data", cache, tiny_specs["zarr"])
    pid = ahcli_fork.start(*args)
    _wait_for(lambda: len(list((cache / "videos").glob("[!.]*"))) >= 2 if (cache / "videos").is_dir() else False,
              what="two videos")
    os.kill(pid, signal.SIGTERM)
    res = ahcli_fork.wait()
    assert res.rc == 143, (res.rc, res.err[-2000:])
    line = [x for x in res.err_lines if x.startswith("interrupted by SIGTERM")]
    assert len(line) == 1 and "left (cache unsealed)" in line[0] and "resume with: ahcli extract" in line[0], res.err
    reader = CacheReader(cache)
    assert not reader.sealed and reader.verify() == [] and 2 <= len(reader.video_ids()) < 18
    res = ahcli_fork.run(*shlex.split(line[0].split("resume with: ", 1)[1])[1:])
    assert res.rc == 0, res.err
    r = CacheReader(cache)
    assert r.sealed and r.digest() == CacheReader(ref_caches["zarr"]).digest()


# ------------------------------------------------------------------ 4. one writer per folder

def _one_line_refusal(res, folder: Path, pid: int) -> None:
    assert res.rc == 3, (res.rc, res.err[-2000:])
    assert "Traceback" not in res.err
    lines = [x for x in res.err_lines if x.startswith("error: ")]
    assert len(lines) == 1, res.err
    assert str(folder) in lines[0] and f"pid {pid}" in lines[0], lines[0]


def test_a_second_train_heads_resume_on_a_running_run_is_refused(tmp_path, ref_caches, ahcli_fork, full_run):
    run = tmp_path / "run"
    pid = ahcli_fork.start("train-heads", ref_caches["zarr"], run, *LONG_RUN)
    _wait_for(lambda: _rows(run) >= 2, what="two epochs")
    os.kill(pid, signal.SIGSTOP)                        # frozen mid-run, lock held: the second one meets it
    try:
        second = run_module("train-heads", ref_caches["zarr"], run, *LONG_RUN, "--resume")
    finally:
        os.kill(pid, signal.SIGCONT)
    _one_line_refusal(second, run, pid)
    res = ahcli_fork.wait()
    assert res.rc == 0, res.err
    assert (run / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()


def test_a_second_extract_on_a_cache_being_written_is_refused(tmp_path, synth_tree, tiny_specs, ahcli_fork,
                                                              ref_caches):
    cache = tmp_path / "cache"
    args = extract_args(synth_tree[0] / "data", cache, tiny_specs["zarr"])
    pid = ahcli_fork.start(*args)
    _wait_for(lambda: (cache / "videos").is_dir() and any(not p.name.startswith(".")
                                                          for p in (cache / "videos").iterdir()), what="a video")
    os.kill(pid, signal.SIGSTOP)
    try:
        second = run_module(*args)
    finally:
        os.kill(pid, signal.SIGCONT)
    _one_line_refusal(second, cache, pid)
    res = ahcli_fork.wait()
    assert res.rc == 0, res.err
    assert CacheReader(cache).digest() == CacheReader(ref_caches["zarr"]).digest()


# ------------------------------------------------------------------ 5. no silent subsets

@pytest.fixture(scope="module")
def partial_case(tmp_path_factory, ref_caches, ahcli_fork):
    """A copy of the reference cache whose first two test videos failed at extraction, and a run on it."""
    from extract.files import atomic_write_json
    from extract.record import video_key

    root = tmp_path_factory.mktemp("partial")
    cache = root / "cache"
    shutil.copytree(ref_caches["zarr"], cache)
    test = CacheReader(cache).video_ids("test")
    assert len(test) >= 3
    index = json.loads((cache / "index.json").read_text())
    for vid in test[:2]:            # what a failed extraction leaves: an error file, no unit, sealed without it
        shutil.rmtree(cache / "videos" / f"{video_key(vid)}.zarr")
        error = {"video_id": vid, "split": "test", "message": "no faces"}
        atomic_write_json(cache / "errors" / f"{video_key(vid)}.json", error)
        index["videos"] = [e for e in index["videos"] if e["video_id"] != vid]
        index["errors"] = [*index.get("errors", []), error]
    atomic_write_json(cache / "index.json", index, indent=1, sort_keys=True)
    run = root / "run"
    res = ahcli_fork.run("train-heads", cache, run, "--epochs", "2", "--dim", "16", "--head-hidden", "16",
                         "--device", "cpu")
    assert res.rc == 0, res.err
    return {"cache": cache, "run": run, "root": root, "missing": test[:2], "listed": len(test)}


def test_evaluate_refuses_a_partial_split_naming_the_count_unless_allowed(partial_case, ahcli_fork):
    cache, run, n = partial_case["cache"], partial_case["run"], partial_case["listed"]
    res = ahcli_fork.run("evaluate", run, cache, "--split", "test", "--json")
    assert res.rc == 2 and len(res.err_lines) == 1, res.err
    assert f"lacks 2 of its {n} listed videos" in res.err_lines[0] and partial_case["missing"][0] in res.err_lines[0]
    assert "--allow-partial" in res.err_lines[0] and res.out == ""
    res = ahcli_fork.run("evaluate", run, cache, "--split", "test", "--json", "--allow-partial")
    assert res.rc == 0, res.err
    got = json.loads(res.out)
    assert (got["videos"], got["listed"]) == (n - 2, n) and got["missing"] == partial_case["missing"]
    res = ahcli_fork.run("evaluate", run, cache, "--split", "test", "--allow-partial")
    assert f"{n - 2}/{n} listed videos (PARTIAL" in res.out.replace("\n", " ")


def test_ensemble_refuses_a_partial_split_and_states_the_count_when_allowed(partial_case, ahcli_fork):
    cache, run, n, out = partial_case["cache"], partial_case["run"], partial_case["listed"], partial_case["root"] / "e"
    res = ahcli_fork.run("ensemble", run, "--cache", cache, "--out", out)
    assert res.rc == 2 and "Traceback" not in res.err, res.err
    errors = [x for x in res.err_lines if x.startswith("error: ")]
    assert len(errors) == 1 and f"lacks 2 of its {n} listed videos" in errors[0], res.err
    assert not (out / "metrics.json").exists()
    res = ahcli_fork.run("ensemble", run, "--cache", cache, "--out", out, "--allow-partial")
    assert res.rc == 0, res.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["videos"]["test"]["scored"] == n - 2 and metrics["videos"]["test"]["listed"] == n
    assert metrics["test"]["videos"] == n - 2
    assert f"test {n - 2}/{n}" in (res.out + res.err).replace("\n", " ")
    assert "PARTIAL splits scored" in res.err
    assert (out / "ensemble.log").is_file()


def test_report_and_ablate_refuse_a_partial_split_too(partial_case, ahcli_fork):
    cache, run, n = partial_case["cache"], partial_case["run"], partial_case["listed"]
    res = ahcli_fork.run("report", run, "--cache", cache)
    assert res.rc == 2 and f"lacks 2 of its {n} listed videos" in res.err, res.err
    res = ahcli_fork.run("report", run, "--cache", cache, "--allow-partial", "--json")
    assert res.rc == 0, res.err
    assert f"{n - 2} / {n} (PARTIAL)" in (run / "report.md").read_text()
    out = partial_case["root"] / "ablation"
    res = ahcli_fork.run("ablate", cache, out, "--quick", "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert res.rc == 2 and f"lacks 2 of its {n} listed videos" in res.err and "Traceback" not in res.err, res.err
    assert not (out / "trainings.jsonl").exists()
