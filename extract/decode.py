"""Decoding one video at its windows: the face clips, the audio and the transcript spoken in each window.

Extraction, the end-to-end fine-tuning path and `predict` all decode through `decode_windows`, so a window
is cut the same way wherever it is encoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from extract.media import read_audio, read_faces, read_frames
from extract.spec import ExtractionSpec
from extract.windows import clip_indices, window_text


class MediaFiles(Protocol):
    """Where a video's media lie (a BAH `Video`, or a recording given to `predict`)."""

    mp4: Path
    face_frames: Sequence[Path] | None     # face crops, one per frame; None: cut from the mp4's own frames
    frame_count: int
    fps: float
    chunks: Sequence                       # timed transcript chunks (extract.bah.TranscriptChunk)


@dataclass
class DecodedWindows:
    clips: np.ndarray | None               # (W, T, S, S, 3) uint8
    wave: np.ndarray | None                # float32 mono at the spec's sample rate
    texts: list[str]                       # the words spoken during each window ([] when not asked for)


def decode_windows(media: MediaFiles, starts: Sequence[int], spec: ExtractionSpec, *, video: bool = True,
                   audio: bool = True, texts: bool = False) -> DecodedWindows:
    """Decode `media` at the window `starts` (frame indices); each part only when asked for. Raises the
    media readers' errors (extract.media.MediaError) naming the file."""
    length, n = spec.windows.frames, media.frame_count
    clips = None
    if video:
        needed = sorted({i for s in starts for i in clip_indices(s, length, n)})
        if media.face_frames is not None:
            frames = read_faces([media.face_frames[i] for i in needed], spec.video.size)
        else:
            frames = read_frames(media.mp4, needed, spec.video.size)
        pos = {frame: k for k, frame in enumerate(needed)}
        clips = np.stack([frames[[pos[i] for i in clip_indices(s, length, n)]] for s in starts])
    wave = read_audio(media.mp4, spec.audio.sample_rate) if audio else None
    said = [window_text(media.chunks, s / media.fps, (s + length) / media.fps) for s in starts] if texts else []
    return DecodedWindows(clips, wave, said)
