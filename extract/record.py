"""The cache record layout: one video's metadata and arrays, their names, and every consistency check.

Array names: 'video/<layer>' (W, Lv, Dv); 'audio/<layer>' (La, Da); 'text/<layer>' (Lt, Dt);
'text_window/<layer>' (sum of per-window lengths, Dt) with 'text_window_lengths' (W,) int64; with the
'prefix' layer, 'audio_segments' / 'text_segments' (S,) int64: tokens per encoder segment.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import google_crc32c
import numpy as np

from extract.value_scan import all_finite
from extract.vocab import LAST, PREFIX, SEGMENTS, TOKEN_GROUPS, WINDOW_LENGTHS

META_FIELDS = ("video_id", "split", "label", "pid", "question", "fps", "frame_count", "duration",
               "window_starts", "padded")
LENGTHS = WINDOW_LENGTHS
_PREFIXES = tuple(g + "/" for g in TOKEN_GROUPS)


@dataclass
class VideoRecord:
    video_id: str
    split: str
    label: int | None
    pid: str
    question: int
    fps: float
    frame_count: int
    duration: float
    window_starts: list[int]
    padded: bool
    # 'video/<layer>': (W, Lv, Dv); 'audio/<layer>': (La, Da); 'text/<layer>': (Lt, Dt);
    # 'text_window/<layer>': (sum of per-window lengths, Dt) with 'text_window_lengths': (W,) int64
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # What the unit was made from (extract/inputs.py): kept beside the metadata, not part of the content digest.
    inputs: dict[str, str] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The scalar fields as plain JSON types (numpy scalars converted), the canonical metadata."""
        return {
            "video_id": str(self.video_id),
            "split": str(self.split),
            "label": None if self.label is None else int(self.label),
            "pid": str(self.pid),
            "question": int(self.question),
            "fps": float(self.fps),
            "frame_count": int(self.frame_count),
            "duration": float(self.duration),
            "window_starts": [int(s) for s in self.window_starts],
            "padded": bool(self.padded),
        }



def video_key(video_id: str) -> str:
    """A filesystem-safe, collision-free unit name: readable part of the id plus a short hash."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", video_id.removesuffix(".mp4")).strip("_")[-80:] or "video"
    return f"{safe}-{hashlib.sha256(video_id.encode()).hexdigest()[:12]}"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


def array_crc32c(arr: np.ndarray) -> str:
    """CRC32C of the array's bytes as 8 hex digits: ~15 GB/s per core (hardware CRC) against sha256's ~1.5,
    and it catches every burst error up to 32 bits (any flipped byte); it guards against damage, not tampering."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return f"{google_crc32c.value(flat):08x}"


# Checksums a unit may declare per array: new units declare crc32c (computed while writing,
# extract/value_scan.py); units written before it declare sha256 and still verify.
CHECKSUMS = {"crc32c": array_crc32c, "sha256": array_sha256}


def array_checksum(arr: np.ndarray, algorithm: str) -> str:
    return CHECKSUMS[algorithm](arr)


def declared_checksum(decl: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, value) an array's declaration carries, or None when it carries none this tool knows."""
    return next(((a, decl[a]) for a in CHECKSUMS if isinstance(decl.get(a), str)), None)


def expected_arrays(spec: dict[str, Any]) -> list[str]:
    """The array names every video of a cache made with `spec` (a spec dict) must hold."""
    names = []
    for layer in spec.get("layers", [LAST]):
        names += [f"video/{layer}", f"audio/{layer}", f"text/{layer}"]
        if spec.get("text", {}).get("window_aligned"):
            names.append(f"text_window/{layer}")
    if spec.get("text", {}).get("window_aligned"):
        names.append(LENGTHS)
    if PREFIX in spec.get("layers", [LAST]):
        names += list(SEGMENTS.values())  # exact top-block attention over long audio / text
    return sorted(names)


def check_record(meta: dict[str, Any], arrays: dict[str, np.ndarray], dtype: str,
                 expected: Sequence[str] | None, values: bool = True) -> list[str]:
    """Every way the metadata and arrays of one video can be inconsistent, as short phrases. `values=False`
    leaves out the one check that reads every value (NaN/Inf, see `nonfinite`)."""
    problems = []
    n_windows = len(meta.get("window_starts") or [])
    if n_windows < 1:
        problems.append("no window starts")
    if expected is not None:
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing:
            problems.append(f"missing array(s) {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected array(s) {', '.join(extra)}")
    for name, arr in sorted(arrays.items()):
        if name == LENGTHS:
            if arr.ndim != 1 or arr.dtype != np.int64:
                problems.append(f"{LENGTHS}: expected (W,) int64, got {arr.shape} {arr.dtype}")
            elif len(arr) != n_windows:
                problems.append(f"{LENGTHS}: {len(arr)} entries for {n_windows} windows")
            elif (arr < 0).any():
                problems.append(f"{LENGTHS}: negative length")
            continue
        if name in SEGMENTS.values():
            modality = next(m for m, n in SEGMENTS.items() if n == name)
            rows = next((a.shape[0] for k, a in arrays.items() if k.startswith(modality + "/")), None)
            if arr.ndim != 1 or arr.dtype != np.int64:
                problems.append(f"{name}: expected (S,) int64, got {arr.shape} {arr.dtype}")
            elif rows is not None and int(arr.sum()) != rows:
                problems.append(f"{name}: segments sum to {int(arr.sum())} but {modality} has {rows} tokens")
            continue
        if not name.startswith(_PREFIXES) or name.count("/") != 1:
            problems.append(f"{name}: unknown array name")
            continue
        if arr.dtype != np.dtype(dtype):
            problems.append(f"{name}: dtype {arr.dtype}, cache dtype is {dtype}")
        if name.startswith("video/"):
            if arr.ndim != 3:
                problems.append(f"{name}: expected (W, L, D), got shape {arr.shape}")
            elif arr.shape[0] != n_windows:
                problems.append(f"{name}: {arr.shape[0]} windows but {n_windows} window starts")
        elif arr.ndim != 2:
            problems.append(f"{name}: expected (L, D), got shape {arr.shape}")
        if name.startswith("text_window/") and arr.ndim == 2:
            lengths = arrays.get(LENGTHS)
            if lengths is None:
                problems.append(f"{name}: no {LENGTHS}")
            elif lengths.ndim == 1 and int(lengths.sum()) != arr.shape[0]:
                problems.append(f"{name}: {arr.shape[0]} rows but {LENGTHS} sum to {int(lengths.sum())}")
            full = arrays.get("text/" + name.split("/", 1)[1])
            if full is not None and full.ndim == 2 and full.shape[1] != arr.shape[1]:
                problems.append(f"{name}: width {arr.shape[1]} differs from the full text's {full.shape[1]}")
    return problems + (nonfinite(arrays) if values else [])


def nonfinite(arrays: dict[str, np.ndarray]) -> list[str]:
    return [nonfinite_problem(name) for name, arr in sorted(arrays.items())
            if arr.dtype.kind == "f" and arr.size and not all_finite(arr)]


def nonfinite_problem(name: str) -> str:
    return f"{name}: contains NaN or Inf"


def check_declared(attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[str]:
    """The unit's declared shapes/dtypes/checksums against the bytes actually read."""
    problems = []
    for name, decl in sorted(attrs["arrays"].items()):
        arr = arrays.get(name)
        if arr is None:
            continue
        if list(arr.shape) != list(decl["shape"]) or str(arr.dtype) != decl["dtype"]:
            problems.append(f"{name}: stored as {arr.shape} {arr.dtype}, metadata says "
                            f"{tuple(decl['shape'])} {decl['dtype']}")
        elif (declared := declared_checksum(decl)) is None:
            problems.append(f"{name}: metadata declares no checksum (known: {', '.join(CHECKSUMS)})")
        elif array_checksum(arr, declared[0]) != declared[1]:
            problems.append(f"{name}: checksum mismatch (altered or flipped bytes)")
    return problems
