"""What a cache unit was made from: a signature of one video's inputs, recorded with its unit.

A later `extract` re-encodes a video whose media or transcript changed since its unit was written, and
`cache verify --data` reports such units. Labels and splits are not part of it: a corrected label only
rewrites the unit's metadata (CacheWriter.relabel), without running the encoders again.

Media are compared by file name, size and modification time, not by content: hashing every face crop of BAH
on each resume would cost minutes of I/O. A copy of the tree that does not keep modification times
(`cp` without `-p`) therefore looks changed everywhere; see docs/RELIABILITY.md.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from extract.bah import BahDataset, Video
from extract.record import canonical_json
from extract.store import CacheReader

TEXT, MEDIA = "text", "media"


def _sha256(payload: Any) -> str:
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def _stat(path: Path) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path.name, None, None]
    return [path.name, st.st_size, st.st_mtime_ns]


def input_signature(video: Video, window_texts: bool) -> dict[str, str]:
    """{'text': hash of the transcript (and, when window texts are cached, its timed chunks),
    'media': hash of the mp4's and every face crop's name, size and modification time}."""
    text: dict[str, Any] = {"transcript": video.transcript}
    if window_texts:
        text["chunks"] = [[c.text, c.start, c.end] for c in video.chunks]
    media = [_stat(video.mp4)] + [_stat(p) for p in video.face_frames]
    return {TEXT: _sha256(text), MEDIA: _sha256(media)}


def changed_inputs(recorded: dict[str, Any] | None, now: dict[str, str]) -> list[str]:
    """Which inputs differ from those recorded ([] when the unit records none: written by an older version)."""
    if not isinstance(recorded, dict) or not recorded:
        return []
    return [k for k in sorted(now) if recorded.get(k) != now[k]]


def describe_change(what: list[str]) -> str:
    names = {TEXT: "transcript", MEDIA: "media files (mp4 or face crops: size or modification time)"}
    return "inputs changed since extraction: " + ", ".join(names.get(w, w) for w in what)


def stale_units(reader: CacheReader, dataset: BahDataset) -> list[dict[str, str]]:
    """Units whose inputs, split or label differ from what the tree says now, as verify-style problems."""
    window_texts = bool(reader.spec.get("text", {}).get("window_aligned"))
    cached = set(reader.video_ids())
    out = []
    for v in dataset.videos:
        if v.video_id not in cached:
            continue
        what = changed_inputs(reader.inputs(v.video_id), input_signature(v, window_texts))
        if what:
            out.append({"video_id": v.video_id,
                        "problem": f"{describe_change(what)}; run `ahcli extract` again to re-encode it"})
        meta = reader.meta(v.video_id)
        if (meta["split"], meta["label"]) != (v.split, v.label):
            out.append({"video_id": v.video_id,
                        "problem": f"the split files say {v.split}/{v.label}, the cache says {meta['split']}/"
                                   f"{meta['label']}; run `ahcli extract` again (updates the metadata only)"})
    return out
