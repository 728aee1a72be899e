"""Deterministic window sampling and the transcript spoken during a window.

A window is `length` contiguous frames starting at a drawn start frame. Starts depend only on
(seed, video_id), never on the order or sharding of a run, so every process draws the same windows.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class _Chunk(Protocol):
    """What `window_text` reads from a transcript chunk (extract.bah.TranscriptChunk)."""

    text: str
    start: float
    end: float | None


def window_rng(video_id: str, seed: int) -> np.random.Generator:
    """A generator seeded by (seed, crc32(video_id)): stable across processes and Python runs."""
    return np.random.default_rng([int(seed), zlib.crc32(video_id.encode("utf-8"))])


def window_starts(video_id: str, n_frames: int, count: int, length: int, seed: int) -> list[int]:
    """`count` random start frames of `length`-frame windows in a video of `n_frames` frames.

    Starts are uniform in [0, n_frames - length]; a video shorter than `length` gets start 0 (the clip is
    then padded by repeating its last frame, see `clip_indices`).
    """
    if count < 0 or length < 1:
        raise ValueError(f"window_starts: need count >= 0 and length >= 1, got {count}, {length}")
    last = max(int(n_frames) - int(length), 0)
    draws = window_rng(video_id, seed).integers(0, last + 1, size=int(count))
    return [int(x) for x in draws]


def clip_indices(start: int, length: int, n_frames: int) -> list[int]:
    """Frame indices of the window; past the end the last frame repeats (short videos)."""
    if n_frames < 1:
        raise ValueError("clip_indices: the video has no frames")
    return [min(start + i, n_frames - 1) for i in range(length)]


def is_padded(start: int, length: int, n_frames: int) -> bool:
    """True when the window runs past the last frame (so `clip_indices` repeats it)."""
    return start + length > n_frames


def window_seconds(start: int, length: int, fps: float) -> tuple[float, float]:
    """The time span [start_s, end_s) covered by a window of frames at `fps`."""
    if fps <= 0:
        raise ValueError(f"window_seconds: fps must be > 0, got {fps}")
    return start / fps, (start + length) / fps


def window_text(chunks: Sequence[_Chunk], start_s: float, end_s: float) -> str:
    """The transcript chunks that overlap [start_s, end_s), joined by single spaces.

    A chunk with end None runs to the end of the video. A zero-length chunk counts when its instant lies in
    the window.
    """
    parts = []
    for chunk in chunks:
        c_start = float(chunk.start)
        c_end = float("inf") if chunk.end is None else float(chunk.end)
        if c_end > c_start:
            overlaps = c_start < end_s and c_end > start_s
        else:
            overlaps = start_s <= c_start < end_s
        text = (chunk.text or "").strip()
        if overlaps and text:
            parts.append(text)
    return " ".join(parts)
