"""Window sampling is deterministic per (seed, video_id); clips pad; window text picks overlapping chunks."""
from __future__ import annotations

import pytest

from extract.windows import clip_indices, is_padded, window_seconds, window_starts, window_text

try:
    from extract.transcripts import TranscriptChunk
except ImportError:  # pragma: no cover - only while bah.py is being written
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class TranscriptChunk:
        text: str
        start: float
        end: float | None


def test_window_starts_deterministic_and_in_range():
    a = window_starts("Videos/1/Visite_1/q1.mp4", 300, 8, 16, seed=0)
    b = window_starts("Videos/1/Visite_1/q1.mp4", 300, 8, 16, seed=0)
    assert a == b and len(a) == 8
    assert all(isinstance(x, int) and 0 <= x <= 300 - 16 for x in a)
    # Other videos drawn before or after do not change a video's windows.
    window_starts("Videos/2/Visite_1/q2.mp4", 500, 8, 16, seed=0)
    assert window_starts("Videos/1/Visite_1/q1.mp4", 300, 8, 16, seed=0) == a


def test_window_starts_depend_on_seed_and_id():
    base = window_starts("Videos/1/Visite_1/q1.mp4", 10_000, 8, 16, seed=0)
    assert window_starts("Videos/1/Visite_1/q1.mp4", 10_000, 8, 16, seed=1) != base
    assert window_starts("Videos/1/Visite_1/q2.mp4", 10_000, 8, 16, seed=0) != base


def test_window_starts_cover_the_range():
    starts = window_starts("v", 20, 400, 16, seed=3)
    assert set(starts) == set(range(0, 5))  # every start 0..4 is reachable, nothing beyond


def test_short_video_starts_at_zero_and_pads():
    assert window_starts("v", 5, 3, 16, seed=0) == [0, 0, 0]
    assert clip_indices(0, 16, 5) == [0, 1, 2, 3, 4] + [4] * 11
    assert is_padded(0, 16, 5) and not is_padded(4, 16, 20)
    assert clip_indices(4, 4, 100) == [4, 5, 6, 7]
    with pytest.raises(ValueError):
        clip_indices(0, 16, 0)


def test_window_seconds():
    assert window_seconds(30, 16, 30.0) == pytest.approx((1.0, 46 / 30))


def test_window_text_overlap():
    chunks = [
        TranscriptChunk(" I am fine. ", 0.0, 2.0),
        TranscriptChunk("Maybe not", 2.0, 4.5),
        TranscriptChunk("", 4.5, 5.0),
        TranscriptChunk("I don't know", 5.0, None),  # open end: runs to the end of the video
    ]
    assert window_text(chunks, 0.5, 1.5) == "I am fine."
    assert window_text(chunks, 1.9, 2.1) == "I am fine. Maybe not"
    assert window_text(chunks, 2.0, 3.0) == "Maybe not"  # [0, 2) does not overlap [2, 3)
    assert window_text(chunks, 4.6, 4.9) == ""
    assert window_text(chunks, 100.0, 101.0) == "I don't know"
    assert window_text([], 0.0, 1.0) == ""
    assert window_text([TranscriptChunk("uh", 3.0, 3.0)], 2.0, 4.0) == "uh"  # an instant inside the window
