"""`ahcli predict`: score a recording that is in no cache (encoders first, then the heads).

The recording goes through exactly what extraction does to a cached video (window starts from the spec's
seed and the video id, the same decoding, `extract.run.encode_video_record`, the cache dtype), then through
`heads.infer.predict_split` like `evaluate`. So a video of a BAH tree scored here with its face crops and
transcript gets the probability `evaluate` gives it from the cache (tested). Differences to a cached video:
- without --faces, the windows are cut from the full mp4 frames resized to the encoder's input size (the
  heads were trained on face crops: expect a shift; the output says so);
- the video id (which seeds the window starts) is the path from its `Videos/` component when there is one
  (BAH ids look like Videos/<pid>/Visite_1/<name>.mp4), else the file name; --video-id overrides it.
Several runs are averaged (as an ensemble); an ensemble folder stands for its member runs and its threshold.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ahflows.single import MemoryVideo, load_video
from extract.bah import Video
from extract.decode import decode_windows
from extract.encoders import load_encoders
from extract.errors import AHError
from extract.media import probe
from extract.run import DecodedVideo, encode_video_record
from extract.spec import load_spec
from extract.transcripts import BahError, TranscriptChunk, parse_transcript
from extract.windows import window_starts
from heads.calibration import load_calibration
from heads.infer import predict_split
from heads.runs import load_run

_FRAME_RE = re.compile(r"^frame-(\d+)\.jpg$", re.IGNORECASE)
_QUESTION_RE = re.compile(r"_Question_(\d+)_")


class PredictError(AHError):
    """A recording, transcript or run that cannot be scored (the message names the file)."""


@dataclass
class Recording:
    video_id: str
    mp4: Path
    face_frames: list[Path] | None        # face crops, numerically sorted; None: full mp4 frames
    frame_count: int
    fps: float
    duration: float
    transcript: str
    chunks: list
    notes: list[str] = field(default_factory=list)


@dataclass
class RunScore:
    run: str
    probability: float
    threshold: float


@dataclass
class Prediction:
    video_id: str
    probability: float
    threshold: float
    prediction: int               # 1 = A/H (probability >= threshold)
    runs: list[RunScore]
    window_starts: list[int]
    frames_source: str            # 'faces' or 'full frames'
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# ---- the recording ---------------------------------------------------------------------------------


def derive_video_id(mp4: Path) -> str:
    """BAH-style id: the path from its last 'Videos' component (as in the split files), else the file name."""
    parts = Path(mp4).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "Videos":
            return "/".join(parts[i:])
    return Path(mp4).name


def face_frames(face_dir: Path) -> list[Path]:
    """frame-<N>.jpg files of a face folder, numerically sorted (frame-10 after frame-9)."""
    face_dir = Path(face_dir)
    if not face_dir.is_dir():
        raise PredictError(f"{face_dir}: face folder not found")
    numbered = sorted((int(m.group(1)), p) for p in face_dir.iterdir() if (m := _FRAME_RE.match(p.name)))
    if not numbered:
        raise PredictError(f"{face_dir}: face folder holds no frame-<N>.jpg")
    return [p for _, p in numbered]


def open_recording(mp4: Path, faces: Path | None = None, transcript: Path | None = None, text: str | None = None,
                   video_id: str | None = None) -> Recording:
    """Probe the mp4, list the face crops, read the transcript (YAML or plain text)."""

    mp4 = Path(mp4)
    if not mp4.is_file():
        raise PredictError(f"{mp4}: video file not found")
    if transcript is not None and text is not None:
        raise PredictError("give either --transcript FILE.yml or --text, not both")
    info = probe(mp4)
    notes: list[str] = []
    frame_paths = face_frames(faces) if faces is not None else None
    if frame_paths is None:
        if not info.has_video or not info.frames:
            raise PredictError(f"{mp4}: no video frames to read (and no --faces folder given)")
        notes.append("no face crops given: windows are cut from the full mp4 frames, resized to the encoder's "
                     "input size (the heads were trained on face crops)")
        n = int(info.frames)
    else:
        n = len(frame_paths)
    fps = info.fps if info.fps and info.fps > 0 else None
    if fps is None:
        if not info.duration:
            raise PredictError(f"{mp4}: neither a frame rate nor a duration in the container")
        fps = n / info.duration
    duration = float(info.duration or n / fps)
    chunks: list = []
    if transcript is not None:
        if not Path(transcript).is_file():
            raise PredictError(f"{transcript}: transcript file not found")
        try:
            said, chunks = parse_transcript(Path(transcript), duration)
        except BahError as exc:
            raise PredictError(str(exc)) from exc
    elif text is not None:
        said = text.strip()
        chunks = [TranscriptChunk(said, 0.0, duration)]
    else:
        said = ""
        notes.append("no transcript given (--transcript or --text): the text encoder sees an empty transcript")
    return Recording(video_id or derive_video_id(mp4), mp4, frame_paths, n, float(fps), duration, said, chunks, notes)


def decode_recording(rec: Recording, spec, windows: int):
    """The recording decoded like a cached video: `extract.run.DecodedVideo` with `windows` windows."""

    starts = window_starts(rec.video_id, rec.frame_count, windows, spec.windows.frames, spec.seed)
    got = decode_windows(rec, starts, spec, texts=spec.text.window_aligned)
    parts = rec.video_id.split("/")
    q = _QUESTION_RE.search(rec.video_id)
    video = Video(video_id=rec.video_id, pid=parts[1] if len(parts) > 2 else "unknown",
                  question=int(q.group(1)) if q else 0, split="test", label=None, mp4=rec.mp4,
                  face_dir=rec.face_frames[0].parent if rec.face_frames else rec.mp4.parent,
                  face_frames=rec.face_frames or [], transcript=rec.transcript, transcript_yaml=rec.mp4,
                  chunks=list(rec.chunks), fps=rec.fps, frame_count=rec.frame_count, duration=rec.duration,
                  has_audio=True)
    return DecodedVideo(video, starts, got.clips, got.wave, got.texts, rec.frame_count < spec.windows.frames)


# ---- runs ------------------------------------------------------------------------------------------


def expand_runs(paths: Sequence[Path]) -> tuple[list[Path], float | None]:
    """Run folders; an ensemble folder (metrics.json with 'runs' and 'threshold') stands for its members
    and gives the threshold. Returns (run folders, ensemble threshold or None)."""
    runs: list[Path] = []
    threshold = None
    for p in map(Path, paths):
        metrics = p / "metrics.json"
        if not (p / "config.json").is_file() and metrics.is_file():
            try:
                m = json.loads(metrics.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise PredictError(f"{metrics}: not readable JSON ({exc})") from exc
            if isinstance(m, dict) and m.get("runs") and "threshold" in m:
                runs += [Path(r["path"]) for r in m["runs"]]
                threshold = float(m["threshold"]) if len(paths) == 1 else None
                continue
        runs.append(p)
    if not runs:
        raise PredictError("give at least one run folder")
    return runs, threshold


def check_runs(runs: Sequence, fingerprint: str, spec_path: Path) -> None:
    for r in runs:
        if r.fingerprint != fingerprint:
            raise PredictError(
                f"{r.path}: trained on cache fingerprint {r.fingerprint}, but {spec_path} with its encoders gives "
                f"{fingerprint}; score with the spec (and encoder weights) the run's cache was extracted with")


# ---- scoring ---------------------------------------------------------------------------------------


def predict_recording(runs: Sequence[Path], mp4: Path, spec_path: Path, *, faces: Path | None = None,
                      transcript: Path | None = None, text: str | None = None, windows: int = 5,
                      video_id: str | None = None, threshold: float | None = None, encoders=None,
                      batch_size: int = 16) -> Prediction:
    """Encode one recording with the spec's frozen encoders and score it with the runs (averaged).

    The threshold is `threshold`, else an ensemble folder's, else the single run's, else the mean of the
    runs' thresholds (said in the notes). `encoders` may be passed to reuse loaded ones."""

    if windows < 1:
        raise PredictError(f"--windows {windows}: must be >= 1")
    spec = load_spec(spec_path)
    enc = encoders if encoders is not None else load_encoders(spec, device="cpu")
    spec = enc.spec
    fingerprint = spec.fingerprint()
    run_dirs, ens_threshold = expand_runs(runs)
    loaded = [load_run(r, device="cpu") for r in run_dirs]
    check_runs(loaded, fingerprint, Path(spec_path))
    rec = open_recording(mp4, faces=faces, transcript=transcript, text=text, video_id=video_id)
    decoded = decode_recording(rec, spec, windows)
    record = encode_video_record(decoded, enc, spec, batch_size)
    data = load_video(MemoryVideo(record, spec.to_dict(), str(mp4)), loaded)
    scores = [RunScore(str(r.path), float(predict_split(r, data, windows=windows)[1][0]), float(r.threshold))
              for r in loaded]
    p = float(np.mean([s.probability for s in scores]))
    notes = list(rec.notes)
    # one run or ensemble folder with a calibration.json (heads/calibration.py): its temperature and threshold
    cal = load_calibration(Path(runs[0])) if len(runs) == 1 else None
    if cal is not None:
        p = float(cal.apply(p)[()])
        notes.append(f"probability temperature-scaled (T = {cal.temperature:.3f}, fitted on val)")
        if threshold is None:
            threshold = cal.threshold
    if threshold is None:
        if ens_threshold is not None:
            threshold = ens_threshold
        elif len(loaded) == 1:
            threshold = loaded[0].threshold
        else:
            threshold = float(np.mean([r.threshold for r in loaded]))
            notes.append("threshold: the mean of the runs' thresholds (an ensemble folder or --threshold "
                         "gives a threshold tuned on val for the average)")
    return Prediction(rec.video_id, p, float(threshold), int(p >= threshold), scores, list(decoded.starts),
                      "faces" if rec.face_frames is not None else "full frames", fingerprint, notes)


__all__ = ["Prediction", "RunScore", "Recording", "PredictError", "predict_recording", "open_recording",
           "decode_recording", "derive_video_id", "face_frames", "expand_runs"]
