"""A synthetic BAH dataset in EXACTLY the real layout (docs/BAH_LAYOUT.md), with planted cross-modal signals.

Layout written under OUT:
  data/Videos/<pid>/Visite_1/<name>.mp4            H.264 (or MPEG-4 part 2) 96x96 video + AAC audio track
  data/cropped-aligned-faces/Videos/.../<name>.mp4/frame-<N>.jpg    one 64x64 RGB face JPEG per mp4 frame
  data/transcription/Videos/.../<name>.mp4/<name>.yml               Whisper YAML (!!python/tuple timestamps)
  data/split/{train,val,test}.txt, data/split-frames/{train,val,test}.txt, data/meta_data.yml,
  data/video_annotation_transcript.yaml, data/bah-video.csv
  test-set-30-participants-unlabeled/data/{split/test.txt,Videos,cropped-aligned-faces,transcription}
Quirks included: ids with a space instead of '_' between date and time (~1 in 5), the '-DESKTOP-NQ55E0P'
suffix, raw commas in transcripts, a null last chunk end (most videos), a Whisper-style timestamp restart
(the last chunk restarts from 0 in about half the videos), more than 10 frames per video (numeric sort
matters), fps 24/25/30, a few videos shorter than 16 frames, some audio at 44.1 kHz stereo, participant-
disjoint splits, private split lines with the placeholder label (`id,0,text`) on every line, as in BAH.

PLANTED SIGNAL (the rule the labels follow; deterministic given the seed):
  * face valence F in {0, 1}, drawn at random per video. F=1: warm, bright face crops (orange/beige) with a
    smiling mouth arc; F=0: cold, dark face crops (blue/grey) with a frowning arc. Strong and global, so a
    random-initialised video encoder on 16 frames resized to 32-64 px still carries it.
  * text valence T in {0, 1}: positive phrases ("happy", "great", "love", ...) vs negative ones ("sad",
    "terrible", "hate", ...) dominate the transcript, two or three valence words per phrase.
  * label A/H = F XOR T (what is said disagrees with what the face shows), then ~5% label noise (T flipped).
    Labels are balanced within each split and F is independent of the label, so face alone and text alone
    are at chance; only their combination determines the label.
  * weaker cues, independent of both valences: hedging words ("maybe", "I guess", "I'm not sure") in 65% of
    A/H transcripts vs 25% otherwise; a wavering voice (the tone's pitch wobbles +-12% at 5 Hz) in 70% of
    A/H videos vs 25% otherwise, and hesitation pauses (silent gaps) 60% vs 25%. The audio's base pitch
    varies per participant (nuisance), so audio alone is only weakly informative.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import yaml
from PIL import Image, ImageDraw

from extract.bah import PRIVATE_SUBDIR
from extract.errors import AHError

FACE_SIZE = 64
FRAME_SIZE = 96
LABEL_NOISE = 0.05
QUESTIONS = {1: "neutral", 2: "positive", 3: "negative", 4: "ambivalent", 5: "willing", 6: "resistant", 7: "hesitant"}

# Two or three valence words per phrase: with one, the valence words were ~1 token in 6 and the tiny random
# text encoder's mean token moved too little for the face x words interaction to be learned reliably.
POSITIVE = [
    "I feel really happy and glad about it", "that sounds great and wonderful to me", "I love this lovely idea",
    "it was a wonderful, happy experience", "I am excited, glad and proud",
    "everything went well, it was good and great", "I really enjoy it, I love it", "it makes me hopeful, happy and proud",
]
NEGATIVE = [
    "I feel really sad and upset about it", "that sounds terrible and awful to me", "I hate this horrible idea",
    "it was an awful, sad experience", "I am worried, upset and afraid",
    "everything went wrong, it was bad and terrible", "I really dislike it, I hate it", "it makes me angry, sad and afraid",
]
NEUTRAL = ["so", "well", "you know", "about the question", "in my daily life", "when I think about it", "for me"]
HEDGES = ["maybe", "I guess", "I'm not sure", "kind of", "I don't know"]


class SynthError(AHError):
    """The synthetic tree cannot be written (e.g. the target is not empty)."""


@dataclass
class _Plan:
    video_id: str
    pid: str
    question: int
    split: str  # train/val/test/private
    label: int
    face_val: int
    text_val: int
    hedge: bool
    wobble: bool
    pauses: bool
    fps: int
    frames: int
    audio_rate: int
    audio_channels: int
    restart: bool
    null_end: bool
    private_style: int  # 0: 'id,0,text', 1: 'id,text'


# ------------------------------------------------------------------------------------------ planning
def _video_codec() -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec missing from this FFmpeg build
            continue
    raise SynthError("no H.264 or MPEG-4 video encoder in this FFmpeg build (PyAV)")


def _video_name(rng: np.random.Generator, pid: str, q: int, idx: int) -> str:
    date = f"2023-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    time = f"{rng.integers(8, 20):02d}-{rng.integers(0, 60):02d}-{rng.integers(0, 60):02d}"
    space = idx % 5 == 1 if idx < 10 else rng.random() < 0.2  # guarantee the quirk early, then ~1 in 5
    desktop = idx % 7 == 2 if idx < 10 else rng.random() < 0.15
    sep = " " if space else "_"
    suffix = "Video-DESKTOP-NQ55E0P" if desktop else "Video"
    return f"Videos/{pid}/Visite_1/{pid}_Question_{q}_{date}{sep}{time}_{suffix}.mp4"


def _participants(n_videos: int, rng: np.random.Generator) -> list[int]:
    """Videos per participant (each <= 7 distinct questions)."""
    n_part = max(3, math.ceil(n_videos / 4))
    counts = [n_videos // n_part] * n_part
    for i in range(n_videos % n_part):
        counts[i] += 1
    return [c for c in counts if c > 0]


def _split_of_participants(n_part: int) -> list[str]:
    n_val = max(1, round(0.15 * n_part))
    n_test = max(1, round(0.25 * n_part))
    n_train = max(1, n_part - n_val - n_test)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n_part - n_train - n_val)


def _plan(videos: int, private: int, seed: int) -> list[_Plan]:
    rng = np.random.default_rng([seed, 0])
    plans: list[_Plan] = []
    counts = _participants(videos, rng) if videos else []
    splits = _split_of_participants(len(counts)) if counts else []
    pid_numbers = rng.permutation(np.arange(10000, 90000))[: len(counts) + max(1, math.ceil(private / 4))]
    pids_pub = [str(p) for p in pid_numbers[: len(counts)]]
    by_split: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": [], "private": []}
    for pid, count, split in zip(pids_pub, counts, splits):
        by_split[split].append((pid, count))
    if private:
        n_priv = math.ceil(private / 4)
        pcounts = [private // n_priv + (1 if i < private % n_priv else 0) for i in range(n_priv)]
        for i, c in enumerate(pcounts):
            by_split["private"].append((str(pid_numbers[len(counts) + i]), c))
    idx = 0
    for split, members in by_split.items():
        items: list[tuple[str, int]] = []
        for pid, count in members:
            for q in rng.permutation(np.arange(1, 8))[:count]:
                items.append((pid, int(q)))
        n = len(items)
        labels = (np.arange(n) < round(0.55 * n)).astype(int)
        labels = rng.permutation(labels)
        order = rng.permutation(n)
        for k in order:
            pid, q = items[k]
            vr = np.random.default_rng([seed, 1, idx])
            label = int(labels[k])
            face_val = int(vr.integers(0, 2))
            noisy = int(vr.random() < LABEL_NOISE)
            text_val = face_val ^ label ^ noisy
            fps = int(vr.choice([24, 25, 30], p=[0.5, 0.25, 0.25]))
            if idx % 10 == 3:
                frames = int(vr.integers(11, 16))  # shorter than a 16-frame clip
            else:
                frames = int(round(vr.uniform(1.0, 3.0) * fps))
            stereo = idx % 5 == 4
            plans.append(_Plan(
                video_id=_video_name(vr, pid, q, idx), pid=pid, question=q, split=split, label=label,
                face_val=face_val, text_val=text_val,
                hedge=bool(vr.random() < (0.65 if label else 0.25)),
                wobble=bool(vr.random() < (0.70 if label else 0.25)),
                pauses=bool(vr.random() < (0.60 if label else 0.25)),
                fps=fps, frames=frames,
                audio_rate=44100 if stereo else 16000, audio_channels=2 if stereo else 1,
                restart=bool(vr.random() < 0.5), null_end=bool(vr.random() < 0.7),
                private_style=idx % 2,
            ))
            idx += 1
    return plans


# ------------------------------------------------------------------------------------------ content
def _face_base(p: _Plan, rng: np.random.Generator) -> np.ndarray:
    """One 64x64 face per video: warm/bright + smile (F=1) or cold/dark + frown (F=0)."""
    jitter = rng.integers(-15, 16, size=3)
    if p.face_val:
        bg, skin, mouth = np.array([235, 165, 80]), np.array([250, 210, 160]), (150, 40, 40)
    else:
        bg, skin, mouth = np.array([40, 60, 125]), np.array([110, 125, 160]), (20, 20, 40)
    img = Image.new("RGB", (FACE_SIZE, FACE_SIZE), tuple(int(c) for c in np.clip(bg + jitter, 0, 255)))
    d = ImageDraw.Draw(img)
    d.ellipse((10, 6, 54, 60), fill=tuple(int(c) for c in np.clip(skin + jitter, 0, 255)))
    d.ellipse((20, 22, 27, 28), fill=(30, 30, 30))
    d.ellipse((37, 22, 44, 28), fill=(30, 30, 30))
    if p.face_val:
        d.arc((20, 30, 44, 50), start=20, end=160, fill=mouth, width=3)  # smile
    else:
        d.arc((20, 42, 44, 60), start=200, end=340, fill=mouth, width=3)  # frown
    return np.asarray(img, dtype=np.int16)


def _face_frames(p: _Plan, rng: np.random.Generator) -> np.ndarray:
    base = _face_base(p, rng)
    t = np.arange(p.frames)
    dx = np.round(2 * np.sin(2 * np.pi * t / max(p.fps, 1) * 0.7)).astype(int)
    dy = np.round(1.5 * np.sin(2 * np.pi * t / max(p.fps, 1) * 1.1 + 1)).astype(int)
    out = np.empty((p.frames, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    for i in range(p.frames):
        frame = np.roll(base, (dy[i], dx[i]), axis=(0, 1)) + rng.normal(0, 4, size=base.shape)
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def _scene_frames(faces: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Full webcam frames: a valence-independent background with the face in the middle."""
    bg = rng.integers(90, 170, size=3)
    out = np.empty((len(faces), FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    out[:] = bg.astype(np.uint8)
    o = (FRAME_SIZE - FACE_SIZE) // 2
    out[:, o:o + FACE_SIZE, o:o + FACE_SIZE] = faces
    return out


def _audio(p: _Plan, base_pitch: float, rng: np.random.Generator) -> np.ndarray:
    """A voiced tone (channels, samples) float32: steady or wobbling pitch, syllable envelope, pauses."""
    sr = p.audio_rate
    n = int(round(p.frames / p.fps * sr))
    t = np.arange(n) / sr
    f = base_pitch * (1 + 0.12 * np.sin(2 * np.pi * 5.0 * t)) if p.wobble else np.full(n, base_pitch)
    phase = 2 * np.pi * np.cumsum(f) / sr
    wave = 0.30 * np.sin(phase) + 0.10 * np.sin(2 * phase) + 0.05 * np.sin(3 * phase)
    wave *= 0.6 + 0.4 * np.abs(np.sin(np.pi * 4.0 * t + rng.uniform(0, np.pi)))
    if p.pauses and n > sr // 2:
        for _ in range(2):
            start = int(rng.integers(0, n - sr // 6))
            wave[start:start + sr // 6] = 0.0
    wave += rng.normal(0, 0.005, size=n)
    wave = wave.astype(np.float32)
    return np.stack([wave] * p.audio_channels)


def _transcript(p: _Plan, rng: np.random.Generator) -> list[str]:
    """Phrases (each later a chunk piece); valence phrases dominate, hedges when planned."""
    bank = POSITIVE if p.text_val else NEGATIVE
    n_val = int(rng.integers(3, 6))
    phrases = [bank[i] for i in rng.choice(len(bank), size=n_val, replace=False)]
    for _ in range(int(rng.integers(1, 3))):
        phrases.insert(int(rng.integers(0, len(phrases) + 1)), NEUTRAL[int(rng.integers(len(NEUTRAL)))])
    if p.hedge:
        for _ in range(int(rng.integers(1, 3))):
            phrases.insert(int(rng.integers(0, len(phrases) + 1)), HEDGES[int(rng.integers(len(HEDGES)))])
    return phrases


def _chunks(p: _Plan, phrases: list[str], rng: np.random.Generator) -> list[dict]:
    """Whisper-like chunks over the video's duration; last end null and/or a timestamp restart."""
    duration = p.frames / p.fps
    n_chunks = min(len(phrases), 3)
    groups = np.array_split(np.arange(len(phrases)), n_chunks)
    bounds = np.round(np.linspace(0.0, duration * 0.95, n_chunks + 1), 2)
    chunks = []
    for i, g in enumerate(groups):
        text = " " + ", ".join(phrases[j] for j in g) + ("," if i < n_chunks - 1 else ".")
        start, end = float(bounds[i]), float(bounds[i + 1])
        if p.restart and n_chunks >= 3 and i == n_chunks - 1:
            start, end = 0.0, round(end - start, 2)  # Whisper restarted its window here
        is_last = i == n_chunks - 1
        chunks.append({"language": "english", "text": text,
                       "timestamp": (start, None if (is_last and p.null_end) else end)})
    return chunks


# ------------------------------------------------------------------------------------------ writers
class _TupleDumper(yaml.SafeDumper):
    """Writes tuples as `!!python/tuple [a, b]` the way Whisper's pipeline output was dumped."""


_TupleDumper.add_representer(
    tuple, lambda d, data: d.represent_sequence("tag:yaml.org,2002:python/tuple", list(data), flow_style=True)
)


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray, rate: int, codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width = vs.height = FRAME_SIZE
        vs.pix_fmt = "yuv420p"
        if codec == "libx264":
            vs.options = {"preset": "ultrafast", "crf": "18", "threads": "1"}
        layout = "stereo" if audio.shape[0] == 2 else "mono"
        aus = out.add_stream("aac", rate=rate, layout=layout)
        aus.bit_rate = 64000
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            out.mux(vs.encode(vf))
        out.mux(vs.encode(None))
        step = 1024
        for s in range(0, audio.shape[1], step):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, s:s + step]), format="fltp", layout=layout)
            af.sample_rate = rate
            af.pts = s
            af.time_base = Fraction(1, rate)
            out.mux(aus.encode(af))
        out.mux(aus.encode(None))


def _write_video(base: Path, p: _Plan, seed: int, idx: int, codec: str, pitch: float) -> str:
    rng = np.random.default_rng([seed, 2, idx])
    name = p.video_id.rsplit("/", 1)[1]
    faces = _face_frames(p, rng)
    face_dir = base / "cropped-aligned-faces" / p.video_id
    face_dir.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(face_dir / f"frame-{i}.jpg", quality=92)
    write_mp4(base / p.video_id, _scene_frames(faces, rng), p.fps, _audio(p, pitch, rng), p.audio_rate, codec)
    phrases = _transcript(p, rng)
    chunks = _chunks(p, phrases, rng)
    text = "".join(c["text"] for c in chunks)
    tdir = base / "transcription" / p.video_id
    tdir.mkdir(parents=True, exist_ok=True)
    with open(tdir / f"{name[:-4]}.yml", "w", encoding="utf-8") as fh:
        yaml.dump({"text": text, "chunks": chunks}, fh, Dumper=_TupleDumper, sort_keys=False, allow_unicode=True)
    return text.strip()


def _meta(pids: list[str], seed: int) -> dict:
    rng = np.random.default_rng([seed, 3])
    meta = {}
    for pid in sorted(pids):
        age = int(rng.integers(18, 70))
        meta[pid] = {
            "Age": age, "Age range": f"{age // 10 * 10}-{age // 10 * 10 + 9}", "Birth country": "Canada",
            "Canada province": str(rng.choice(["Quebec", "Ontario", "Alberta"])),
            "Ethnicity": str(rng.choice(["White", "Asian", "Black", "Hispanic"])), "Ethnicity simplified": "n/a",
            "Gender": str(rng.choice(["Male", "Female"])), "Is student": bool(rng.random() < 0.3),
            "Use in challenges": "Yes", "Use in publications": "Yes",
        }
    return meta


def _annotation(p: _Plan, text: str) -> dict:
    last = p.frames - 1
    seconds = lambda f: f"00:00:{f / p.fps:06.3f}"  # noqa: E731
    span = [max(0, last // 3), last] if p.label else None
    return {
        "annotator_id": 1, "global_ah": p.label,
        "time_detailed_ah": [[seconds(span[0]), seconds(span[1])]] if span else [],
        "fr_detailed_ah": [span] if span else [], "certainty_ah": 3 if p.label else 0,
        "all_cues": [{"audio": int(p.wobble), "body": 0, "facial": int(p.label and p.face_val != p.text_val),
                      "inconsistencies": int(p.face_val != p.text_val), "language": int(p.hedge)}],
        "frame_annotation": [p.label if span and span[0] <= f else 0 for f in range(p.frames)],
        "transcript": text,
    }


def _clean_target(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise SynthError(f"{path}: exists and is not empty; choose another OUT or remove it")


def write_synthetic_bah(out: Path, videos: int, seed: int, private: int | None = None,
                        on_video: Callable[[str], None] | None = None) -> dict:
    """Write OUT/data (train/val/test, `videos` videos in all) and OUT/test-set-30-participants-unlabeled/data
    (`private` videos; default max(2, videos // 10)). Returns what was written:
    {"root", "private_root", "codec", "splits": {split: {"videos", "positive"}}, "videos": [per-video facts]}."""
    if videos < 3:
        raise SynthError(f"--videos {videos}: at least 3 are needed (one per train/val/test split)")
    out = Path(out)
    private = max(2, videos // 10) if private is None else private
    data, priv = out / "data", out / PRIVATE_SUBDIR
    _clean_target(data)
    if private:
        _clean_target(priv)
    codec = _video_codec()
    plans = _plan(videos, private, seed)
    pitch_rng = np.random.default_rng([seed, 4])
    pitches = {pid: float(pitch_rng.uniform(120, 240)) for pid in sorted({p.pid for p in plans})}
    texts: dict[str, str] = {}
    for idx, p in enumerate(plans):
        texts[p.video_id] = _write_video(priv if p.split == "private" else data, p, seed, idx, codec, pitches[p.pid])
        if on_video:
            on_video(p.video_id)
    _write_lists(data, priv, plans, texts, seed)
    summary = {s: {"videos": sum(p.split == s for p in plans), "positive": sum(p.label for p in plans if p.split == s)}
               for s in ("train", "val", "test")}
    summary["private"] = {"videos": sum(p.split == "private" for p in plans), "positive": None}
    return {
        "root": str(data), "private_root": str(priv) if private else None, "codec": codec, "splits": summary,
        "videos": [{"video_id": p.video_id, "split": p.split, "label": None if p.split == "private" else p.label,
                    "hidden_label": p.label, "pid": p.pid, "question": p.question, "fps": p.fps, "frames": p.frames,
                    "face_valence": p.face_val, "text_valence": p.text_val, "hedge": p.hedge, "wobble": p.wobble,
                    "pauses": p.pauses, "audio_rate": p.audio_rate, "audio_channels": p.audio_channels}
                   for p in plans],
    }


def _write_lists(data: Path, priv: Path, plans: list[_Plan], texts: dict[str, str], seed: int) -> None:
    (data / "split").mkdir(parents=True, exist_ok=True)
    (data / "split-frames").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = [p for p in plans if p.split == split]
        with open(data / "split" / f"{split}.txt", "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(f"{p.video_id},{p.label},{texts[p.video_id]}\n" for p in rows)
        with open(data / "split-frames" / f"{split}.txt", "w", encoding="utf-8", newline="\n") as fh:
            for p in rows:
                fh.writelines(f"{p.video_id}/frame-{i}.jpg,{p.label}\n" for i in range(p.frames))
    private_rows = [p for p in plans if p.split == "private"]
    if private_rows:
        (priv / "split").mkdir(parents=True, exist_ok=True)
        with open(priv / "split" / "test.txt", "w", encoding="utf-8", newline="\n") as fh:
            # the real file's style: a placeholder label on every line (the reader decides the style per file)
            fh.writelines(f"{p.video_id},0,{texts[p.video_id]}\n" for p in private_rows)
    public = [p for p in plans if p.split != "private"]
    with open(data / "meta_data.yml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(_meta(sorted({p.pid for p in public}), seed), fh, sort_keys=False, allow_unicode=True)
    with open(data / "video_annotation_transcript.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump({p.video_id: _annotation(p, texts[p.video_id]) for p in public}, fh, sort_keys=False,
                       default_flow_style=None, width=1000)
    with open(data / "bah-video.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video-path", "split", "label"])
        writer.writerows([p.video_id, p.split, p.label] for p in public)
