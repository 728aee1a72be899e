"""The backends write uncompressed units without the libraries' own write paths (zarr chunk files and HDF5
dataset bytes go straight to disk): the result must be exactly what the libraries would have written."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from extract.record import array_crc32c
from extract.store_backends import ATTR, get_backend
from extract.value_scan import SCAN_BLOCK, ValueScan, all_finite


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"video/last": rng.standard_normal((3, 5, 4)).astype(np.float16),
            "audio/last": rng.standard_normal((7, 4)).astype(np.float32),
            "text_window_lengths": np.arange(3, dtype=np.int64),
            "text/last": np.zeros((0, 4), np.float16)}


def _docs(unit) -> dict[str, dict]:
    return {str(p.relative_to(unit)): json.loads(p.read_text()) for p in sorted(unit.rglob("zarr.json"))}


def test_zarr_unit_matches_what_zarr_python_writes(tmp_path):
    arrays = _arrays()
    get_backend("zarr").write_unit(tmp_path / "direct", lambda _scans: {"k": 1}, arrays, False)
    ref = zarr.open_group(store=LocalStore(tmp_path / "ref"), mode="w", zarr_format=3, attributes={ATTR: {"k": 1}})
    for name, arr in arrays.items():
        doc = json.loads((tmp_path / "direct" / name / "zarr.json").read_text())
        out = ref.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=doc["chunk_grid"]["configuration"]
                               ["chunk_shape"], compressors=None, fill_value=0, chunk_key_encoding=doc[
                                   "chunk_key_encoding"], config={"write_empty_chunks": True})
        out[...] = arr
    assert _docs(tmp_path / "direct") == _docs(tmp_path / "ref")
    files = sorted(str(p.relative_to(tmp_path / "ref")) for p in (tmp_path / "ref").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "direct"))
                           for p in (tmp_path / "direct").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    got = get_backend("zarr").read_arrays(tmp_path / "direct", list(arrays))
    assert all(got[n].dtype == a.dtype and np.array_equal(got[n], a) for n, a in arrays.items())


def test_zarr_unit_in_the_older_nested_layout_still_reads(tmp_path):
    """Units written before chunk files were named `c.0.0.0` hold them as c/0/0/0: zarr follows the metadata."""
    arrays = _arrays()
    group = zarr.open_group(store=LocalStore(tmp_path / "old"), mode="w", zarr_format=3, attributes={ATTR: {"k": 2}})
    for name, arr in arrays.items():
        group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(1, *arr.shape[1:]) if arr.ndim == 3
                           else tuple(max(s, 1) for s in arr.shape), compressors=None, fill_value=0)[...] = arr
    assert (tmp_path / "old" / "video" / "last" / "c" / "2" / "0" / "0").is_file()
    backend = get_backend("zarr")
    got = backend.read_arrays(tmp_path / "old", list(arrays))
    assert backend.read_attrs(tmp_path / "old") == {"k": 2}
    assert all(np.array_equal(got[n], a) for n, a in arrays.items())
    assert np.array_equal(backend.read_window(tmp_path / "old", "video/last", 2), arrays["video/last"][2])


@pytest.mark.parametrize("compress", [False, True])
def test_hdf5_unit_reads_back_exactly(tmp_path, compress):
    arrays = _arrays()
    backend = get_backend("hdf5")
    backend.write_unit(tmp_path / "u.h5", lambda _scans: {"k": 3}, arrays, compress)
    got = backend.read_arrays(tmp_path / "u.h5", list(arrays))
    assert all(got[n].dtype == a.dtype and np.array_equal(got[n], a) for n, a in arrays.items())
    assert backend.read_attrs(tmp_path / "u.h5") == {"k": 3}
    assert np.array_equal(backend.read_window(tmp_path / "u.h5", "video/last", 1), arrays["video/last"][1])
    with h5py.File(tmp_path / "u.h5", "r") as f:
        assert (f["video/last"].chunks is None) == (not compress)


def test_attribute_document_failure_leaves_the_error_not_a_unit_claiming_success(tmp_path):
    """`attrs` runs after the arrays are written; what it raises propagates."""
    def refuse(_scans) -> dict:
        raise ValueError("NaN found")

    for name in ("zarr", "hdf5"):
        backend = get_backend(name)
        with pytest.raises(ValueError, match="NaN found"):
            backend.write_unit(tmp_path / f"u-{name}", refuse, _arrays(), False)
        with pytest.raises((OSError, KeyError)):
            backend.read_attrs(tmp_path / f"u-{name}")


@pytest.mark.parametrize("backend,compress", [("zarr", False), ("zarr", True), ("hdf5", False), ("hdf5", True)])
def test_scans_handed_to_attrs_cover_every_byte_written(tmp_path, backend, compress):
    """Raw writes feed the scans block by block as they write; each must end with the whole array's CRC32C
    and finiteness, also for arrays of several blocks and several chunks, and with a NaN or Inf anywhere."""
    arrays = _arrays()
    rng = np.random.default_rng(4)
    arrays["video/last"] = rng.standard_normal((3, SCAN_BLOCK // 700, 700)).astype(np.float16)  # > 2 blocks
    arrays["video/last"][2, -1, -1] = np.inf
    arrays["audio/last"] = rng.standard_normal((3 * SCAN_BLOCK // 4 + 3, 2)).astype(np.float32)
    arrays["audio/last"][0, 0] = np.nan
    seen = {}

    def attrs(scans):
        seen.update(scans)
        return {"k": 4}

    get_backend(backend).write_unit(tmp_path / "u", attrs, arrays, compress)
    assert set(seen) == set(arrays)
    for name, arr in arrays.items():
        assert seen[name].crc32c == array_crc32c(arr), name
        assert seen[name].finite == bool(np.isfinite(arr).all()), name


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
def test_value_scan_finds_every_nan_and_inf_and_nothing_else(dtype):
    rng = np.random.default_rng(5)
    base = rng.standard_normal(SCAN_BLOCK // 2 + 7).astype(dtype)
    info = np.finfo(np.dtype(dtype))
    base[:4] = [info.max, -info.max, info.tiny, -info.tiny]  # extremes that are finite
    assert all_finite(base) and ValueScan(base.dtype).scan(base).finite
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        for at in (0, SCAN_BLOCK // np.dtype(dtype).itemsize, base.size - 1):
            arr = base.copy()
            arr[at] = bad
            scan = ValueScan(arr.dtype).scan(arr)
            assert not scan.finite and not all_finite(arr), (bad, at)
            assert scan.crc32c == array_crc32c(arr)
    assert all_finite(np.zeros(0, dtype)) and ValueScan(np.dtype(dtype)).scan(np.zeros(0, dtype)).crc32c == "00000000"
