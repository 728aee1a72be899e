"""Whisper's timestamp restarts: chunk times rebuilt on one monotonic timeline, so window-aligned transcripts
take the words actually spoken in each window."""
from __future__ import annotations

import pytest

from extract.transcripts import monotonic_chunks
from extract.windows import window_text


@pytest.mark.parametrize("raw,duration", [
    # the case: a restart at 0.0 right after a chunk that also started at 0.0
    ([("a", 0.0, 30.0), ("b", 0.0, 30.0), ("c", 0.0, 10.0)], 70.0),
    # restarts every ~30 s window, one strictly earlier and one at an equal start
    ([("a", 0.0, 12.0), ("b", 12.0, 29.0), ("c", 0.0, 15.0), ("d", 15.0, 30.0), ("e", 0.0, 5.0)], 64.0),
    ([("a", 0.0, 30.0), ("b", 0.0, 14.0), ("c", 14.0, 30.0), ("d", 0.0, None)], 75.5),
])
def test_chunks_with_equal_start_restarts_cover_the_media_duration(raw, duration):
    """Contiguous chunks whose lengths add up to the duration only when every restart is seen as one."""
    chunks = monotonic_chunks(raw, duration)
    assert all(a.end <= b.start + 1e-9 for a, b in zip(chunks, chunks[1:]))     # one monotonic timeline
    assert sum(c.end - c.start for c in chunks) == pytest.approx(duration)
    assert chunks[-1].end == pytest.approx(duration)


def test_a_window_after_an_equal_start_restart_takes_the_words_spoken_then():
    chunks = monotonic_chunks([("first", 0.0, 30.0), ("second", 0.0, 30.0), ("third", 0.0, 10.0)], 70.0)
    assert [(c.start, c.end) for c in chunks] == [(0.0, 30.0), (30.0, 60.0), (60.0, 70.0)]
    assert window_text(chunks, 62.0, 64.0).strip() == "third"
    assert window_text(chunks, 31.0, 33.0).strip() == "second"
