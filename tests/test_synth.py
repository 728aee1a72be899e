"""The synthetic BAH generator: the real layout with its quirks, determinism, and the planted signal
measured from the raw files (not from the generator's own bookkeeping)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from extract.bah import read_bah
from extract.media import read_audio, read_faces
from extract.synth import HEDGES, NEGATIVE, POSITIVE, SynthError, write_synthetic_bah
from helpers_bah import cached_synth

ID_RE = re.compile(r"^Videos/(\d{5})/Visite_1/\1_Question_([1-7])_\d{4}-\d{2}-\d{2}[_ ]\d{2}-\d{2}-\d{2}"
                   r"_Video(-DESKTOP-NQ55E0P)?\.mp4$")


@pytest.fixture(scope="module")
def tree60(tmp_path_factory):
    return cached_synth(tmp_path_factory, videos=60, seed=0)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_given_the_seed(tmp_path):
    a = write_synthetic_bah(tmp_path / "a", 5, seed=3, private=2)
    b = write_synthetic_bah(tmp_path / "b", 5, seed=3, private=2)
    c = write_synthetic_bah(tmp_path / "c", 5, seed=4, private=2)
    assert a["videos"] == b["videos"] and a["videos"] != c["videos"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_refuses_a_non_empty_target_and_too_few_videos(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").write_text("keep me")
    with pytest.raises(SynthError, match="not empty"):
        write_synthetic_bah(tmp_path, 5, seed=0)
    with pytest.raises(SynthError, match="at least 3"):
        write_synthetic_bah(tmp_path / "new", 2, seed=0)


def test_layout_and_quirks(tree60):
    out, result = tree60
    data = out / "data"
    for rel in ("split/train.txt", "split/val.txt", "split/test.txt", "split-frames/train.txt",
                "split-frames/val.txt", "split-frames/test.txt", "meta_data.yml",
                "video_annotation_transcript.yaml", "bah-video.csv"):
        assert (data / rel).is_file(), rel
    assert (out / "test-set-30-participants-unlabeled/data/split/test.txt").is_file()
    vids = result["videos"]
    assert all(ID_RE.match(v["video_id"]) for v in vids)
    assert any(" " in v["video_id"] for v in vids) and any("DESKTOP" in v["video_id"] for v in vids)
    assert {v["fps"] for v in vids} == {24, 25, 30}
    assert any(v["frames"] < 16 for v in vids) and all(v["frames"] > 10 for v in vids)
    assert any(v["audio_channels"] == 2 for v in vids)
    # participant-disjoint splits
    pids = {s: {v["pid"] for v in vids if v["split"] == s} for s in ("train", "val", "test", "private")}
    assert all(not (pids[a] & pids[b]) for a in pids for b in pids if a < b)
    # frames on disk equal mp4 frames; the mp4 carries an AAC track
    v = vids[0]
    faces = data / "cropped-aligned-faces" / v["video_id"]
    assert sorted(int(p.stem[6:]) for p in faces.glob("frame-*.jpg")) == list(range(v["frames"]))
    with av.open(str(data / v["video_id"])) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.video[0].frames == v["frames"]
    # Whisper YAML quirks: tuple tags, null last end, restarts
    texts = [p.read_text() for p in (data / "transcription").rglob("*.yml")]
    assert all("!!python/tuple" in t for t in texts)
    assert any(", null]" in t for t in texts)
    restarts = 0
    for t in texts:
        starts = [c["timestamp"][0] for c in yaml.safe_load(t.replace("!!python/tuple", ""))["chunks"]]
        restarts += any(b < a for a, b in zip(starts, starts[1:]))
    assert restarts > 0
    # transcripts carry raw commas in the split file; the private file has BAH's placeholder label on every line
    assert all(line.count(",") >= 3 for line in (data / "split/train.txt").read_text().splitlines())
    private = (out / "test-set-30-participants-unlabeled/data/split/test.txt").read_text().splitlines()
    assert private and all(line.split(",")[1] == "0" for line in private)
    frames_lines = (data / "split-frames/val.txt").read_text().splitlines()
    assert len(frames_lines) == sum(v["frames"] for v in vids if v["split"] == "val")
    assert (data / "bah-video.csv").read_text().startswith("video-path,")
    meta = yaml.safe_load((data / "meta_data.yml").read_text())
    assert set(meta) == pids["train"] | pids["val"] | pids["test"]


def _face_valence(video) -> int:
    face = read_faces(video.face_frames[:2], 32).astype(float).mean(axis=(0, 1, 2))
    return int(face[0] > face[2])  # warm (red > blue) vs cold


def _text_valence(text: str) -> int:
    words = text.lower().replace(",", " ").replace(".", " ").split()
    pos = {w for s in POSITIVE for w in s.lower().replace(",", " ").split()}
    neg = {w for s in NEGATIVE for w in s.lower().replace(",", " ").split()}
    only_pos, only_neg = pos - neg, neg - pos
    return int(sum(w in only_pos for w in words) > sum(w in only_neg for w in words))


def _pitch_wobble(wave: np.ndarray, rate: int = 16000) -> float:
    """Relative interquartile spread of the spectral-peak pitch (80-400 Hz) over 64 ms frames, pauses skipped."""
    size, hop, pad = 1024, 512, 16384
    freqs = np.fft.rfftfreq(pad, 1 / rate)
    band = (freqs > 80) & (freqs < 400)
    pitches = []
    for s in range(0, len(wave) - size, hop):
        seg = wave[s:s + size]
        if np.sqrt(np.mean(seg ** 2)) < 0.05:
            continue  # pause
        spectrum = np.abs(np.fft.rfft(seg * np.hanning(size), pad))
        pitches.append(freqs[band][spectrum[band].argmax()])
    if len(pitches) < 4:
        return 0.0
    q25, q50, q75 = np.percentile(pitches, [25, 50, 75])
    return float((q75 - q25) / q50)  # robust to the odd frame locking onto a harmonic


def test_planted_signal_needs_face_and_text_together(tree60):
    out, _ = tree60
    ds = read_bah(out / "data")
    labelled = [v for v in ds.videos if v.label is not None]
    y = np.array([v.label for v in labelled])
    face = np.array([_face_valence(v) for v in labelled])
    text = np.array([_text_valence(v.transcript) for v in labelled])
    acc = lambda pred: float(np.mean(pred == y))  # noqa: E731
    best_single = max(max(acc(f), 1 - acc(f)) for f in (face, text))
    assert acc(face ^ text) >= 0.88, "face XOR text determines the label (up to ~5% noise)"
    assert best_single <= 0.72, f"one modality alone is near chance ({best_single:.2f})"
    hedged = np.array([any(h.lower() in v.transcript.lower() for h in HEDGES) for v in labelled])
    assert hedged[y == 1].mean() > hedged[y == 0].mean() + 0.15, "hedges are a weaker A/H cue"


def test_wavering_voice_is_in_the_audio(tree60):
    out, result = tree60
    ds = read_bah(out / "data")
    planned = {v["video_id"]: v["wobble"] for v in result["videos"]}
    videos = [v for v in ds.videos if v.frame_count >= 30][:24]
    score = np.array([_pitch_wobble(read_audio(v.mp4)) for v in videos])
    truth = np.array([planned[v.video_id] for v in videos])
    assert truth.any() and not truth.all()
    assert np.mean((score > 0.03) == truth) >= 0.9, (score[truth], score[~truth])
