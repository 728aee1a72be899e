"""Whisper transcripts of BAH (YAML with timed chunks) and the safe YAML loader every BAH file is read with."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from extract.errors import AHError
from extract.files import read_yaml

MAX_TRANSCRIPT_BYTES = 4 * 1024 * 1024  # a Whisper transcript of a 20-minute video is ~30 kB
# A rebuilt timeline may overrun the media a little (Whisper pads its last window); one past twice the
# duration plus a minute belongs to another recording or is garbage.
ABSURD_FACTOR, ABSURD_MARGIN_S = 2.0, 60.0


class BahError(AHError):
    """A file of the tree (metadata, annotations) that cannot be loaded."""


@dataclass(frozen=True)
class TranscriptChunk:
    text: str
    start: float
    end: float | None


# --------------------------------------------------------------------------------------------- YAML
def load_yaml(path: Path, max_bytes: int | None = MAX_TRANSCRIPT_BYTES) -> Any:
    """Parse a YAML file of the tree safely (extract.files.read_yaml); raises BahError naming the file."""
    return read_yaml(path, BahError, "YAML", max_bytes)


def load_big_yaml(path: Path) -> dict:
    if not path.is_file():
        raise BahError(f"{path}: file not found")
    data = load_yaml(path, max_bytes=None)
    if not isinstance(data, dict):
        raise BahError(f"{path}: expected a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------- transcript
def monotonic_chunks(raw: Sequence[tuple[str, float, float | None]], duration: float) -> list[TranscriptChunk]:
    """Rebuild a monotonic timeline: whenever a start does not move forward (Whisper's long-form output
    restarts its timestamps every ~30 s window, and a restart may begin at the very start of the previous
    chunk, e.g. 0.0 after 0.0) the offset grows by the previous chunk's absolute end; a null end becomes the
    next start, or the duration."""
    out: list[TranscriptChunk] = []
    offset = 0.0
    prev_start = None
    prev_abs_end = 0.0
    for i, (text, start, end) in enumerate(raw):
        if prev_start is not None and start <= prev_start:
            offset = prev_abs_end
        abs_start = start + offset
        if end is None:
            if i + 1 < len(raw):
                nxt = raw[i + 1][1]
                abs_end = nxt + offset if nxt > start else abs_start  # next restarts: unknown, zero-length
            else:
                abs_end = max(duration, abs_start)
        else:
            abs_end = max(end + offset, abs_start)
        out.append(TranscriptChunk(text=text, start=abs_start, end=abs_end))
        prev_start = start
        prev_abs_end = abs_end
    return out


def parse_transcript(path: Path, duration: float) -> tuple[str, list[TranscriptChunk]]:
    """Whisper YAML -> (full text, monotonic chunks). Raises BahError naming the file."""
    data = load_yaml(path)
    if data is None:
        return "", []
    if not isinstance(data, dict):
        raise BahError(f"{path}: expected a mapping with 'text' and 'chunks'")
    text = data.get("text") or ""
    chunks = data.get("chunks") or []
    if not isinstance(text, str) or not isinstance(chunks, list):
        raise BahError(f"{path}: 'text' must be a string and 'chunks' a list")
    raw: list[tuple[str, float, float | None]] = []
    for i, chunk in enumerate(chunks):
        try:
            ts = chunk["timestamp"]
            start, end = ts
            raw.append((str(chunk.get("text") or ""), float(start), None if end is None else float(end)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BahError(f"{path}: chunk {i} has no valid (start, end) timestamp") from exc
        if not all(math.isfinite(t) and t >= 0 for t in raw[-1][1:] if t is not None):
            raise BahError(f"{path}: chunk {i} has a negative or non-finite timestamp {ts!r}")
    chunks_out = monotonic_chunks(raw, duration)
    limit = ABSURD_FACTOR * duration + ABSURD_MARGIN_S
    late = next((i for i, c in enumerate(chunks_out) if duration > 0 and (c.end or c.start) > limit), None)
    if late is not None:
        c = chunks_out[late]
        raise BahError(f"{path}: chunk {late} ends at {c.end or c.start:.1f} s on the rebuilt timeline, but the media "
                       f"lasts {duration:.1f} s: the timestamps are not this video's (fix or re-run the transcription)")
    return text.strip(), chunks_out
