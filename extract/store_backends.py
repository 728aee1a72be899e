"""The two on-disk formats of one cached video ("unit"): a Zarr v3 group directory or one HDF5 file.

A unit holds named arrays ('video/last', 'text_window_lengths', ...) and one JSON attribute document
(`ATTR`). Backends only move bytes: naming, atomicity and integrity live in extract/store.py. A unit is
always written under a temporary name by the caller and renamed into place, so `write_unit` may assume it
owns `path` outright.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from extract.faults import fault_point
from extract.files import fsync_path, fsync_tree, write_all
from extract.value_scan import ValueScan, scan_arrays
from extract.zarr_raw import CHUNK_KEYS, group_doc, raw_layout, read_raw, write_json, write_raw, writes_raw

ATTR = "ah"  # the single attribute holding the unit's JSON document
# The attribute document, made from the arrays' scans (checksum, NaN/Inf): it may raise to refuse the unit.
Attrs = Callable[[dict[str, ValueScan]], dict[str, Any]]


class Backend(Protocol):
    name: str
    suffix: str

    def write_unit(self, path: Path, attrs: Attrs, arrays: dict[str, np.ndarray], compress: bool) -> None:
        """Write all arrays, then the attribute document `attrs(scans)`, to `path` (which does not exist yet),
        durably. `scans[name]` has been fed every byte of that array (while writing it, or from memory for
        arrays a library writes); what `attrs` raises, write_unit raises."""

    def read_attrs(self, path: Path) -> dict[str, Any]:
        """The unit's attribute document, without touching the arrays."""

    def read_arrays(self, path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named arrays as numpy (stored dtype). KeyError for a name the unit lacks."""

    def read_window(self, path: Path, name: str, index: int) -> np.ndarray:
        """Row `index` of the first axis of one array (one video window), reading only that chunk."""

    def list_units(self, folder: Path) -> dict[str, Path]:
        """key -> path of every unit in `folder` with this backend's suffix; names starting with '.' are
        temporary or trash and never listed."""

    def copy_unit(self, src: Path, dst: Path, attrs: dict[str, Any]) -> None:
        """A durable copy of unit `src` at `dst` (which does not exist yet) with another attribute document."""


def _chunks(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """One chunk per video window (cheap single-window reads); one chunk for everything else."""
    if not shape:
        return ()
    if name.startswith("video/") and len(shape) == 3:
        return (1, max(shape[1], 1), max(shape[2], 1))
    return tuple(max(s, 1) for s in shape)


def _list(folder: Path, suffix: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    out = {}
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.name.endswith(suffix):
            continue
        out[entry.name[: -len(suffix)]] = Path(entry.path)
    return out


class ZarrBackend:
    name = "zarr"
    suffix = ".zarr"

    def write_unit(self, path: Path, attrs: Attrs, arrays: dict[str, np.ndarray], compress: bool) -> None:
        if writes_raw(arrays, compress):
            scans = write_raw(path, {name: _chunks(name, a.shape) for name, a in arrays.items()}, arrays)
        else:
            from zarr.core.sync import sync

            sync(self._write(path, arrays, compress))
            scans = scan_arrays(arrays)
        write_json(path / "zarr.json", group_doc({ATTR: attrs(scans)}))  # last: it needs the scans
        fsync_tree(path)                # all files at once: about one journal commit per unit

    async def _write(self, path: Path, arrays: dict[str, np.ndarray], compress: bool) -> None:
        """The arrays through zarr-python (compressed ones), all at once on its event loop."""
        import zarr.api.asynchronous as azarr
        from zarr.storage import LocalStore

        group = await azarr.open_group(store=LocalStore(path), mode="w", zarr_format=3)
        await asyncio.gather(*(group.require_group(p) for p in sorted({n.rpartition("/")[0] for n in arrays} - {""})))

        async def write_array(name: str, arr: np.ndarray) -> None:
            # write_empty_chunks: every chunk file exists, so a deleted chunk is a visible fault, not zeros.
            out = await group.create_array(
                name, shape=arr.shape, dtype=arr.dtype, chunks=_chunks(name, arr.shape),
                compressors="auto" if compress else None, fill_value=0, chunk_key_encoding=CHUNK_KEYS,
                config={"write_empty_chunks": True},
            )
            if arr.size:
                await out.setitem(Ellipsis, arr)
            fault_point("unit_array")

        await asyncio.gather(*(write_array(n, a) for n, a in arrays.items()))

    def _open(self, path: Path):
        import zarr
        from zarr.storage import LocalStore

        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"{path}: no zarr.json")
        return zarr.open_group(store=LocalStore(path, read_only=True), mode="r", zarr_format=3)

    def read_attrs(self, path: Path) -> dict[str, Any]:
        # Plain JSON read: listing a cache must not pay for zarr's machinery per video.
        doc = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        return doc["attributes"][ATTR]

    def copy_unit(self, src: Path, dst: Path, attrs: dict[str, Any]) -> None:
        shutil.copytree(src, dst)
        doc = json.loads((dst / "zarr.json").read_text(encoding="utf-8"))
        doc["attributes"][ATTR] = attrs
        write_json(dst / "zarr.json", doc)
        fsync_tree(dst)

    def read_arrays(self, path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
        layouts = {n: raw_layout(path / n) for n in names}
        group = self._open(path) if None in layouts.values() else None
        return {n: read_raw(path / n, lay) if lay else np.asarray(group[n][...]) for n, lay in layouts.items()}

    def read_window(self, path: Path, name: str, index: int) -> np.ndarray:
        layout = raw_layout(path / name)
        return read_raw(path / name, layout, index) if layout else np.asarray(self._open(path)[name][index])

    def list_units(self, folder: Path) -> dict[str, Path]:
        return _list(folder, self.suffix)


def _write_contiguous(f: Any, path: Path, arrays: dict[str, np.ndarray]) -> dict[str, ValueScan]:
    """Uncompressed arrays as contiguous datasets (one window is one contiguous slice to read). h5py makes
    the datasets, their space allocated at once and never filled; the bytes then go to their offsets with
    `os.pwrite` (`write_all`), which releases the GIL where h5py's writes hold it (two writer threads ran no
    faster than one) and costs no copy. HDF5 writes only its own metadata, outside those ranges, when the file closes."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    placed = [(f.create_dataset(name, shape=arr.shape, dtype=arr.dtype, dcpl=dcpl, fill_time="never").id, arr)
              for name, arr in arrays.items()]
    f.flush()
    scans = {name: ValueScan(arr.dtype) for name, arr in arrays.items()}
    fd = os.open(path, os.O_WRONLY)
    try:
        for (dataset, arr), scan in zip(placed, scans.values()):
            if arr.size:
                write_all(fd, np.ascontiguousarray(arr), dataset.get_offset(), feed=scan.update)
            fault_point("unit_array")
    finally:
        os.close(fd)
    return scans


class HDF5Backend:
    name = "hdf5"
    suffix = ".h5"

    def write_unit(self, path: Path, attrs: Attrs, arrays: dict[str, np.ndarray], compress: bool) -> None:
        import h5py

        with h5py.File(path, "w", locking=False) as f:
            if compress:
                for name, arr in arrays.items():
                    f.create_dataset(name, data=arr, chunks=_chunks(name, arr.shape) if arr.size else None,
                                     compression="gzip" if arr.size else None)
                    fault_point("unit_array")
                scans = scan_arrays(arrays)
            else:
                scans = _write_contiguous(f, path, arrays)
            f.attrs[ATTR] = json.dumps(attrs(scans), sort_keys=True)
        fsync_path(path)

    def read_attrs(self, path: Path) -> dict[str, Any]:
        import h5py

        with h5py.File(path, "r", locking=False) as f:
            return json.loads(f.attrs[ATTR])

    def read_arrays(self, path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
        import h5py

        with h5py.File(path, "r", locking=False) as f:
            return {n: f[n][()] for n in names}

    def read_window(self, path: Path, name: str, index: int) -> np.ndarray:
        import h5py

        with h5py.File(path, "r", locking=False) as f:
            return f[name][index]

    def copy_unit(self, src: Path, dst: Path, attrs: dict[str, Any]) -> None:
        import h5py

        shutil.copyfile(src, dst)
        with h5py.File(dst, "r+", locking=False) as f:
            f.attrs[ATTR] = json.dumps(attrs, sort_keys=True)
        fsync_path(dst)

    def list_units(self, folder: Path) -> dict[str, Path]:
        return _list(folder, self.suffix)


BACKENDS: dict[str, Backend] = {"zarr": ZarrBackend(), "hdf5": HDF5Backend()}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})") from None
