"""The BAH reader: every quirk of docs/BAH_LAYOUT.md, and every bad input as a Problem while the rest is read."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from extract.vocab import SPLITS
from extract.bah import NotBahTree, _timing, read_bah, read_split_file
from extract.transcripts import BahError, TranscriptChunk, load_yaml, monotonic_chunks, parse_transcript
from extract.media import MediaInfo
from helpers_bah import cached_synth, copy_tree, line_of, write_mp4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return cached_synth(tmp_path_factory, videos=8, seed=1, private=3)


@pytest.fixture()
def tree(base, tmp_path):
    out, result = base
    return copy_tree(out, tmp_path / "copy"), result


# ------------------------------------------------------------------------------------------ happy path
def test_reads_synthetic_tree_like_the_generator_wrote(base):
    out, result = base
    ds = read_bah(out / "data")
    assert ds.problems == []
    assert ds.private_root is not None and ds.private_root.name == "data"
    by_id = {v.video_id: v for v in ds.videos}
    assert set(by_id) == {v["video_id"] for v in result["videos"]}
    for want in result["videos"]:
        got = by_id[want["video_id"]]
        assert got.split == want["split"]
        assert got.label == want["label"]
        assert got.pid == want["pid"] and got.question == want["question"]
        assert got.fps == pytest.approx(want["fps"])
        assert got.frame_count == want["frames"] == len(got.face_frames)
        assert got.has_audio
    assert all(v.label is None for v in ds.split("private"))
    assert len(ds.split("private")) == 3


def test_frames_sorted_numerically_and_ids_with_quirks(base):
    out, _ = base
    ds = read_bah(out / "data")
    v = next(v for v in ds.videos if v.frame_count > 11)
    assert [p.name for p in v.face_frames[8:12]] == ["frame-8.jpg", "frame-9.jpg", "frame-10.jpg", "frame-11.jpg"]
    ids = [v.video_id for v in ds.videos]
    assert any(" " in i for i in ids), "an id with a space"
    assert any(i.endswith("_Video-DESKTOP-NQ55E0P.mp4") for i in ids)
    assert all(v.mp4.is_file() and v.face_dir.is_dir() and v.transcript_yaml.is_file() for v in ds.videos)


def test_transcript_with_commas_and_monotonic_chunks(base):
    out, _ = base
    ds = read_bah(out / "data")
    for v in ds.videos:
        assert "," in v.transcript
        assert v.transcript.split() == "".join(c.text for c in v.chunks).split()
        starts = [c.start for c in v.chunks]
        assert starts == sorted(starts)
        assert all(c.end is not None and c.end >= c.start for c in v.chunks)
    # null last end -> duration, for the videos the generator wrote with a null end
    nulls = [v for v in ds.videos if "null]" in v.transcript_yaml.read_text()]
    assert nulls and all(v.chunks[-1].end == pytest.approx(v.duration) for v in nulls)


def test_split_parsing_maxsplit_bom_crlf_and_private_styles(tmp_path):
    p = tmp_path / "split" / "train.txt"
    p.parent.mkdir()
    p.write_bytes(b"\xef\xbb\xbfVideos/1/Visite_1/a b.mp4,1, well, I think, so\r\nVideos/1/Visite_1/c.mp4,0,\r\n\r\n")
    lines, problems = read_split_file(p, private=False, split="train")
    assert [(x.video_id, x.problem, x.fatal) for x in problems] == [
        ("split/train.txt", "starts with a UTF-8 byte-order mark (ids read without it)", False),
        ("split/train.txt", "CRLF line endings (read as LF)", False)]
    assert [(l.video_id, l.label, l.transcript) for l in lines] == [
        ("Videos/1/Visite_1/a b.mp4", 1, "well, I think, so"), ("Videos/1/Visite_1/c.mp4", 0, "")]
    # private styles (decided once per file): tests/test_split_files.py


def test_split_lines_with_bad_label_and_non_utf8(tmp_path):
    p = tmp_path / "split" / "val.txt"
    p.parent.mkdir()
    p.write_bytes(b"Videos/1/Visite_1/a.mp4,2,text\nVideos/1/Visite_1/b.mp4,1,caf\xe9 ok\n"
                  b"Videos/1/Visite_1/\xff.mp4,1,t\nVideos/1/Visite_1/c.mp4\n")
    lines, problems = read_split_file(p, private=False, split="val")
    assert [l.video_id for l in lines] == ["Videos/1/Visite_1/b.mp4"]
    text = "\n".join(f"{x.video_id} {x.problem} fatal={x.fatal}" for x in problems)
    assert "split/val.txt line 1: label '2' is not 0 or 1" in text
    assert "line 2: transcript holds bytes that are not UTF-8" in text and "fatal=False" in text
    assert "line 3: video_id is not valid UTF-8" in text
    assert "line 4: expected 'video_id,label,transcript'" in text


def test_monotonic_timeline_restarts_and_null_ends():
    raw = [("a", 0.0, 10.0), ("b", 10.0, 29.5), ("c", 0.0, 12.0), ("d", 12.0, None), ("e", 0.0, None)]
    got = monotonic_chunks(raw, duration=80.0)
    assert got == [TranscriptChunk("a", 0.0, 10.0), TranscriptChunk("b", 10.0, 29.5),
                   TranscriptChunk("c", 29.5, 41.5), TranscriptChunk("d", 41.5, 41.5),
                   TranscriptChunk("e", 41.5, 80.0)]


def test_tuple_tag_yaml(tmp_path):
    y = tmp_path / "t.yml"
    y.write_text("text: ' hi, there'\nchunks:\n- language: english\n  text: ' hi,'\n"
                 "  timestamp: !!python/tuple [0.0, 1.5]\n- text: ' there'\n  timestamp: !!python/tuple\n"
                 "  - 1.5\n  - null\n")
    text, chunks = parse_transcript(y, duration=3.0)
    assert text == "hi, there"
    assert chunks == [TranscriptChunk(" hi,", 0.0, 1.5), TranscriptChunk(" there", 1.5, 3.0)]


def test_yaml_bomb_is_refused_not_expanded(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    y = tmp_path / "bomb.yml"
    y.write_text("\n".join(lines) + "\n")
    with pytest.raises(BahError, match=r"bomb\.yml.*aliases .* refused"):
        load_yaml(y)


def test_oversized_yaml_is_refused(tmp_path):
    y = tmp_path / "big.yml"
    y.write_text("text: '" + "x" * 2000 + "'\n")
    with pytest.raises(BahError, match=r"big\.yml: .* over the 1000-byte limit"):
        load_yaml(y, max_bytes=1000)


def test_fps_fallbacks():
    info = MediaInfo(fps=None, frames=None, duration=2.0, has_video=False, has_audio=True, sample_rate=16000,
                     channels=1)
    assert _timing(info, 50, Path("x.mp4")) == (25.0, 2.0)
    info = MediaInfo(fps=30.0, frames=60, duration=None, has_video=True, has_audio=False, sample_rate=None,
                     channels=None)
    assert _timing(info, 60, Path("x.mp4")) == (30.0, 2.0)


def test_not_a_bah_tree(tmp_path):
    with pytest.raises(NotBahTree, match="not a BAH data tree.*split/train.txt"):
        read_bah(tmp_path)
    (tmp_path / "data" / "split").mkdir(parents=True)
    (tmp_path / "data" / "split" / "train.txt").write_text("")
    with pytest.raises(NotBahTree, match="did you mean"):
        read_bah(tmp_path)
    with pytest.raises(NotBahTree, match="private"):
        read_bah(tmp_path / "data", private_root=tmp_path / "nowhere")


def test_metadata_and_annotations_are_lazy(tree):
    data, result = tree
    (data / "video_annotation_transcript.yaml").write_text("{ broken: [")
    ds = read_bah(data)  # never touches the annotation file
    assert ds.problems == []
    assert set(ds.metadata()) == {v["pid"] for v in result["videos"] if v["split"] != "private"}
    with pytest.raises(BahError, match="video_annotation_transcript.yaml: YAML does not parse"):
        ds.annotations()


def test_explicit_private_root_and_split_selection(tree, tmp_path):
    data, result = tree
    moved = tmp_path / "elsewhere"
    shutil.move(str(data.parent / "test-set-30-participants-unlabeled" / "data"), moved)
    assert read_bah(data).split("private") == []
    ds = read_bah(data, private_root=moved, splits=("val", "private"))
    assert {v.split for v in ds.videos} == {"val", "private"}
    assert len(ds.split("private")) == sum(v["split"] == "private" for v in result["videos"])


# ------------------------------------------------------------------------------------------ bad input
def _target(data: Path, result: dict) -> dict:
    return next(v for v in result["videos"] if v["split"] == "train")


def _paths(data: Path, vid: str) -> tuple[Path, Path, Path]:
    name = vid.rsplit("/", 1)[1]
    return data / vid, data / "cropped-aligned-faces" / vid, data / "transcription" / vid / f"{name[:-4]}.yml"


def _replace_line(data: Path, split: str, old: str, new: str) -> None:
    p = data / "split" / f"{split}.txt"
    p.write_text(p.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")


def _append_line(data: Path, split: str, line: str) -> None:
    with open(data / "split" / f"{split}.txt", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def case_missing_faces(data, t):
    shutil.rmtree(_paths(data, t["video_id"])[1])
    return "face folder not found", True


def case_empty_faces(data, t):
    for f in _paths(data, t["video_id"])[1].iterdir():
        f.unlink()
    return "holds no frame-<N>.jpg", True


def case_frame_gap(data, t):
    (_paths(data, t["video_id"])[1] / "frame-3.jpg").unlink()
    return "gap in frame numbering (missing frame-3.jpg", False


def case_truncated_mp4(data, t):
    mp4 = _paths(data, t["video_id"])[0]
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 3])
    return "unreadable media", True


def case_zero_byte_mp4(data, t):
    _paths(data, t["video_id"])[0].write_bytes(b"")
    return "empty file (0 bytes)", True


def case_mp4_without_audio(data, t):
    write_mp4(_paths(data, t["video_id"])[0], seconds=t["frames"] / t["fps"], fps=t["fps"], audio_rate=None)
    return "no audio track", False


def case_mp4_without_video(data, t):
    write_mp4(_paths(data, t["video_id"])[0], seconds=t["frames"] / t["fps"], video=False)
    return "no video stream", False


def case_missing_transcript(data, t):
    _paths(data, t["video_id"])[2].unlink()
    return "transcript YAML not found", True


def case_yaml_not_parsing(data, t):
    _paths(data, t["video_id"])[2].write_text("text: 'open\nchunks: [\n")
    return "YAML does not parse", True


def case_yaml_bomb(data, t):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    _paths(data, t["video_id"])[2].write_text("\n".join(lines) + "\n")
    return "aliases", True


def case_empty_transcript(data, t):
    _paths(data, t["video_id"])[2].write_text("text: ''\nchunks: []\n")
    line = line_of(data, "train", t["video_id"])
    _replace_line(data, "train", line, line.split(",", 2)[0] + f",{t['label']},")
    return "empty transcript", False


def case_bad_label(data, t):
    line = line_of(data, "train", t["video_id"])
    _replace_line(data, "train", line, line.replace(f",{t['label']},", ",2,", 1))
    return "label '2' is not 0 or 1", True


def case_duplicate(data, t):
    _append_line(data, "test", line_of(data, "train", t["video_id"]))
    return "listed again (first at train split/train.txt", True     # which label is right? neither is read


def case_missing_folder(data, t):
    line = line_of(data, "train", t["video_id"])
    pid = t["pid"]
    _replace_line(data, "train", line, line.replace(f"Videos/{pid}/", "Videos/99999/", 1))
    t["video_id"] = t["video_id"].replace(f"Videos/{pid}/", "Videos/99999/", 1)
    return "folder of the video does not exist", True


def case_path_traversal(data, t):
    line = line_of(data, "train", t["video_id"])
    _replace_line(data, "train", line, "../../etc/passwd" + line[len(t["video_id"]):])
    t["video_id"] = "../../etc/passwd"
    return "refused", True


def case_symlink_out_of_root(data, t):
    faces = _paths(data, t["video_id"])[1]
    outside = data.parent / "outside_faces"
    shutil.move(str(faces), outside)
    os.symlink(outside, faces)
    return "symlink leaving the dataset root", True


def case_long_transcript(data, t):
    words = " ".join(["word,"] * 5000)
    y = _paths(data, t["video_id"])[2]
    y.write_text(f"text: '{words}'\nchunks:\n- text: '{words}'\n  timestamp: !!python/tuple [0.0, null]\n")
    line = line_of(data, "train", t["video_id"])
    _replace_line(data, "train", line, line.split(",", 2)[0] + f",{t['label']},{words}")
    return None, None


def case_non_utf8_transcript(data, t):
    p = data / "split" / "train.txt"
    raw = p.read_bytes()
    start = raw.index(t["video_id"].encode())
    comma = raw.index(b",", raw.index(b",", start) + 1)  # after 'id,label,'
    p.write_bytes(raw[: comma + 1] + b"caf\xe9 " + raw[comma + 1:])
    return "transcript holds bytes that are not UTF-8", False


def case_very_short_video(data, t):
    mp4, faces, _ = _paths(data, t["video_id"])
    write_mp4(mp4, seconds=0.2, fps=25)
    for f in faces.iterdir():
        if int(f.stem[6:]) >= 5:
            f.unlink()
    return None, None


CASES = [case_missing_faces, case_empty_faces, case_frame_gap, case_truncated_mp4, case_zero_byte_mp4,
         case_mp4_without_audio, case_mp4_without_video, case_missing_transcript, case_yaml_not_parsing,
         case_yaml_bomb, case_empty_transcript, case_bad_label, case_duplicate, case_missing_folder,
         case_path_traversal, case_symlink_out_of_root, case_long_transcript, case_non_utf8_transcript,
         case_very_short_video]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_problem_and_the_rest_is_read(tree, case):
    data, result = tree
    target = dict(_target(data, result))
    original_id = target["video_id"]
    expected, fatal = case(data, target)
    ds = read_bah(data)
    ids = [v.video_id for v in ds.videos]
    others = {v["video_id"] for v in result["videos"]} - {original_id}
    assert others <= set(ids), "every other video is still read"
    mine = [p for p in ds.problems if p.video_id == target["video_id"]]
    if expected is None:  # an odd but valid input: read whole, no problem
        assert mine == [] and ds.problems == []
        video = next(v for v in ds.videos if v.video_id == original_id)
        if case is case_long_transcript:
            assert len(video.transcript.split()) == 5000 and len(video.chunks[0].text.split()) == 5000
        else:
            assert (video.frame_count, video.fps, video.duration) == (5, 25.0, pytest.approx(0.2))
        return
    assert any(expected in p.problem for p in mine), [p.problem for p in ds.problems]
    assert all("\n" not in p.problem for p in ds.problems)
    if fatal is not None:
        assert (target["video_id"] in ids) is (not fatal)
        assert all(p.fatal is fatal for p in mine if expected in p.problem)
    else:  # duplicate: kept once
        assert ids.count(target["video_id"]) == 1
    if target["video_id"] == original_id and fatal:
        # the message names the file: the video's own file, or the split file and line
        name = original_id.rsplit("/", 1)[1]
        assert any(name in p.problem or name[:-4] in p.problem or "split/train.txt line" in p.problem for p in mine)


def test_mp4_without_video_keeps_fps_from_faces_and_audio(tree):
    data, result = tree
    t = _target(data, result)
    write_mp4(_paths(data, t["video_id"])[0], seconds=t["frames"] / t["fps"], video=False)
    v = next(v for v in read_bah(data).videos if v.video_id == t["video_id"])
    assert v.fps == pytest.approx(t["fps"], rel=0.1)  # face frames / audio duration (AAC pads a little)


def test_symlink_allowed_when_asked(tree):
    data, result = tree
    t = _target(data, result)
    case_symlink_out_of_root(data, dict(t))
    ds = read_bah(data, allow_symlinks=True)
    assert t["video_id"] in [v.video_id for v in ds.videos] and ds.problems == []


def test_bom_and_crlf_split_file_reads_exact_ids(tree):
    data, result = tree
    p = data / "split" / "train.txt"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes().replace(b"\n", b"\r\n"))
    ds = read_bah(data)
    assert [(p.video_id, p.fatal) for p in ds.problems] == [("split/train.txt", False)] * 2   # BOM, CRLF
    assert {v.video_id for v in ds.split("train")} == {v["video_id"] for v in result["videos"] if v["split"] == "train"}
    assert all(not v.transcript.endswith("\r") for v in ds.videos)


def test_unknown_split_name_refused(base):
    out, _ = base
    from extract.vocab import VocabError

    with pytest.raises(VocabError, match="unknown split 'training'"):    # one line, not a traceback
        read_bah(out / "data", splits=("training",))
    assert SPLITS == ("train", "val", "test", "private")
