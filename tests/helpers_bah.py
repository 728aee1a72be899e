"""Tiny-tree builders for the BAH reader / media / CLI tests (cached per test session)."""
from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from extract.synth import PRIVATE_SUBDIR, write_synthetic_bah

_CACHE: dict[tuple, tuple[Path, dict]] = {}


def cached_synth(tmp_path_factory, videos: int, seed: int, private: int | None = None) -> tuple[Path, dict]:
    """A synthetic tree written once per session for (videos, seed, private): (OUT folder, generator result)."""
    key = (videos, seed, private)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(f"synth{videos}_{seed}")
        _CACHE[key] = (out, write_synthetic_bah(out, videos, seed, private))
    return _CACHE[key]


def copy_tree(out: Path, dst: Path) -> Path:
    """Copy OUT (data + private) to dst; returns dst/'data'."""
    shutil.copytree(out / "data", dst / "data", symlinks=True)
    if (out / PRIVATE_SUBDIR).exists():
        shutil.copytree(out / PRIVATE_SUBDIR, dst / PRIVATE_SUBDIR, symlinks=True)
    return dst / "data"


def write_mp4(path: Path, seconds: float = 0.5, fps: int = 25, size: int = 32, video: bool = True,
              audio_rate: int | None = 16000, channels: int = 1, tone_hz: float = 440.0,
              amplitude: float = 0.5, codec: str = "libx264") -> Path:
    """A small mp4: solid-colour frames (frame i has red = i * 8) and/or a sine tone in AAC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        vs = None
        if video:
            vs = out.add_stream(codec, rate=fps)
            vs.width = vs.height = size
            vs.pix_fmt = "yuv420p"
        aus = None
        layout = "stereo" if channels == 2 else "mono"
        if audio_rate:
            aus = out.add_stream("aac", rate=audio_rate, layout=layout)
        if vs is not None:
            for i in range(max(1, int(round(seconds * fps)))):
                img = np.zeros((size, size, 3), dtype=np.uint8)
                img[..., 0] = min(255, i * 8)
                img[..., 2] = 100
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                out.mux(vs.encode(frame))
            out.mux(vs.encode(None))
        if aus is not None:
            n = int(round(seconds * audio_rate))
            t = np.arange(n) / audio_rate
            wave = (amplitude * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            data = np.stack([wave] * channels)
            for s in range(0, n, 4096):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, s:s + 4096]), format="fltp",
                                                   layout=layout)
                frame.sample_rate = audio_rate
                frame.pts = s
                frame.time_base = Fraction(1, audio_rate)
                out.mux(aus.encode(frame))
            out.mux(aus.encode(None))
    return path


def write_jpeg(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB", color=(200, 50, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=95)
    return path


def line_of(data: Path, split: str, video_id: str) -> str:
    for line in (data / "split" / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(video_id + ","):
            return line
    raise KeyError(video_id)
