"""`ahcli synth` and `ahcli data check`: the acceptance round trip, problems (exit 1), not a tree (exit 2)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ahcli.app import app
from helpers_bah import cached_synth, copy_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def tree60(tmp_path_factory):
    return cached_synth(tmp_path_factory, videos=60, seed=0)


def test_synth_then_check_counts_equal_what_was_written(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(app, ["synth", str(out), "--videos", "12", "--seed", "5", "--json"])
    assert res.exit_code == 0, res.output
    written = json.loads(res.stdout.strip().splitlines()[-1])
    res = runner.invoke(app, ["data", "check", str(out / "data"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report == {"splits": written, "problems": []}
    assert sum(s["videos"] for k, s in written.items() if k != "private") == 12
    assert report["splits"]["private"] == {"videos": 2, "positive": None}


def test_acceptance_60_videos_seed_0(tree60):
    out, result = tree60
    res = runner.invoke(app, ["data", "check", str(out / "data"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report) == {"splits", "problems"} and report["problems"] == []
    assert report["splits"] == result["splits"]
    labelled = [v for v in result["videos"] if v["split"] != "private"]
    assert len(labelled) == 60
    for split in ("train", "val", "test"):
        mine = [v for v in labelled if v["split"] == split]
        assert report["splits"][split] == {"videos": len(mine), "positive": sum(v["label"] for v in mine)}
        assert 0 < report["splits"][split]["positive"] < len(mine), "both classes in every split"


def test_problems_exit_1_and_each_is_listed(tree60, tmp_path):
    out, result = tree60
    data = copy_tree(out, tmp_path)
    train = [v for v in result["videos"] if v["split"] == "train"]
    shutil.rmtree(data / "cropped-aligned-faces" / train[0]["video_id"])
    (data / train[1]["video_id"]).write_bytes(b"")
    with open(data / "split" / "val.txt", "a", encoding="utf-8") as fh:
        fh.write("../../etc/passwd,1,hello\n")
    res = runner.invoke(app, ["data", "check", str(data), "--json"])
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert all(set(p) == {"video_id", "problem", "fatal"} for p in report["problems"])
    by_id = {p["video_id"]: p["problem"] for p in report["problems"]}
    assert "face folder not found" in by_id[train[0]["video_id"]]
    assert "empty file (0 bytes)" in by_id[train[1]["video_id"]]
    assert "refused" in by_id["../../etc/passwd"]
    assert report["splits"]["train"]["videos"] == len(train) - 2
    # the table names each problem too
    res = runner.invoke(app, ["data", "check", str(data)])
    assert res.exit_code == 1
    for vid in (train[0]["video_id"], train[1]["video_id"], "../../etc/passwd"):
        assert vid in res.stdout.replace("\n", "")
    assert "train" in res.stdout and "private" in res.stdout


def test_private_root_option(tree60, tmp_path):
    out, result = tree60
    data = copy_tree(out, tmp_path / "t")
    private = tmp_path / "private"
    shutil.move(str(data.parent / "test-set-30-participants-unlabeled" / "data"), private)
    res = runner.invoke(app, ["data", "check", str(data), "--json"])
    assert json.loads(res.stdout)["splits"]["private"] == {"videos": 0, "positive": None}
    res = runner.invoke(app, ["data", "check", str(data), "--json", "--private-root", str(private)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["splits"]["private"] == result["splits"]["private"]


def test_not_a_bah_tree_exits_2_with_one_line(tmp_path):
    (tmp_path / "data" / "split").mkdir(parents=True)
    (tmp_path / "data" / "split" / "train.txt").write_text("")
    proc = subprocess.run([sys.executable, "-m", "ahcli", "data", "check", str(tmp_path), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "not a BAH data tree" in lines[0] and "split/train.txt" in lines[0] and "did you mean" in lines[0]


def test_help_texts():
    res = runner.invoke(app, ["data", "check", "--help"])
    assert res.exit_code == 0 and "--private-root" in res.stdout and "--json" in res.stdout
    res = runner.invoke(app, ["synth", "--help"])
    assert res.exit_code == 0 and "--videos" in res.stdout and "--seed" in res.stdout


def test_notes_alone_exit_0_and_are_listed(tree60, tmp_path):
    """Fewer face crops than mp4 frames (the organisers crop with OpenCV, one crop per decoded frame) is a
    note: the video is read, and a tree whose only findings are notes is valid (exit 0)."""
    out, result = tree60
    data = copy_tree(out, tmp_path)
    vid = next(v["video_id"] for v in result["videos"] if v["split"] == "train")
    faces = sorted((data / "cropped-aligned-faces" / vid).glob("frame-*.jpg"), key=lambda p: int(p.stem[6:]))
    faces[-1].unlink()                                           # the last crop is missing: one frame fewer
    res = runner.invoke(app, ["data", "check", str(data), "--json"])
    assert res.exit_code == 0, res.output
    notes = [p for p in json.loads(res.stdout)["problems"] if p["video_id"] == vid]
    assert notes and all(not p["fatal"] for p in notes) and "face frames but the mp4 has" in notes[0]["problem"]
