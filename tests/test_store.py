"""The embedding cache: round trips, atomicity, resume, fingerprints, digest, verify, concurrency."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.spec import ExtractionSpec, WindowSpec
from extract.cache_writer import CacheWriter
from extract.files import host
from extract.provenance import provenance
from extract.record import VideoRecord, array_sha256, video_key
from extract.value_scan import all_finite
from extract.store import CacheError, CacheReader
from extract.store_backends import get_backend

BACKENDS = ("zarr", "hdf5")
DTYPES = ("float16", "float32")
IDS = ["Videos/101 a/Visite_1/q1 DESKTOP.mp4", "Videos/102/Visite_1/q2.mp4", "Videos/103/Visite_1/q3.mp4",
       "Videos/104/Visite_1/q4.mp4"]
SPLITS = ["train", "val", "private", "train"]


def make_spec(backend: str = "zarr", dtype: str = "float16", **kw) -> ExtractionSpec:
    return dataclasses.replace(ExtractionSpec(), backend=backend, dtype=dtype, **kw)


def make_record(video_id: str, split: str = "train", seed: int = 0, windows: int = 3) -> VideoRecord:
    """Small, seeded, float32 arrays (the writer casts to the cache dtype)."""
    rng = np.random.default_rng([seed, len(video_id)])
    lengths = rng.integers(0, 4, size=windows).astype(np.int64)
    return VideoRecord(
        video_id=video_id, split=split, label=None if split == "private" else int(rng.integers(0, 2)),
        pid=video_id.split("/")[1], question=int(rng.integers(1, 8)), fps=29.97, frame_count=int(rng.integers(20, 99)),
        duration=float(rng.uniform(1, 9)), window_starts=sorted(rng.integers(0, 50, size=windows).tolist()),
        padded=bool(rng.integers(0, 2)),
        arrays={
            "video/last": rng.standard_normal((windows, 8, 16)).astype(np.float32),
            "audio/last": rng.standard_normal((int(rng.integers(1, 12)), 16)).astype(np.float32),
            "text/last": rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32),
            "text_window/last": rng.standard_normal((int(lengths.sum()), 16)).astype(np.float32),
            "text_window_lengths": lengths,
        },
    )


def records(seed: int = 0) -> list[VideoRecord]:
    return [make_record(v, s, seed + i) for i, (v, s) in enumerate(zip(IDS, SPLITS))]


def fill(path: Path, spec: ExtractionSpec, recs: list[VideoRecord], seal: bool = True) -> CacheWriter:
    w = CacheWriter(path, spec, provenance={"git_commit": "test"})
    for r in recs:
        w.write(r)
    if seal:
        w.seal()
    return w


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def unit_of(cache: Path, video_id: str) -> Path:
    hits = [p for p in (cache / "videos").iterdir() if p.name.startswith(video_key(video_id))]
    assert len(hits) == 1, hits
    return hits[0]


# ------------------------------------------------------------------------------------------ basics

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_exact(tmp_path, backend, dtype):
    recs = records()
    fill(tmp_path / "c", make_spec(backend, dtype), recs)
    r = CacheReader(tmp_path / "c", make_spec(backend, dtype))
    assert r.video_ids() == sorted(IDS)
    assert r.video_ids("train") == sorted([IDS[0], IDS[3]])
    for rec in recs:
        got = r.record(rec.video_id, check=True)
        assert got.meta() == rec.meta()
        assert set(got.arrays) == set(rec.arrays)
        for name, arr in rec.arrays.items():
            want = arr if name == "text_window_lengths" else arr.astype(dtype)
            assert got.arrays[name].dtype == want.dtype
            np.testing.assert_array_equal(got.arrays[name], want)
        np.testing.assert_array_equal(r.window(rec.video_id, "video/last", 1), rec.arrays["video/last"][1].astype(dtype))
    sub = r.record(IDS[1], keys=["audio/last"])
    assert list(sub.arrays) == ["audio/last"]
    assert r.record(IDS[2]).label is None
    with pytest.raises(CacheError, match="no array"):
        r.record(IDS[1], keys=["video/prefix"])
    with pytest.raises(CacheError, match="no complete video"):
        r.record("Videos/none.mp4")


def test_video_key_is_safe_and_distinct():
    ids = ["Videos/1 2/Visite_1/a b.mp4", "Videos/1_2/Visite_1/a_b.mp4", "../../etc/passwd", "..", "Ünï/cödé"]
    keys = [video_key(v) for v in ids]
    assert len(set(keys)) == len(keys)
    for k in keys:
        assert "/" not in k and not k.startswith(".") and " " not in k and k.isascii()


def test_provenance_records_versions_and_commit():
    p = provenance()
    for key in ("python", "torch", "transformers", "zarr", "h5py", "numpy", "git_commit"):
        assert p[key], key
    assert p["zarr"].startswith("3.")
    assert p["git_commit"] == "unknown" or len(p["git_commit"]) == 40


def test_manifest_holds_spec_and_provenance(tmp_path):
    spec = make_spec("hdf5")
    CacheWriter(tmp_path / "c", spec, provenance={"git_commit": "abc"})
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["fingerprint"] == spec.fingerprint() and m["spec"] == spec.to_dict()
    assert (m["backend"], m["dtype"], m["sealed"], m["provenance"]["git_commit"]) == ("hdf5", "float16", False, "abc")


# ------------------------------------------------------------------------------- atomicity, resume

@pytest.mark.parametrize("backend", BACKENDS)
def test_leftover_tmp_unit_ignored_by_reader_and_cleaned_by_writer(tmp_path, backend):
    spec = make_spec(backend)
    cache = tmp_path / "c"
    fill(cache, spec, records()[:1], seal=False)
    be = get_backend(backend)
    rec = records()[1]
    # A writer killed mid-unit leaves a temporary unit (here: complete bytes, never renamed).
    dead = cache / "videos" / f".tmp.{dead_pid()}.{host()}.deadbeef.{video_key(rec.video_id)}{be.suffix}"
    be.write_unit(dead, lambda _scans: {"meta": rec.meta()}, {"video/last": rec.arrays["video/last"]}, False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = cache / "videos" / f".tmp.{sleeper.pid}.{host()}.cafe0000.x{be.suffix}"
        alive.mkdir()
        r = CacheReader(cache)
        assert r.video_ids() == [IDS[0]] and r.verify() == []
        w = CacheWriter(cache, spec, provenance={})
        assert not dead.exists(), "a dead writer's temporary unit must be removed"
        assert alive.exists(), "a running writer's temporary unit must be left alone"
        assert not w.is_complete(rec.video_id) and w.is_complete(IDS[0])
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_complete_only_for_units_that_load(tmp_path, backend):
    cache = tmp_path / "c"
    w = fill(cache, make_spec(backend), records()[:2], seal=False)
    assert w.is_complete(IDS[0]) and not w.is_complete(IDS[2])
    unit = unit_of(cache, IDS[0])
    victim = unit if unit.is_file() else unit / "video" / "last" / "c.0.0.0"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert not w.is_complete(IDS[0])
    # The cheap check trusts the rename and metadata (a truncated HDF5 file loses even that); the default does not.
    assert w.is_complete(IDS[0], deep=False) == (backend == "zarr")
    w.write(records()[0])  # re-extraction replaces the broken unit
    assert w.is_complete(IDS[0])
    assert not [p for p in (cache / "videos").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill9_during_writes_then_resume_gives_identical_digest(tmp_path, backend):
    spec = make_spec(backend)
    clean = tmp_path / "clean"
    fill(clean, spec, big_records())
    want = CacheReader(clean).digest()
    cache = tmp_path / "c"
    landed = 0  # kills that left a temporary unit behind, i.e. that hit the inside of a write
    # Kill while writing the 2nd, 5th, ... video, at different moments inside the write.
    for target, delay in ((1, 0.0), (4, 0.01), (7, 0.03), (10, 0.002)):
        proc = _start_writer(cache, backend)
        for line in proc.stdout:
            if int(line) >= target:
                break
        time.sleep(delay)
        landed += _kill_and_check(proc, cache)
    # Timing alone is not reliable under load (a write may finish before the signal): kill further writers
    # as soon as their temporary unit appears, until one kill has landed inside a write (bounded).
    for _ in range(MAX_EXTRA_KILLS):
        if landed:
            break
        proc = _start_writer(cache, backend)
        if _wait_for_tmp_unit(cache, proc, timeout=30.0):
            landed += _kill_and_check(proc, cache)
        else:  # the writer finished (nothing left to write): the bound below reports it
            proc.wait()
            break
    assert landed > 0, "no kill landed inside a write: the test did not exercise atomicity"
    w = CacheWriter(cache, spec, provenance={})
    for rec in big_records():
        if not w.is_complete(rec.video_id):
            w.write(rec)
    w.seal()
    r = CacheReader(cache)
    assert r.digest() == want and r.verify() == []
    assert not [p for p in (cache / "videos").iterdir() if p.name.startswith(".")]


MAX_EXTRA_KILLS = 20


def _start_writer(cache: Path, backend: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, str(cache), backend],
                            stdout=subprocess.PIPE, text=True)


def _own_tmp_units(cache: Path, pid: int) -> list[Path]:
    """Temporary units of the writer `pid` (leftovers of earlier, dead writers do not count)."""
    folder = cache / "videos"
    return [p for p in folder.iterdir() if p.name.startswith(f".tmp.{pid}.")] if folder.is_dir() else []


def _wait_for_tmp_unit(cache: Path, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _own_tmp_units(cache, proc.pid):
            return True
    return False


def _kill_and_check(proc: subprocess.Popen, cache: Path) -> int:
    """SIGKILL the writer; 1 when it died inside a write (its temporary unit is left), else 0."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert CacheReader(cache).verify() == [], "a reader must never see a half-written video"
    return int(bool(_own_tmp_units(cache, proc.pid)))


def big_records() -> list[VideoRecord]:
    out = []
    for i in range(12):
        rec = make_record(f"Videos/{i}/Visite_1/q.mp4", "train", i)
        rec.arrays["video/last"] = np.random.default_rng(i).standard_normal((3, 400, 768), dtype=np.float32)
        out.append(rec)
    return out


_WRITER_SCRIPT = """
import sys
sys.path.insert(0, %r)
from test_store import big_records, make_spec
from extract.cache_writer import CacheWriter
w = CacheWriter(sys.argv[1], make_spec(sys.argv[2]), provenance={})
for i, rec in enumerate(big_records()):
    if not w.is_complete(rec.video_id):
        print(i, flush=True)
        w.write(rec)
""" % str(Path(__file__).parent)


# ------------------------------------------------------------------------------- fingerprint

def test_fingerprint_mismatch_names_fields_and_force_starts_over(tmp_path):
    cache = tmp_path / "c"
    fill(cache, make_spec(), records()[:2])
    other = make_spec(windows=WindowSpec(eval=3), seed=7)
    with pytest.raises(CacheError) as exc:
        CacheWriter(cache, other, provenance={})
    msg = str(exc.value)
    assert "windows.eval" in msg and "seed" in msg and "--force" in msg and "\n" not in msg
    with pytest.raises(CacheError, match="windows.eval"):
        CacheReader(cache, other)
    with pytest.raises(CacheError, match="does not match"):
        CacheReader(cache, other.fingerprint())
    with pytest.raises(CacheError, match="backend"):
        CacheWriter(cache, make_spec("hdf5"), provenance={})
    CacheWriter(cache, other, provenance={}, force=True)
    r = CacheReader(cache, other)
    assert r.video_ids() == [] and not r.sealed and not (cache / "index.json").exists()


def test_same_fingerprint_resumes_and_compress_does_not_change_it(tmp_path):
    cache = tmp_path / "c"
    fill(cache, make_spec(), records()[:2], seal=False)
    w = CacheWriter(cache, make_spec(compress=True), provenance={})
    w.write(records()[2])
    r = CacheReader(cache, make_spec())
    assert r.video_ids() == sorted(IDS[:3]) and r.verify() == []


def test_not_a_cache_is_one_clear_line(tmp_path):
    with pytest.raises(CacheError, match="not a cache"):
        CacheReader(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(CacheError, match="not a cache"):
        CacheReader(tmp_path / "d")
    with pytest.raises(CacheError, match="refusing"):
        CacheWriter(tmp_path / "d", make_spec(), provenance={}, force=True)
    assert (tmp_path / "d" / "photo.jpg").exists()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json"):
        CacheReader(tmp_path / "e")


# ----------------------------------------------------------------------------- writes refused

@pytest.mark.parametrize("change, match", [
    (lambda r: r.arrays.__setitem__("text_window_lengths", r.arrays["text_window_lengths"] + 1), "sum to"),
    (lambda r: r.window_starts.append(99), "window starts"),
    (lambda r: r.arrays.pop("audio/last"), "missing array"),
    (lambda r: r.arrays.__setitem__("extra", np.zeros((1, 2), np.float32)), "unexpected array"),
    (lambda r: r.arrays["audio/last"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda r: r.arrays["text/last"].__setitem__((0, 0), 1e6), "NaN or Inf"),  # fp16 overflow
    (lambda r: r.arrays.__setitem__("audio/last", np.zeros((3, 16), np.int32)), "float"),
])
def test_writer_refuses_inconsistent_records(tmp_path, change, match):
    w = CacheWriter(tmp_path / "c", make_spec(), provenance={})
    rec = records()[0]
    change(rec)
    with pytest.raises(CacheError, match=match):
        w.write(rec)
    assert CacheReader(tmp_path / "c").video_ids() == []
    assert not list((tmp_path / "c" / "videos").iterdir())


# -------------------------------------------------------------------------- errors and sealing

def test_errors_recorded_cleared_and_sealed(tmp_path):
    cache = tmp_path / "c"
    w = CacheWriter(cache, make_spec(), provenance={})
    w.record_error(IDS[0], "train", "Videos/101 a/...: mp4 unreadable")
    w.record_error(IDS[1], "val", "no faces")
    w.write(records()[0])  # a successful rerun clears the error
    w.clear_error(IDS[1])
    w.record_error(IDS[2], "private", "no audio")
    w.write(records()[3])
    w.seal()
    r = CacheReader(cache)
    assert r.errors() == [{"video_id": IDS[2], "split": "private", "message": "no audio"}]
    info = r.info()
    assert info["sealed"] and info["complete"] == 2 and info["errors"] == 1
    assert info["splits"]["train"]["videos"] == 2 and info["bytes"] > 0
    index = json.loads((cache / "index.json").read_text())
    assert [v["video_id"] for v in index["videos"]] == sorted([IDS[0], IDS[3]])
    # A write after seal makes the index stale: the cache is unsealed until sealed again.
    w2 = CacheWriter(cache, make_spec(), provenance={})
    w2.write(records()[1])
    assert not CacheReader(cache).sealed and not (cache / "index.json").exists()
    assert CacheReader(cache).video_ids() == sorted([IDS[0], IDS[1], IDS[3]])


def test_crash_states_around_seal_recover(tmp_path):
    """kill -9 inside seal() or inside the unseal of a later write leaves states the next run repairs."""
    cache = tmp_path / "c"
    w = fill(cache, make_spec(), records()[:2])
    manifest = json.loads((cache / "manifest.json").read_text())
    # Killed after index.json was written but before the manifest was marked sealed.
    (cache / "manifest.json").write_text(json.dumps({**manifest, "sealed": False}))
    r = CacheReader(cache)
    assert not r.sealed and r.verify() == []
    w.seal()
    assert CacheReader(cache).sealed
    # Killed inside the unseal of a later write: manifest unsealed, old index still there.
    (cache / "manifest.json").write_text(json.dumps({**manifest, "sealed": False}))
    w2 = CacheWriter(cache, make_spec(), provenance={})
    w2.write(records()[2])
    assert not (cache / "index.json").exists()
    w2.seal()
    r = CacheReader(cache)
    assert r.sealed and r.verify() == [] and r.video_ids() == sorted(IDS[:3])


# ------------------------------------------------------------------------------------- digest

@pytest.mark.parametrize("dtype", DTYPES)
def test_digest_equal_across_backends_and_stable(tmp_path, dtype):
    recs = records()
    fill(tmp_path / "z", make_spec("zarr", dtype), recs)
    fill(tmp_path / "h", make_spec("hdf5", dtype), list(reversed(recs)), seal=False)
    z, h = CacheReader(tmp_path / "z"), CacheReader(tmp_path / "h")
    assert z.digest() == h.digest() == z.digest(deep=False) == h.info()["digest"]
    changed = records()
    changed[1].label = 1 - changed[1].label
    fill(tmp_path / "z2", make_spec("zarr", dtype), changed)
    assert CacheReader(tmp_path / "z2").digest() != z.digest()
    nudged = records()
    nudged[0].arrays["video/last"][0, 0, 0] += 1.0
    fill(tmp_path / "z3", make_spec("zarr", dtype), nudged)
    assert CacheReader(tmp_path / "z3").digest() != z.digest()


# ------------------------------------------------------------------------------------- verify

def _flip_byte(unit: Path, backend: str) -> None:
    """Flip one byte inside window 1 of video/last (the data, not the container's bookkeeping)."""
    if backend == "zarr":
        path, offset = unit / "video" / "last" / "c.1.0.0", 7
    else:
        with h5py.File(unit, "r") as f:
            ds = f["video/last"]
            if ds.chunks:       # compressed units and older caches: one chunk per window
                offset = ds.id.get_chunk_info(1).byte_offset + 7
            else:               # uncompressed: one contiguous block, window 1 right after window 0
                offset = ds.id.get_offset() + ds[0].nbytes + 7
        path = unit
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _set_attr_meta(unit: Path, backend: str, edit) -> None:
    if backend == "zarr":
        doc = json.loads((unit / "zarr.json").read_text())
        edit(doc["attributes"]["ah"])
        (unit / "zarr.json").write_text(json.dumps(doc))
    else:
        with h5py.File(unit, "r+") as f:
            attrs = json.loads(f.attrs["ah"])
            edit(attrs)
            f.attrs["ah"] = json.dumps(attrs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_names_each_damaged_video(tmp_path, backend):
    cache = tmp_path / "c"
    fill(cache, make_spec(backend), records())
    r = CacheReader(cache)
    assert r.verify() == [] and r.bad_videos() == []
    digest = r.digest()
    _flip_byte(unit_of(cache, IDS[0]), backend)
    _set_attr_meta(unit_of(cache, IDS[1]), backend, lambda a: a["meta"]["window_starts"].pop())
    shutil.rmtree(unit_of(cache, IDS[2])) if backend == "zarr" else unit_of(cache, IDS[2]).unlink()
    problems = CacheReader(cache).verify()
    by_video = {}
    for p in problems:
        by_video.setdefault(p["video_id"], []).append(p["problem"])
    assert set(by_video) == {IDS[0], IDS[1], IDS[2]}
    assert any("checksum mismatch" in p and "video/last" in p for p in by_video[IDS[0]])
    assert any("window starts" in p for p in by_video[IDS[1]])
    assert by_video[IDS[2]] == ["listed in index.json but missing on disk"]
    assert CacheReader(cache).digest() != digest
    assert CacheReader(cache).bad_videos() == sorted([IDS[0], IDS[1], IDS[2]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_catches_truncated_chunk_and_repair_by_discard(tmp_path, backend):
    cache = tmp_path / "c"
    w = fill(cache, make_spec(backend), records())
    unit = unit_of(cache, IDS[3])
    victim = unit if backend == "hdf5" else unit / "text" / "last" / "c.0.0"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size - 5])
    problems = CacheReader(cache).verify()
    assert [p["video_id"] for p in problems] == [IDS[3]]
    assert "unreadable" in problems[0]["problem"]
    with pytest.raises(CacheError, match="unreadable"):
        CacheReader(cache).record(IDS[3])
    # --repair: discard what verify flags, re-extract those only, seal.
    for v in CacheReader(cache).bad_videos():
        assert w.discard(v)
    assert not w.is_complete(IDS[3]) and w.is_complete(IDS[0])
    w.write(records()[3])
    w.seal()
    assert CacheReader(cache).verify() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_catches_nan_and_declared_shape_mismatch(tmp_path, backend):
    """Units written by a faulty writer (bypassing the checks, checksums consistent) are still caught."""
    spec = make_spec(backend)
    cache = tmp_path / "c"
    w = fill(cache, spec, records()[:2], seal=False)
    be = get_backend(backend)
    rec = records()[2]
    arrays = {n: w._cast(n, a) for n, a in rec.arrays.items()}
    arrays["audio/last"][2, 3] = np.nan
    attrs = {"format": 1, "fingerprint": spec.fingerprint(), "meta": rec.meta(),
             "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": array_sha256(a)}
                        for n, a in arrays.items()}}
    be.write_unit(w.unit_path(rec.video_id), lambda _scans: attrs, arrays, False)
    _set_attr_meta(unit_of(cache, IDS[1]), backend, lambda a: a["arrays"]["text/last"].__setitem__("shape", [1, 1]))
    problems = CacheReader(cache).verify()
    assert {p["video_id"] for p in problems} == {IDS[1], IDS[2]}
    assert any("NaN" in p["problem"] for p in problems if p["video_id"] == IDS[2])
    assert any("metadata says" in p["problem"] for p in problems if p["video_id"] == IDS[1])
    assert not w.is_complete(IDS[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_crc32c_units_catch_a_flipped_byte_and_older_sha256_units_still_verify(tmp_path, backend):
    """New units declare a CRC32C per array; a unit written before it (sha256) reads, verifies and hashes
    into the same digest; a flipped byte is caught under either; a declaration with neither is named."""
    recs = records()
    w = fill(tmp_path / "c", make_spec(backend), recs)
    new = CacheReader(tmp_path / "c")
    digest = new.digest()
    attrs = get_backend(backend).read_attrs(unit_of(tmp_path / "c", IDS[0]))
    assert all(set(d) == {"dtype", "shape", "crc32c"} for d in attrs["arrays"].values())
    # Rewrite IDS[0] the way a format-2 writer did: same arrays, sha256 declared.
    unit = unit_of(tmp_path / "c", IDS[0])
    arrays = get_backend(backend).read_arrays(unit, sorted(attrs["arrays"]))
    old = {**attrs, "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": array_sha256(a)}
                               for n, a in arrays.items()}}
    shutil.rmtree(unit) if unit.is_dir() else unit.unlink()
    get_backend(backend).write_unit(unit, lambda _scans: old, arrays, False)
    mixed = CacheReader(tmp_path / "c")
    assert mixed.verify() == [] and w.is_complete(IDS[0])
    assert mixed.digest() == mixed.digest(deep=False) == digest == new.digest(deep=False)
    for video_id in (IDS[0], IDS[3]):                     # the sha256 unit, then a crc32c unit
        _flip_byte(unit_of(tmp_path / "c", video_id), backend)
    problems = CacheReader(tmp_path / "c").verify()
    assert {p["video_id"] for p in problems} == {IDS[0], IDS[3]}
    mismatch = "video/last: checksum mismatch (altered or flipped bytes)"
    assert {p["video_id"] for p in problems if p["problem"] == mismatch} == {IDS[0], IDS[3]}
    _set_attr_meta(unit_of(tmp_path / "c", IDS[1]), backend, lambda a: a["arrays"]["audio/last"].pop("crc32c"))
    problems = [p["problem"] for p in CacheReader(tmp_path / "c").verify() if p["video_id"] == IDS[1]]
    assert problems == ["audio/last: metadata declares no checksum (known: crc32c, sha256)"]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_all_finite_finds_every_nan_and_inf_and_passes_extremes(dtype):
    x = np.random.default_rng(0).standard_normal(2_100_000).astype(dtype)   # past one 1M-item slice
    info = np.finfo(dtype)
    x[:4] = [info.max, -info.max, info.tiny, -0.0]
    assert all_finite(x) and all_finite(x.reshape(700, 3000)[:, ::7]) and all_finite(x.byteswap().view(
        x.dtype.newbyteorder()))
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, 1_048_575, 1_048_576, len(x) - 1):
            y = x.copy()
            y[at] = bad
            assert not all_finite(y), (bad, at)
    assert all_finite(np.zeros(0, dtype)) and all_finite(np.arange(5))


# -------------------------------------------------------------------------------- concurrency

def _rank_main(cache: str, backend: str, rank: int, world: int) -> None:
    w = CacheWriter(cache, make_spec(backend), provenance={"rank": rank})
    for i, rec in enumerate(records()):
        if i % world == rank:
            w.write(rec)
    w.record_error(f"Videos/bad{rank}/x.mp4", "train", "broken")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_write_one_cache_then_seal(tmp_path, backend):
    fill(tmp_path / "single", make_spec(backend), records())
    cache = str(tmp_path / "multi")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(cache, backend, rank, 2)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    CacheWriter(cache, make_spec(backend), provenance={}).seal()
    r = CacheReader(cache)
    assert r.sealed and r.verify() == [] and len(r.errors()) == 2
    assert r.digest() == CacheReader(tmp_path / "single").digest()
