"""Bounded work per input: special files are never opened (a FIFO would block forever), YAML is parsed with
aliases refused and every parser failure as one line naming the file, spec values are validated."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from extract.media import MediaError, read_faces
from extract.spec import SpecError, load_spec
from extract.transcripts import BahError, parse_transcript


@contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of hanging the suite) when the body blocks."""
    def boom(signum, frame):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_in_place_of_a_face_frame_is_refused_without_blocking(tmp_path):
    good = tmp_path / "frame-0.jpg"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    fifo = tmp_path / "frame-1.jpg"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(MediaError, match="frame-1.jpg: the image is not a regular file"):
        read_faces([good, fifo], 8)


def test_a_spec_with_a_yaml_alias_bomb_is_refused(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text('a: &a ["x", "x"]\nb: &b [*a, *a]\nc: [*b, *b]\n')
    with pytest.raises(SpecError, match="aliases .* are refused"):
        load_spec(spec)


def test_a_fifo_spec_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "spec.yaml")
    with no_hang(), pytest.raises(SpecError, match="not a regular file"):
        load_spec(tmp_path / "spec.yaml")


@pytest.mark.parametrize("bad", ["segment_seconds: 0", "segment_seconds: -1", "sample_rate: 0",
                                 "segment_seconds: .nan"])
def test_audio_values_that_would_never_end_are_refused(tmp_path, bad):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"audio:\n  {bad}\n")
    with pytest.raises(SpecError, match="must be a positive number"):
        load_spec(spec)


def test_a_deeply_nested_transcript_is_one_problem_of_that_file(tmp_path):
    path = tmp_path / "t.yml"
    path.write_text("text: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(BahError, match="t.yml: YAML does not parse"):
        parse_transcript(path, 10.0)


def test_an_invalid_timestamp_tag_is_one_problem_of_that_file(tmp_path):
    path = tmp_path / "t.yml"
    path.write_text("text: hi\nchunks:\n- {text: hi, timestamp: !!timestamp 'not a date'}\n")
    with pytest.raises(BahError, match="t.yml: YAML does not parse"):
        parse_transcript(path, 10.0)


@pytest.mark.parametrize("stamp,problem", [("[-3.0, 2.0]", "negative or non-finite"),
                                           ("[.nan, 2.0]", "negative or non-finite"),
                                           ("[1.0, .inf]", "negative or non-finite"),
                                           ("[0.0, 1.0e9]", "the media lasts 10.0 s")])
def test_absurd_transcript_timestamps_are_a_problem_of_that_file(tmp_path, stamp, problem):
    path = tmp_path / "t.yml"
    path.write_text(f"text: hi\nchunks:\n- {{text: hi, timestamp: {stamp}}}\n")
    with pytest.raises(BahError, match=f"t.yml: .*{problem}"):
        parse_transcript(path, 10.0)


def test_a_timeline_that_overruns_the_media_a_little_is_read(tmp_path):
    path = tmp_path / "t.yml"
    path.write_text("text: hi there\nchunks:\n- {text: hi, timestamp: [0.0, 6.0]}\n"
                    "- {text: there, timestamp: [6.0, 12.5]}\n")
    assert parse_transcript(path, 10.0)[1][-1].end == 12.5


def test_tiny_encoders_never_overwrite_a_users_folder(tmp_path):
    from extract.errors import AHError
    from extract.tiny_encoders import write_tiny_encoders

    user = tmp_path / "mine"
    user.mkdir()
    (user / "cache_spec.yaml").write_text("my: spec\n")
    with pytest.raises(AHError, match="was not written by `ahcli encoders tiny`"):
        write_tiny_encoders(user)
    assert (user / "cache_spec.yaml").read_text() == "my: spec\n" and sorted(p.name for p in user.iterdir()) == [
        "cache_spec.yaml"]
    spec = write_tiny_encoders(tmp_path / "tiny")
    assert write_tiny_encoders(tmp_path / "tiny") == spec          # its own folder: rewritten


def test_a_fifo_face_frame_is_named_by_data_check_and_extract_goes_on(synth_tree, tiny_specs, ahcli_fork, tmp_path):
    import json
    import shutil

    from conftest import extract_args
    from extract.bah import read_bah
    from extract.store import CacheReader

    data = tmp_path / "data"
    shutil.copytree(synth_tree[0] / "data", data)
    videos = sorted(read_bah(data).videos, key=lambda v: v.video_id)
    victim = videos[0]
    frame = victim.face_frames[3]
    frame.unlink()
    os.mkfifo(frame)

    check = ahcli_fork.run("data", "check", data, "--json", timeout=120)
    assert check.rc == 1
    problems = json.loads(check.out)["problems"]
    assert any(p["video_id"] == victim.video_id and "frame-3.jpg" in p["problem"] and "not a regular file"
               in p["problem"] for p in problems)

    with no_hang(240):
        res = ahcli_fork.run(*extract_args(data, tmp_path / "cache", tiny_specs["zarr"]), timeout=230)
    assert res.rc == 1 and victim.video_id in res.out + res.err
    assert CacheReader(tmp_path / "cache").video_ids() == sorted(v.video_id for v in videos[1:])
