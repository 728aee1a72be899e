"""The Zarr v3 layout of uncompressed arrays, written and read without zarr-python.

An uncompressed array's chunk file is its C-order bytes (the `bytes` codec, little-endian), so writing and
reading one needs only a file write or read. zarr-python's own path costs far more than the bytes on the
2-core box: ~40 ms to write a BAH video (metadata through its event loop, several copies of every chunk)
where the bytes take ~10 ms, and ~1.5 ms per read call (8 calls per streamed video). What is written here is
exactly what zarr-python writes (tests/test_direct_writes.py compares files and metadata), and any array
outside this layout (compressed, big-endian, sharded, ...) is left to zarr-python by `raw_layout`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.faults import fault_point
from extract.files import write_all
from extract.value_scan import ValueScan

# Chunk files as `c.0.0.0` beside the array's zarr.json: one folder per array, not one per chunk index.
CHUNK_KEYS = {"name": "default", "configuration": {"separator": "."}}
RAW_TYPES = {"float16", "float32", "float64", "int64"}
_BYTES = [{"name": "bytes", "configuration": {"endian": "little"}}]


def array_doc(arr: np.ndarray, chunks: tuple[int, ...]) -> dict[str, Any]:
    """The zarr.json of an uncompressed array, as zarr-python writes it."""
    return {
        "shape": list(arr.shape), "data_type": str(arr.dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": CHUNK_KEYS, "fill_value": 0.0 if arr.dtype.kind == "f" else 0,
        "codecs": _BYTES, "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": [],
    }


def group_doc(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def writes_raw(arrays: dict[str, np.ndarray], compress: bool) -> bool:
    """Whether every array can be stored as its in-memory bytes: uncompressed, little-endian, a known type."""
    return not compress and np.little_endian and all(
        str(a.dtype) in RAW_TYPES and a.dtype.byteorder in "=<" and a.ndim for a in arrays.values())


def write_raw(path: Path, chunks: dict[str, tuple[int, ...]], arrays: dict[str, np.ndarray]) -> dict[str, ValueScan]:
    """The groups and arrays of a unit at `path` (created here), all but the root group's zarr.json (the
    caller writes it last); returns each array's ValueScan, fed its bytes as they were written. Chunks split
    the first axis only, in whole rows (`RawLayout`): each chunk is one contiguous slice of the array,
    written without a copy (`write_all`), and the chunks in order are the array's bytes in order."""
    path.mkdir()
    for group in sorted({n.rpartition("/")[0] for n in arrays} - {""}):
        (path / group).mkdir(parents=True, exist_ok=True)
        write_json(path / group / "zarr.json", group_doc({}))
    scans = {}
    for name, arr in arrays.items():
        rows, *rest = chunks[name]
        if arr.size and (tuple(rest) != arr.shape[1:] or arr.shape[0] % rows):
            raise ValueError(f"{name}: raw chunks {chunks[name]} do not split {arr.shape} into whole rows")
        folder = path / name
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "zarr.json", array_doc(arr, chunks[name]))
        scans[name] = scan = ValueScan(arr.dtype)
        for k in range(arr.shape[0] // rows if arr.size else 0):
            fd = os.open(_chunk_file(folder, k, arr.ndim, "."), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, np.ascontiguousarray(arr[k * rows:(k + 1) * rows]), feed=scan.update)
            finally:
                os.close(fd)
        fault_point("unit_array")
    return scans


@dataclass(frozen=True)
class RawLayout:
    """An array stored raw, chunked along its first axis only (each chunk one contiguous run of rows)."""
    shape: tuple[int, ...]
    rows: int                # rows per chunk
    dtype: np.dtype
    separator: str


def raw_layout(folder: Path) -> RawLayout | None:
    """The layout of the array at `folder` when it is stored raw, else None (read it with zarr-python)."""
    try:
        doc = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
        keys, grid = doc["chunk_key_encoding"], doc["chunk_grid"]
        shape, chunks = tuple(doc["shape"]), tuple(grid["configuration"]["chunk_shape"])
        separator = keys.get("configuration", {}).get("separator", "/")
        raw = (doc.get("node_type") == "array" and doc.get("zarr_format") == 3 and doc["codecs"] == _BYTES
               and not doc.get("storage_transformers") and keys["name"] == "default" and separator in "/."
               and grid["name"] == "regular" and doc["data_type"] in RAW_TYPES and np.little_endian
               and len(shape) == len(chunks) >= 1 and chunks[1:] == shape[1:] and shape[0] % chunks[0] == 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return RawLayout(shape, int(chunks[0]), np.dtype(doc["data_type"]), separator) if raw else None


def read_raw(folder: Path, layout: RawLayout, index: int | None = None) -> np.ndarray:
    """The whole array, or row `index` of its first axis (reading only the chunk that holds it). A missing,
    short or long chunk file raises (zarr-python would read a missing chunk as zeros)."""
    if index is None:
        out = np.empty(layout.shape, layout.dtype)
        for k in range(layout.shape[0] // layout.rows if out.size else 0):
            _read_chunk(_chunk_file(folder, k, len(layout.shape), layout.separator),
                        out[k * layout.rows:(k + 1) * layout.rows])
        return out
    if not -layout.shape[0] <= index < layout.shape[0]:
        raise IndexError(f"{folder}: row {index} of {layout.shape[0]}")
    index %= layout.shape[0]
    chunk = np.empty((layout.rows, *layout.shape[1:]), layout.dtype)
    _read_chunk(_chunk_file(folder, index // layout.rows, len(layout.shape), layout.separator), chunk)
    return chunk[index % layout.rows]


def _chunk_file(folder: Path, k: int, ndim: int, separator: str) -> Path:
    """The file of chunk `k` along the first axis (every other chunk index is 0): e.g. `c.3.0.0`."""
    return folder / separator.join(["c", str(k), *["0"] * (ndim - 1)])


def _read_chunk(path: Path, into: np.ndarray) -> None:
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != into.nbytes:
            raise ValueError(f"{path}: chunk file holds {size} bytes, expected {into.nbytes} (truncated or altered)")
        view = memoryview(into.reshape(-1)).cast("B")
        done = 0
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                raise ValueError(f"{path}: chunk file ended after {done} of {len(view)} bytes")
            done += n
