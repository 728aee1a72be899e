"""Issue 15's pieces in-process (fast): the folder lock, stop signals, the live history, reports of unfinished
runs, TensorBoard as an optional extra, split listings and coverage, the ablation's seed-per-job merge and
clean stop, and the scriptable CLI (--version, --json, every problem, unknown splits)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from heads_fixtures import splits, tiny_model, tiny_train, write_cache
from helpers_bah import cached_synth, copy_tree

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the folder lock -------------------------------------------------------------------------------


def _try_lock(folder: str, q) -> None:
    from extract.locks import FolderBusy, acquire

    try:
        acquire(folder, "cache")
        q.put("acquired")
    except FolderBusy as exc:
        q.put(f"busy: {exc}")


def _in_child(folder: Path) -> str:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_try_lock, args=(str(folder), q))
    p.start()
    p.join(30)
    return q.get(timeout=5)


def test_folder_lock_refuses_another_process_naming_the_holder_and_is_reentrant(tmp_path):
    from extract.locks import LOCK_FILE, acquire, folder_lock, holds, release

    folder = tmp_path / "cache"
    with folder_lock(folder, "cache"):
        assert holds(folder) and (folder / LOCK_FILE).is_file()
        got = _in_child(folder)
        assert got.startswith(f"busy: {folder}: this cache is being written by pid {os.getpid()}"), got
        acquire(folder)                                  # nested in this process: counted
        release(folder)
        assert holds(folder)
    assert not holds(folder) and not (folder / LOCK_FILE).exists(), "released and removed with the last holder"
    assert _in_child(folder) == "acquired"


def test_a_lock_file_left_by_a_killed_writer_does_not_block(tmp_path):
    from extract.locks import LOCK_FILE, folder_lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "h"}))   # no process holds its flock
    with folder_lock(folder, "run folder"):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


# ---- stop signals ----------------------------------------------------------------------------------


def test_a_signal_inside_a_unit_only_asks_to_stop_outside_it_stops_at_once():
    from extract.stopping import Interrupted, StopSignals

    told = []
    with StopSignals(on_request=told.append) as stop:
        with stop.finishing():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.exit_code == 143 and told == [signal.SIGTERM]
            with pytest.raises(Interrupted):             # a second signal: at once
                os.kill(os.getpid(), signal.SIGINT)
    with StopSignals() as stop, pytest.raises(Interrupted) as exc:
        os.kill(os.getpid(), signal.SIGINT)               # loading, say: nothing to finish
    assert exc.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- live history, unfinished runs, TensorBoard -------------------------------------------------------


def test_history_has_a_row_per_finished_epoch_while_training_and_resume_rewrites_it(tmp_path):
    from heads.train import train_heads

    train, val = splits(32, 16)
    out = tmp_path / "run"
    seen = []

    def on_epoch(rec, prog):
        lines = (out / "history.csv").read_text().splitlines()
        seen.append((rec.epoch, len(lines) - 1))

    train_heads(train, val, tiny_model(train), tiny_train(epochs=4), out, stop_after=2, on_epoch=on_epoch)
    assert seen == [(1, 1), (2, 2)]
    with open(out / "history.csv", "a") as fh:           # an epoch run after the checkpoint, then a kill
        fh.write("3,0.1,0.1,0.5,0.5,0.5,0.5,0.001\n")
    seen.clear()
    train_heads(train, val, tiny_model(train), tiny_train(epochs=4), out, resume=True, on_epoch=on_epoch)
    assert seen == [(3, 3), (4, 4)], "rewritten from the checkpoint, then one row per epoch"
    full = tmp_path / "full"
    train_heads(train, val, tiny_model(train), tiny_train(epochs=4), full)
    assert (out / "history.csv").read_text() == (full / "history.csv").read_text()


def test_report_of_a_run_still_training_or_interrupted(tmp_path):
    from ahcli.app import app
    from heads.train import train_heads

    train, val = splits(32, 16)
    out = tmp_path / "run"
    train_heads(train, val, tiny_model(train), tiny_train(epochs=5), out, stop_after=3)
    res = runner.invoke(app, ["report", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["kind"] == "run" and any("not finished: 3 epoch(s)" in n for n in got["notes"])
    text = (out / "report.md").read_text()
    assert "not finished" in text and "Best epoch so far" in text and (out / "curves.png").is_file()


def test_tensorboard_is_optional_refused_in_one_line_and_logs_each_epoch(tmp_path, monkeypatch):
    from ahflows.epoch_scalars import EpochScalars, TensorboardMissing
    from heads.train_state import EpochRecord

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if not installed
    with pytest.raises(TensorboardMissing, match="--tensorboard: the tensorboard package is not installed"):
        EpochScalars(tmp_path)
    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            written.append("flush")

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    sc = EpochScalars(tmp_path)
    sc.epoch(EpochRecord(3, 0.5, 0.6, 0.7, 0.8, 0.6, 0.45, 1e-3))
    assert written[0] == ("dir", str(tmp_path / "tensorboard"))
    assert ("val/macro_f1", 0.7, 3) in written and ("loss/train", 0.5, 3) in written and written[-1] == "flush"


# ---- listings and coverage -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("units") / "cache", {"train": 24, "val": 12, "test": 12, "private": 3},
                       windows=(2, 3))


def test_coverage_from_the_listing_or_from_the_error_files(cache, tmp_path):
    from extract.listing import PartialSplit, read_listed, require_complete, split_coverage, write_listed
    from extract.store import CacheReader

    c = tmp_path / "cache"
    shutil.copytree(cache, c)
    reader = CacheReader(c)
    test = reader.video_ids("test")
    cov = split_coverage(reader, "test")
    assert not cov.recorded and cov.listed == test and not cov.partial      # no listed.json: what it knows
    write_listed(c, {"test": ["Videos/9/x.mp4", *reversed(test)]}, {"test": "split/test.txt"})
    write_listed(c, {"val": reader.video_ids("val")}, {"val": "split/val.txt"})   # merged, test kept
    assert set(read_listed(c)) == {"test", "val"}
    cov = split_coverage(reader, "test")
    assert cov.listed[0] == "Videos/9/x.mp4" and cov.missing == ["Videos/9/x.mp4"]
    assert cov.counts() == {"scored": 12, "listed": 13, "missing": ["Videos/9/x.mp4"]}
    with pytest.raises(PartialSplit, match=r"the test split lacks 1 of its 13 listed videos \(Videos/9/x.mp4\)"):
        require_complete(cov, str(c), allow_partial=False)
    require_complete(cov, str(c), allow_partial=True)


def test_submission_follows_the_private_order_recorded_at_extraction(cache, tmp_path):
    from ahflows.submission import private_order
    from extract.listing import write_listed
    from extract.store import CacheReader

    c = tmp_path / "cache"
    shutil.copytree(cache, c)
    reader = CacheReader(c)
    order = list(reversed(reader.video_ids("private"))) + ["Videos/7/gone.mp4"]
    write_listed(c, {"private": order}, {"private": "test.txt"})
    got = private_order(reader, None)
    assert got.video_ids == order and got.missing == ["Videos/7/gone.mp4"] and got.source.startswith("listed.json")


def test_bah_listing_keeps_split_file_order_and_refused_lines(tmp_path_factory, tmp_path):
    from extract.bah import read_bah

    out, _ = cached_synth(tmp_path_factory, videos=12, seed=5)
    data = copy_tree(out, tmp_path)
    lines = (data / "split" / "val.txt").read_text().splitlines()
    (data / "split" / "val.txt").write_text("\n".join([lines[-1], "Videos/1/x.mp4,2,bad label", *lines[:-1]]) + "\n")
    ds = read_bah(data)
    val = ds.listed["val"]
    assert val[0] == lines[-1].split(",")[0] and val[1] == "Videos/1/x.mp4" and len(val) == len(lines) + 1
    assert ds.sources["val"].endswith("val.txt")


def test_data_check_lists_every_problem_of_a_video(tmp_path_factory, tmp_path):
    from ahcli.app import app

    out, result = cached_synth(tmp_path_factory, videos=12, seed=5)
    data = copy_tree(out, tmp_path)
    vid = next(v["video_id"] for v in result["videos"] if v["split"] == "train")
    shutil.rmtree(data / "cropped-aligned-faces" / vid)
    shutil.rmtree(data / "transcription" / vid)
    res = runner.invoke(app, ["data", "check", str(data), "--json"])
    assert res.exit_code == 1, res.output
    mine = [p["problem"] for p in json.loads(res.stdout)["problems"] if p["video_id"] == vid]
    assert len(mine) == 2 and any("face folder not found" in p for p in mine)
    assert any("transcript YAML not found" in p for p in mine)


# ---- scriptable ------------------------------------------------------------------------------------


def test_version_unknown_split_and_json_outputs(cache, tmp_path):
    from ahcli.app import app, version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ahcli {version()}"
    res = runner.invoke(app, ["evaluate", str(tmp_path), str(cache), "--split", "tset"])
    assert res.exit_code != 0 and "unknown split 'tset'" in str(res.exception)
    res = runner.invoke(app, ["extract", str(tmp_path), str(tmp_path / "c"), "--splits", "train,tset"])
    assert res.exit_code != 0 and "unknown split 'tset'" in str(res.exception)
    res = runner.invoke(app, ["cache", "verify", str(cache), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {"cache": str(cache), "ok": True, "problems": []}


BASE = ["--epochs", "1", "--patience", "1", "--dim", "8", "--head-hidden", "8", "--lr", "1e-3", "--device", "cpu"]


def test_ablation_seeds_as_separate_jobs_merge_to_the_one_job_tables(cache, tmp_path):
    from ahcli.app import app

    one = runner.invoke(app, ["ablate", str(cache), str(tmp_path / "one"), "--seeds", "2", "--quick", "--json", *BASE])
    assert one.exit_code == 0, one.output
    for seed in (0, 1):
        res = runner.invoke(app, ["ablate", str(cache), str(tmp_path / f"s{seed}"), "--seeds", "2", "--quick",
                                  "--only-seed", str(seed), *BASE])
        assert res.exit_code == 0, res.output
    import ahflows.checkpoint_a

    trained = []
    real = ahflows.checkpoint_a.train_heads
    ahflows.checkpoint_a.train_heads = lambda *a, **k: trained.append(1) or real(*a, **k)
    try:
        merged = runner.invoke(app, ["ablate", str(cache), str(tmp_path / "merged"), "--seeds", "2", "--quick",
                                     "--json", "--merge", str(tmp_path / "s0"), "--merge", str(tmp_path / "s1"), *BASE])
    finally:
        ahflows.checkpoint_a.train_heads = real
    assert merged.exit_code == 0, merged.output
    assert trained == [], "a merge trains nothing"

    def rows(res):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(res.stdout)["rows"]]

    assert rows(merged) == rows(one)
    assert all(r["videos"] == r["listed"] == 12 for r in rows(one) if r["split"] == "test")
    assert "Videos used or scored / listed" in (tmp_path / "merged" / "ablation.md").read_text()
    res = runner.invoke(app, ["ablate", str(cache), str(tmp_path / "x"), "--seeds", "2", "--only-seed", "2", *BASE])
    assert res.exit_code != 0 and "--only-seed 2" in str(res.exception)


def test_a_stopped_ablation_keeps_finished_trainings_and_resumes_to_the_same_tables(cache, tmp_path):
    from ahflows.ablate import run_ablation
    from heads.train_state import TrainingStopped

    base = {"epochs": 2, "patience": 2, "dim": 8, "head_hidden": 8, "lr": 1e-3, "device": "cpu"}
    want = run_ablation(cache, tmp_path / "full", 1, base, quick=True)
    calls = []

    def on_epoch(rec, prog):                              # a signal during the third training
        calls.append(rec.epoch)
        if len(calls) == 5:
            raise TrainingStopped

    got = run_ablation(cache, tmp_path / "run", 1, base, quick=True, on_epoch=on_epoch)
    assert got.stopped and got.trainings == (2, 4)
    assert len((tmp_path / "run" / "trainings.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "run" / "ablation.csv").exists()
    done = run_ablation(cache, tmp_path / "run", 1, base, quick=True, resume=True)
    strip = lambda rows: [{**r.__dict__, "seconds": None} for r in rows]  # noqa: E731
    assert strip(done.rows) == strip(want.rows)
    stopped = run_ablation(cache, tmp_path / "never", 1, base, quick=True, should_stop=lambda: True)
    assert stopped.stopped and stopped.trainings == (0, 4)


def test_ensemble_stopped_between_splits_writes_nothing(cache, tmp_path):
    from ahflows.ensemble import run_ensemble
    from extract.store import CacheReader
    from heads.data import load_split
    from heads.run_files import cache_record
    from heads.train import train_heads

    reader = CacheReader(cache)
    train, val = load_split(reader, "train", device="cpu"), load_split(reader, "val", device="cpu")
    train_heads(train, val, tiny_model(train), tiny_train(epochs=1), tmp_path / "A", cache=cache_record(reader))
    asked = []
    rec = run_ensemble([tmp_path / "A"], cache, tmp_path / "ens", should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert rec is None and not (tmp_path / "ens" / "metrics.json").exists() and not (tmp_path / "ens" / ".lock").exists()
