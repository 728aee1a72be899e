"""Decoding and cache throughput: JPEG face crops per second per worker, audio seconds per second, and
cache write/read GB/s per backend with BAH-shaped records."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from extract.cache_writer import CacheWriter
from extract.files import fsync_path, tmp_name
from extract.media import read_audio, read_faces
from extract.provenance import provenance
from extract.record import VideoRecord, video_key
from extract.run import WRITE_THREADS
from extract.spec import ExtractionSpec, TextSpec
from extract.store import CacheReader
from extract.synth import FRAME_SIZE, write_mp4


def _face_jpegs(folder: Path, count: int, size: int = 256) -> list[Path]:
    """Smooth face-like images with noise (compress like real crops, unlike pure noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        base = np.stack([yy * 200 + 30, xx * 150 + 50, (1 - yy) * 120 + 60], -1) + rng.normal(0, 12, (size, size, 3))
        path = folder / f"frame-{i}.jpg"
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def bench_decode(quick: bool, size: int = 224) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ahbench-decode-"))
    try:
        paths = _face_jpegs(tmp, 64 if quick else 256)
        read_faces(paths[:4], size)
        t = time.perf_counter()
        read_faces(paths, size)
        jpeg_s = len(paths) / (time.perf_counter() - t)
        seconds = 10.0 if quick else 27.0
        rate = 44100
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
        mp4 = tmp / "audio.mp4"
        frames = np.zeros((int(seconds * 4), FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
        write_mp4(mp4, frames, 4, np.stack([tone, tone]), rate, "mpeg4")
        t = time.perf_counter()
        read_audio(mp4, 16000)
        audio_s = seconds / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"face_jpegs_per_s_per_worker": jpeg_s, "audio_seconds_per_s_per_worker": audio_s, "jpeg_size": 256}


def _bah_record(i: int, windows: int, rng: np.random.Generator) -> VideoRecord:
    arrays = {
        "video/last": rng.standard_normal((windows, 1568, 768), dtype=np.float32).astype(np.float16),
        "audio/last": rng.standard_normal((1350, 768), dtype=np.float32).astype(np.float16),
        "text/last": rng.standard_normal((512, 768), dtype=np.float32).astype(np.float16),
    }
    return VideoRecord(video_id=f"Videos/{10000 + i}/Visite_1/bench_{i}.mp4", split="train", label=i % 2,
                       pid=str(10000 + i), question=1 + i % 7, fps=24.0, frame_count=648, duration=27.0,
                       window_starts=list(range(windows)), padded=False, arrays=arrays)


def _plain_unit(folder: Path, record: VideoRecord) -> Path:
    """The disk's reference: the record's array bytes in one file written front to back, with the cache's
    durability policy per video unit (temporary name, fsync, rename, fsync of the folder)."""
    final = folder / video_key(record.video_id)
    tmp = folder / tmp_name("tmp", final.name)
    with open(tmp, "wb") as fh:
        for _name, arr in sorted(record.arrays.items()):
            fh.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, final)
    fsync_path(folder)
    return final


def _interleaved(plain: Callable[[VideoRecord], Path], cache: Callable[[VideoRecord], Path],
                 records: list[VideoRecord], threads: int) -> tuple[list[float], list[float]]:
    """Seconds of plain and of cache writes per turn of `threads` videos (written concurrently, as
    extraction's writer threads do; one at a time for 1), each turn alternating which goes first: a shared
    disk that speeds up or slows down moves both the same way. Each turn's files are deleted before the
    next, so both sides write into the same recycled page cache: on a virtual machine, memory the host has
    not backed yet makes a write several times slower, whichever side happens to touch it first."""
    spent: tuple[list[float], list[float]] = ([], [])
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for turn, lo in enumerate(range(0, len(records), threads)):
            batch = records[lo:lo + threads]
            written: list[Path] = []
            for which in ((0, 1) if turn % 2 == 0 else (1, 0)):
                write = (plain, cache)[which]
                t = time.perf_counter()
                written += pool.map(write, batch)
                spent[which].append(time.perf_counter() - t)
            for path in written:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return spent


def _cache_unit(writer: CacheWriter, record: VideoRecord) -> Path:
    writer.write(record)
    return writer.unit_path(record.video_id)


def bench_cache(quick: bool, root: Path | None = None, threads: int = WRITE_THREADS) -> dict:
    """Write then read BAH train-shaped videos (8 windows) through each backend; GB/s of array bytes.

    Beside each backend, the disk's speed for the same bytes in the same folder: plain sequential writes,
    one file per video with the same durability (fsync per unit), interleaved with the cache writes (see
    `_interleaved`). Timed one video at a time and with `threads` videos in flight (extraction's writers).
    `ratio`: the median over turns of plain time / cache time for the same videos."""
    count = 24 if quick else 48
    rng = np.random.default_rng(0)
    shapes = [_bah_record(i, 8, rng) for i in range(2)]
    # Distinct videos (ids) sharing two sets of arrays: many units without holding many in memory.
    records = [dataclasses.replace(shapes[i % 2], video_id=f"Videos/{10000 + i}/Visite_1/bench_{i}.mp4")
               for i in range(count)]
    nbytes = sum(a.nbytes for r in records for a in r.arrays.values())
    out: dict = {}
    ratios: dict = {}
    for backend in ("zarr", "hdf5"):
        tmp = Path(tempfile.mkdtemp(prefix=f"ahbench-{backend}-", dir=root))
        try:
            spec = ExtractionSpec(backend=backend, text=TextSpec(window_aligned=False))
            writer = CacheWriter(tmp / "cache", spec, provenance())
            (tmp / "plain").mkdir()
            rate: dict[int, tuple[float, float, float]] = {}
            for mode in (1, threads):
                plain_s, cache_s = _interleaved(partial(_plain_unit, tmp / "plain"), partial(_cache_unit, writer),
                                                records, mode)
                # GB/s over all videos; the ratio is the median turn's (robust to another job's burst)
                turns = float(np.median([p / c for p, c in zip(plain_s, cache_s)]))
                rate[mode] = (nbytes / sum(plain_s) / 1e9, nbytes / sum(cache_s) / 1e9, turns)
            kept = records[:8]
            for r in kept:
                writer.write(r)
            reader = CacheReader(tmp / "cache")
            t = time.perf_counter()
            for r in kept:
                reader.record(r.video_id)
            read_gbps = sum(a.nbytes for r in kept for a in r.arrays.values()) / (time.perf_counter() - t) / 1e9
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        (disk1, gbps1, ratio1), (disk, gbps, ratio) = rate[1], rate[threads]
        out[backend] = {"write_GBps": gbps, "read_GBps": read_gbps, "write_GBps_one_thread": gbps1}
        ratios[backend] = {"ratio": ratio, "cache_GBps": gbps, "disk_GBps": disk, "threads": threads,
                           "ratio_one_thread": ratio1, "cache_GBps_one_thread": gbps1,
                           "disk_GBps_one_thread": disk1, "videos": count, "bytes": nbytes}
    out["write_vs_disk"] = ratios
    return out
