"""Decoding and cache throughput: JPEG face crops per second per worker, audio seconds per second, and
cache write/read GB/s per backend with BAH-shaped records."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from extract.cache_writer import CacheWriter
from extract.media import read_audio, read_faces
from extract.provenance import provenance
from extract.record import VideoRecord
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


def bench_cache(quick: bool, root: Path | None = None) -> dict:
    """Write then read BAH train-shaped videos (8 windows) through each backend; GB/s of array bytes."""
    count = 4 if quick else 16
    rng = np.random.default_rng(0)
    records = [_bah_record(i, 8, rng) for i in range(count)]
    nbytes = sum(a.nbytes for r in records for a in r.arrays.values())
    out = {}
    for backend in ("zarr", "hdf5"):
        tmp = Path(tempfile.mkdtemp(prefix=f"ahbench-{backend}-", dir=root))
        try:
            spec = ExtractionSpec(backend=backend, text=TextSpec(window_aligned=False))
            writer = CacheWriter(tmp / "cache", spec, provenance())
            t = time.perf_counter()
            for r in records:
                writer.write(r)
            write_s = time.perf_counter() - t
            reader = CacheReader(tmp / "cache")
            t = time.perf_counter()
            for r in records:
                reader.record(r.video_id)
            read_s = time.perf_counter() - t
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out[backend] = {"write_GBps": nbytes / write_s / 1e9, "read_GBps": nbytes / read_s / 1e9}
    return out
