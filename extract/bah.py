"""The BAH tree (see docs/BAH_LAYOUT.md) -> typed `Video` records, plus a list of `Problem`s.

Quirks handled: spaces and the DESKTOP suffix in ids, raw commas in transcripts (split with maxsplit=2),
private split lines with or without the placeholder label, BOM and CRLF (read, and reported as non-fatal
problems of the split file), numeric frame order, `!!python/tuple` timestamps (SafeLoader subclass), a null
last end (-> media duration), Whisper's 30 s timestamp restarts (-> monotonic offsets), fps from the
container with fallbacks.

Robustness: a video with a fatal problem is left out of `videos` and listed in `problems`; a non-fatal
oddity keeps the video and adds a problem too. YAML aliases are refused (no billion laughs), transcript
files are size-capped, ids that leave the root are refused, and symlinks leaving the root are refused
unless `allow_symlinks`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from extract.errors import AHError
from extract.media import MediaError, MediaInfo, probe
from extract.transcripts import BahError, TranscriptChunk, load_big_yaml, parse_transcript
from extract.vocab import PUBLIC_SPLITS, SPLITS

PRIVATE_SUBDIR = Path("test-set-30-participants-unlabeled") / "data"   # beside the labelled tree's root
PRIVATE_DIR = Path("..") / PRIVATE_SUBDIR                               # relative to the labelled root


def split_file(base: Path, split: str) -> Path:
    """A split's list file in a BAH tree: base/split/<split>.txt; the private split's is test.txt under its
    own tree (base = the private root)."""
    return Path(base) / "split" / ("test.txt" if split == "private" else f"{split}.txt")

_FRAME_RE = re.compile(r"^frame-(\d+)\.jpg$", re.IGNORECASE)
_QUESTION_RE = re.compile(r"_Question_(\d+)_")


class NotBahTree(AHError):
    """ROOT is not a BAH tree at all."""

    exit_code = 2




# Problem kinds (for the per-split table of `ahcli data check`).
K_SPLIT_LINE = "split_line"
K_MISSING_VIDEO = "missing_video"
K_MISSING_FACES = "missing_faces"
K_MISSING_TRANSCRIPT = "missing_transcript"
K_NO_AUDIO = "no_audio"
K_FRAME_MISMATCH = "frame_mismatch"
K_UNREADABLE = "unreadable"
K_REFUSED = "refused"
K_OTHER = "other"




@dataclass
class Video:
    video_id: str
    pid: str
    question: int
    split: str
    label: int | None
    mp4: Path
    face_dir: Path
    face_frames: list[Path]
    transcript: str
    transcript_yaml: Path
    chunks: list[TranscriptChunk]
    fps: float
    frame_count: int  # number of face frames: what clips index into
    duration: float
    has_audio: bool


@dataclass
class Problem:
    video_id: str
    problem: str
    split: str | None = None
    kind: str = K_OTHER
    fatal: bool = True


@dataclass
class BahDataset:
    root: Path
    private_root: Path | None
    videos: list[Video]
    problems: list[Problem]
    _metadata: dict | None = field(default=None, repr=False)
    _annotations: dict | None = field(default=None, repr=False)

    def split(self, name: str) -> list[Video]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [v for v in self.videos if v.split == name]

    def metadata(self) -> dict:
        """Participant metadata (meta_data.yml), keyed by pid string; loaded on first call."""
        if self._metadata is None:
            self._metadata = load_big_yaml(self.root / "meta_data.yml")
        return self._metadata

    def annotations(self) -> dict:
        """Per-video annotations (video_annotation_transcript.yaml); loaded on first call (large file)."""
        if self._annotations is None:
            self._annotations = load_big_yaml(self.root / "video_annotation_transcript.yaml")
        return self._annotations


# --------------------------------------------------------------------------------------- split files
@dataclass
class SplitLine:
    video_id: str
    label: int | None
    transcript: str
    lineno: int


def read_split_file(path: Path, private: bool, split: str) -> tuple[list[SplitLine], list[Problem]]:
    """Parse `video_id,label,transcript` lines (BOM, CRLF, non-UTF-8 bytes and private styles handled)."""
    lines: list[SplitLine] = []
    problems: list[Problem] = []
    rel = f"{path.parent.name}/{path.name}"
    data = path.read_bytes()
    # Both are read correctly and reported (not fatal): a tool that wrote them may have changed more.
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        problems.append(Problem(rel, "starts with a UTF-8 byte-order mark (ids read without it)", split,
                                K_SPLIT_LINE, fatal=False))
    if b"\r\n" in data:
        problems.append(Problem(rel, "CRLF line endings (read as LF)", split, K_SPLIT_LINE, fatal=False))
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            bad_bytes = False
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            bad_bytes = True
        parts = text.split(",", 2)
        video_id = parts[0].strip()
        where = f"{rel} line {lineno}"
        if bad_bytes and "\ufffd" in video_id:
            problems.append(Problem(video_id, f"{where}: video_id is not valid UTF-8", split, K_SPLIT_LINE))
            continue
        if private:
            if len(parts) >= 2 and parts[1].strip() in ("0", "1", ""):
                transcript = parts[2] if len(parts) == 3 else ""
            else:  # no label column: everything after the id is the transcript
                transcript = text.split(",", 1)[1] if len(parts) >= 2 else ""
            label = None
        else:
            if len(parts) < 2:
                problems.append(Problem(video_id, f"{where}: expected 'video_id,label,transcript'", split, K_SPLIT_LINE))
                continue
            label_text = parts[1].strip()
            if label_text not in ("0", "1"):
                problems.append(Problem(video_id, f"{where}: label {label_text!r} is not 0 or 1", split, K_SPLIT_LINE))
                continue
            label = int(label_text)
            transcript = parts[2] if len(parts) == 3 else ""
        if bad_bytes:
            problems.append(
                Problem(video_id, f"{where}: transcript holds bytes that are not UTF-8 (replaced)", split, K_SPLIT_LINE, fatal=False)
            )
        lines.append(SplitLine(video_id, label, transcript.strip(), lineno))
    return lines, problems


# --------------------------------------------------------------------------------------- one video
class _Skip(Exception):
    """A fatal problem for one video."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _check_id(video_id: str) -> PurePosixPath:
    if not video_id:
        raise _Skip(K_SPLIT_LINE, "empty video_id")
    if "\\" in video_id or "\x00" in video_id:
        raise _Skip(K_REFUSED, f"video_id {video_id!r} is refused: backslash or NUL in a path")
    rel = PurePosixPath(video_id)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] != "Videos":
        raise _Skip(K_REFUSED, f"video_id {video_id!r} is refused: it must be a relative path under Videos/")
    if rel.suffix.lower() != ".mp4":
        raise _Skip(K_REFUSED, f"video_id {video_id!r} is refused: it does not name an .mp4")
    return rel


def _inside(path: Path, root_real: Path, allow_symlinks: bool, what: str) -> None:
    """Refuse a path that resolves outside the dataset root (symlinks leaving the tree)."""
    if allow_symlinks:
        return
    real = Path(os.path.realpath(path))
    if real != root_real and root_real not in real.parents:
        raise _Skip(K_REFUSED, f"{path}: {what} is a symlink leaving the dataset root (to {real}); "
                               "pass allow_symlinks to accept it")


def _face_frames(face_dir: Path) -> tuple[list[Path], list[int], list[Path]]:
    """Frames sorted numerically (frame-10 after frame-9), their numbers, and those that are symlinks."""
    numbered: list[tuple[int, Path]] = []
    links: list[Path] = []
    with os.scandir(face_dir) as it:
        for entry in it:
            m = _FRAME_RE.match(entry.name)
            if m:
                numbered.append((int(m.group(1)), Path(entry.path)))
                if entry.is_symlink():
                    links.append(Path(entry.path))
    numbered.sort(key=lambda t: t[0])
    return [p for _, p in numbered], [n for n, _ in numbered], links


def transcript_path(base: Path, video_id: str) -> Path:
    """Where a video's Whisper YAML lies: transcription/<video_id>/<name>.yml (or .yaml) under its tree."""
    rel = PurePosixPath(video_id)
    folder = Path(base).joinpath("transcription", *rel.parts)
    stem = rel.name[:-4]
    for cand in (folder / f"{stem}.yml", folder / f"{stem}.yaml"):
        if cand.is_file():
            return cand
    return folder / f"{stem}.yml"


def _read_video(base: Path, base_real: Path, line: SplitLine, split: str, allow_symlinks: bool,
                notes: list[Problem]) -> Video:
    rel = _check_id(line.video_id)
    name = rel.name
    m = _QUESTION_RE.search(name)
    if not m:
        raise _Skip(K_SPLIT_LINE, f"{line.video_id}: no '_Question_<n>_' in the file name")
    question = int(m.group(1))
    pid = rel.parts[1] if len(rel.parts) > 2 else name.split("_", 1)[0]

    def note(kind: str, message: str) -> None:
        notes.append(Problem(line.video_id, message, split, kind, fatal=False))

    mp4 = base.joinpath(*rel.parts)
    face_dir = base.joinpath("cropped-aligned-faces", *rel.parts)
    if not mp4.parent.is_dir():
        raise _Skip(K_MISSING_VIDEO, f"{mp4.parent}: folder of the video does not exist")
    if not mp4.is_file():
        raise _Skip(K_MISSING_VIDEO, f"{mp4}: mp4 not found")
    _inside(mp4, base_real, allow_symlinks, "the mp4")
    if not face_dir.is_dir():
        raise _Skip(K_MISSING_FACES, f"{face_dir}: face folder not found")
    _inside(face_dir, base_real, allow_symlinks, "the face folder")
    frames, numbers, links = _face_frames(face_dir)
    if not frames:
        raise _Skip(K_MISSING_FACES, f"{face_dir}: face folder holds no frame-<N>.jpg")
    for p in links:  # scandir knows which entries are links: resolve only those
        _inside(p, base_real, allow_symlinks, "a face frame")
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        detail = f"missing frame-{missing[0]}.jpg" if missing else "numbering does not start at 0"
        note(K_FRAME_MISMATCH, f"{face_dir}: gap in frame numbering ({detail}; {len(frames)} frames up to {numbers[-1]})")
    tyaml = transcript_path(base, line.video_id)
    if not tyaml.is_file():
        raise _Skip(K_MISSING_TRANSCRIPT, f"{tyaml}: transcript YAML not found")
    _inside(tyaml, base_real, allow_symlinks, "the transcript YAML")

    try:
        info = probe(mp4)
    except MediaError as exc:
        raise _Skip(K_UNREADABLE, str(exc)) from exc
    fps, duration = _timing(info, len(frames), mp4)
    if not info.has_video:
        note(K_UNREADABLE, f"{mp4}: no video stream (fps taken from face frames / audio duration)")
    if not info.has_audio:
        note(K_NO_AUDIO, f"{mp4}: no audio track")
    if info.frames is not None and info.frames != len(frames):
        note(K_FRAME_MISMATCH, f"{face_dir}: {len(frames)} face frames but the mp4 has {info.frames}")

    try:
        yaml_text, chunks = parse_transcript(tyaml, duration)
    except BahError as exc:
        raise _Skip(K_MISSING_TRANSCRIPT, str(exc)) from exc
    transcript = line.transcript or yaml_text
    if not transcript.strip():
        note(K_MISSING_TRANSCRIPT, f"{tyaml}: empty transcript")
    return Video(
        video_id=line.video_id, pid=pid, question=question, split=split, label=line.label,
        mp4=mp4, face_dir=face_dir, face_frames=frames, transcript=transcript,
        transcript_yaml=tyaml, chunks=chunks, fps=fps, frame_count=len(frames),
        duration=duration, has_audio=info.has_audio,
    )


def _timing(info: MediaInfo, n_faces: int, mp4: Path) -> tuple[float, float]:
    """fps from the container; else face-frame count / duration (audio duration when no video stream)."""
    duration = info.duration
    fps = info.fps if info.fps and info.fps > 0 else None
    if fps is None:
        if not duration:
            raise _Skip(K_UNREADABLE, f"{mp4}: neither a frame rate nor a duration in the container")
        fps = n_faces / duration
    if not duration:
        duration = n_faces / fps
    return float(fps), float(duration)


# --------------------------------------------------------------------------------------- the tree
def _is_tree(root: Path) -> bool:
    return (root / "split").is_dir() and any((root / "split" / f"{s}.txt").is_file() for s in PUBLIC_SPLITS)


def _not_tree(root: Path, what: str) -> NotBahTree:
    hint = ""
    if (root / "data" / "split").is_dir():
        hint = f" (did you mean {root / 'data'}?)"
    return NotBahTree(
        f"{root}: not a BAH {what} tree{hint}; expected the unzipped data.zip: split/train.txt, split/val.txt, "
        "split/test.txt, Videos/, cropped-aligned-faces/, transcription/"
    )


def _read_root(base: Path, split_names: Iterable[str], private: bool, allow_symlinks: bool,
               seen: dict[str, str], videos: list[Video], problems: list[Problem]) -> None:
    base_real = Path(os.path.realpath(base))
    for split in split_names:
        path = split_file(base, "private" if private else split)
        if not path.is_file():
            problems.append(Problem(f"split/{path.name}", f"{path}: split file not found", split, K_SPLIT_LINE))
            continue
        lines, line_problems = read_split_file(path, private, split)
        problems.extend(line_problems)
        for line in lines:
            where = f"{path.parent.name}/{path.name} line {line.lineno}"
            if line.video_id in seen:
                problems.append(Problem(line.video_id, f"{where}: duplicate video_id (first at {seen[line.video_id]})",
                                        split, K_SPLIT_LINE))
                continue
            seen[line.video_id] = f"{split} {where}"
            notes: list[Problem] = []
            try:
                videos.append(_read_video(base, base_real, line, split, allow_symlinks, notes))
            except _Skip as skip:
                problems.append(Problem(line.video_id, str(skip), split, skip.kind))
            except OSError as exc:  # permissions, vanished files: never lose the other videos
                problems.append(Problem(line.video_id, f"{where}: {exc}", split, K_UNREADABLE))
            problems.extend(notes)


def read_bah(root, private_root=None, splits: Sequence[str] = SPLITS, allow_symlinks: bool = False) -> BahDataset:
    """Read a BAH tree. `private_root` defaults to <root>/../test-set-30-participants-unlabeled/data when
    that exists; its split/test.txt is reported as split 'private' (labels None)."""
    root = Path(root)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected any of {SPLITS}")
    if not root.is_dir() or not _is_tree(root):
        raise _not_tree(root, "data")
    if private_root is not None:
        private_root = Path(private_root)
        if not split_file(private_root, "private").is_file():
            raise NotBahTree(f"{private_root}: not a BAH private test tree; expected split/test.txt, Videos/, "
                             "cropped-aligned-faces/, transcription/")
    elif split_file(root / PRIVATE_DIR, "private").is_file():
        private_root = (root / PRIVATE_DIR).resolve()
    videos: list[Video] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    _read_root(root, [s for s in splits if s in PUBLIC_SPLITS], False, allow_symlinks, seen, videos, problems)
    if "private" in splits and private_root is not None:
        _read_root(private_root, ["private"], True, allow_symlinks, seen, videos, problems)
    return BahDataset(root=root, private_root=private_root, videos=videos, problems=problems)
