"""The BAH tree (see docs/BAH_LAYOUT.md) -> typed `Video` records, plus a list of `Problem`s.

Quirks handled: spaces and the DESKTOP suffix in ids, split files (extract/split_files.py: raw commas,
the private file's label style decided once per file, BOM, CRLF), numeric frame order, `!!python/tuple`
timestamps (SafeLoader subclass), a null last end (-> media duration), Whisper's 30 s timestamp restarts
(-> monotonic offsets), fps from the container with fallbacks.

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
from extract.split_files import (K_FRAME_MISMATCH, K_MISSING_FACES, K_MISSING_TRANSCRIPT, K_MISSING_VIDEO,
                                  K_NO_AUDIO, K_REFUSED, K_SPLIT_LINE, K_UNREADABLE, Problem, SplitLine,
                                  read_split_file)
from extract.transcripts import BahError, TranscriptChunk, load_big_yaml, parse_transcript
from extract.vocab import PUBLIC_SPLITS, SPLITS, check_split

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
class BahDataset:
    root: Path
    private_root: Path | None
    videos: list[Video]
    problems: list[Problem]
    # split -> every video id its split file lists, in file order (read or not): what a cache must hold
    listed: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)      # split -> the split file read
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


# --------------------------------------------------------------------------------------- one video
class _Skip(Exception):
    """Fatal problems of one video: every one found, not only the first (`data check` lists them all)."""

    def __init__(self, kind: str, message: str, more: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.kind = kind
        self.all = [(kind, message), *more]


class _Faults:
    """Collects a video's fatal problems while its independent checks go on."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, kind: str, message: str) -> None:
        self.found.append((kind, message))

    def check(self, fn, *args):
        try:
            return fn(*args)
        except _Skip as skip:
            self.found += skip.all
            return None

    def raise_any(self) -> None:
        if self.found:
            (kind, msg), *more = self.found
            raise _Skip(kind, msg, more)


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


def _face_frames(face_dir: Path) -> tuple[list[Path], list[int], list[Path], list[Path]]:
    """Frames sorted numerically (frame-10 after frame-9), their numbers, those that are symlinks, and those
    that are not regular files (a FIFO or a device would block or never end the decoder)."""
    numbered: list[tuple[int, Path]] = []
    links: list[Path] = []
    special: list[Path] = []
    with os.scandir(face_dir) as it:
        for entry in it:
            m = _FRAME_RE.match(entry.name)
            if m:
                numbered.append((int(m.group(1)), Path(entry.path)))
                if entry.is_symlink():
                    links.append(Path(entry.path))
                if not entry.is_file():          # follows a link: a link to a device is special too
                    special.append(Path(entry.path))
    numbered.sort(key=lambda t: t[0])
    return [p for _, p in numbered], [n for n, _ in numbered], links, sorted(special)


def transcript_path(base: Path, video_id: str) -> Path:
    """Where a video's Whisper YAML lies: transcription/<video_id>/<name>.yml (or .yaml) under its tree."""
    rel = PurePosixPath(video_id)
    folder = Path(base).joinpath("transcription", *rel.parts)
    stem = rel.name[:-4]
    for cand in (folder / f"{stem}.yml", folder / f"{stem}.yaml"):
        if cand.is_file():
            return cand
    return folder / f"{stem}.yml"


def _mp4_of(base: Path, base_real: Path, rel: PurePosixPath, allow_symlinks: bool) -> Path:
    mp4 = base.joinpath(*rel.parts)
    if not mp4.parent.is_dir():
        raise _Skip(K_MISSING_VIDEO, f"{mp4.parent}: folder of the video does not exist")
    if not mp4.is_file():
        raise _Skip(K_MISSING_VIDEO, f"{mp4}: mp4 not found")
    _inside(mp4, base_real, allow_symlinks, "the mp4")
    return mp4


def _faces_of(base: Path, base_real: Path, rel: PurePosixPath, allow_symlinks: bool, note) -> tuple[Path, list[Path]]:
    face_dir = base.joinpath("cropped-aligned-faces", *rel.parts)
    if not face_dir.is_dir():
        raise _Skip(K_MISSING_FACES, f"{face_dir}: face folder not found")
    _inside(face_dir, base_real, allow_symlinks, "the face folder")
    frames, numbers, links, special = _face_frames(face_dir)
    if not frames:
        raise _Skip(K_MISSING_FACES, f"{face_dir}: face folder holds no frame-<N>.jpg")
    if special:
        raise _Skip(K_UNREADABLE, f"{special[0]}: not a regular file ({len(special)} such frame(s)); it would "
                                  "block the decoder: replace it with the face crop")
    for p in links:  # scandir knows which entries are links: resolve only those
        _inside(p, base_real, allow_symlinks, "a face frame")
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        detail = f"missing frame-{missing[0]}.jpg" if missing else "numbering does not start at 0"
        note(K_FRAME_MISMATCH, f"{face_dir}: gap in frame numbering ({detail}; {len(frames)} frames up to {numbers[-1]})")
    return face_dir, frames


def _transcript_of(base: Path, base_real: Path, video_id: str, allow_symlinks: bool) -> Path:
    tyaml = transcript_path(base, video_id)
    if not tyaml.is_file():
        raise _Skip(K_MISSING_TRANSCRIPT, f"{tyaml}: transcript YAML not found")
    _inside(tyaml, base_real, allow_symlinks, "the transcript YAML")
    return tyaml


def _probe(mp4: Path) -> MediaInfo:
    try:
        return probe(mp4)
    except MediaError as exc:
        raise _Skip(K_UNREADABLE, str(exc)) from exc


def _parse(tyaml: Path, duration: float) -> tuple[str, list[TranscriptChunk]]:
    try:
        return parse_transcript(tyaml, duration)
    except BahError as exc:
        raise _Skip(K_MISSING_TRANSCRIPT, str(exc)) from exc


def _read_video(base: Path, base_real: Path, line: SplitLine, split: str, allow_symlinks: bool,
                notes: list[Problem]) -> Video:
    rel = _check_id(line.video_id)
    faults = _Faults()
    name = rel.name
    m = _QUESTION_RE.search(name)
    if not m:
        faults.add(K_SPLIT_LINE, f"{line.video_id}: no '_Question_<n>_' in the file name")
    pid = rel.parts[1] if len(rel.parts) > 2 else name.split("_", 1)[0]

    def note(kind: str, message: str) -> None:
        notes.append(Problem(line.video_id, message, split, kind, fatal=False))

    mp4 = faults.check(_mp4_of, base, base_real, rel, allow_symlinks)
    faces = faults.check(_faces_of, base, base_real, rel, allow_symlinks, note)
    tyaml = faults.check(_transcript_of, base, base_real, line.video_id, allow_symlinks)
    info = faults.check(_probe, mp4) if mp4 is not None else None
    n_faces = len(faces[1]) if faces is not None else 0
    timing = faults.check(_timing, info, n_faces, mp4) if info is not None else None
    parsed = faults.check(_parse, tyaml, timing[1]) if tyaml is not None and timing is not None else None
    faults.raise_any()
    assert m and faces and info and timing and parsed and mp4 and tyaml
    face_dir, frames = faces
    (fps, duration), (yaml_text, chunks) = timing, parsed
    if not info.has_video:
        note(K_UNREADABLE, f"{mp4}: no video stream (fps taken from face frames / audio duration)")
    if not info.has_audio:
        note(K_NO_AUDIO, f"{mp4}: no audio track")
    if info.frames is not None and info.frames != len(frames):
        note(K_FRAME_MISMATCH, f"{face_dir}: {len(frames)} face frames but the mp4 has {info.frames}")
    transcript = line.transcript or yaml_text
    if not transcript.strip():
        note(K_MISSING_TRANSCRIPT, f"{tyaml}: empty transcript")
    return Video(
        video_id=line.video_id, pid=pid, question=int(m.group(1)), split=split, label=line.label,
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


def _listed_ids(lines: list[SplitLine], problems: list[Problem]) -> list[str]:
    """Every id the split file lists, in file order, each once: the lines read and those refused."""
    at = [(x.lineno, x.video_id) for x in lines] + [(p.line, p.video_id) for p in problems if p.line and p.video_id]
    return list(dict.fromkeys(v for _, v in sorted(at)))


def _read_root(base: Path, split_names: Iterable[str], private: bool, allow_symlinks: bool,
               seen: dict[str, str], videos: list[Video], problems: list[Problem],
               listed: dict[str, list[str]], sources: dict[str, str]) -> None:
    base_real = Path(os.path.realpath(base))
    for split in split_names:
        path = split_file(base, "private" if private else split)
        if not path.is_file():
            problems.append(Problem(f"split/{path.name}", f"{path}: split file not found", split, K_SPLIT_LINE))
            continue
        lines, line_problems = read_split_file(path, private, split)
        problems.extend(line_problems)
        listed[split] = _listed_ids(lines, line_problems)
        sources[split] = str(path)
        for line in lines:
            where = f"{path.parent.name}/{path.name} line {line.lineno}"
            if line.video_id in seen:       # in two places: neither is trusted (which label is right?)
                videos[:] = [v for v in videos if v.video_id != line.video_id]
                problems.append(Problem(line.video_id, f"{where}: listed again (first at {seen[line.video_id]}); "
                                        "a video must be listed once: fix the split files", split, K_SPLIT_LINE))
                continue
            seen[line.video_id] = f"{split} {where}"
            notes: list[Problem] = []
            try:
                videos.append(_read_video(base, base_real, line, split, allow_symlinks, notes))
            except _Skip as skip:
                problems.extend(Problem(line.video_id, msg, split, kind) for kind, msg in skip.all)
            except OSError as exc:  # permissions, vanished files: never lose the other videos
                problems.append(Problem(line.video_id, f"{where}: {exc}", split, K_UNREADABLE))
            problems.extend(notes)


def read_bah(root, private_root=None, splits: Sequence[str] = SPLITS, allow_symlinks: bool = False) -> BahDataset:
    """Read a BAH tree. `private_root` defaults to <root>/../test-set-30-participants-unlabeled/data when
    that exists; its split/test.txt is reported as split 'private' (labels None)."""
    root = Path(root)
    for s in splits:
        check_split(s)                     # one line naming the unknown split
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
    listed: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    _read_root(root, [s for s in splits if s in PUBLIC_SPLITS], False, allow_symlinks, seen, videos, problems,
               listed, sources)
    if "private" in splits and private_root is not None:
        _read_root(private_root, ["private"], True, allow_symlinks, seen, videos, problems, listed, sources)
    return BahDataset(root=root, private_root=private_root, videos=videos, problems=problems, listed=listed,
                      sources=sources)
