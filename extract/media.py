"""Media decoding with PyAV and Pillow: probe an mp4, read face JPEGs, read mp4 frames, read audio.

Every failure is a `MediaError` whose message names the file, so one bad video never hides the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image

from extract.errors import AHError
from extract.files import regular_file


class MediaError(AHError):
    """A media file that cannot be read (the message names the file and the cause)."""


@dataclass
class MediaInfo:
    fps: float | None
    frames: int | None
    duration: float | None
    has_video: bool
    has_audio: bool
    sample_rate: int | None
    channels: int | None


def _open(mp4: Path) -> av.container.InputContainer:
    mp4 = Path(mp4)
    try:
        if regular_file(mp4, MediaError, "media file") == 0:
            raise MediaError(f"{mp4}: empty file (0 bytes)")
        return av.open(str(mp4), mode="r")
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{mp4}: unreadable media ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def probe(mp4: Path) -> MediaInfo:
    """Container headers only (no full decode): fps, frame count, duration, streams."""
    with _open(mp4) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        fps = frames = None
        duration = container.duration / av.time_base if container.duration else None
        if video is not None:
            rate = video.average_rate or video.base_rate or video.guessed_rate
            fps = float(rate) if rate else None
            frames = int(video.frames) or None
            vdur = _seconds(video.duration, video.time_base)
            if vdur:
                duration = vdur
            if frames is None and fps and duration:
                frames = int(round(duration * fps))
        if duration is None and audio is not None:
            duration = _seconds(audio.duration, audio.time_base)
        return MediaInfo(
            fps=fps,
            frames=frames,
            duration=duration,
            has_video=video is not None,
            has_audio=audio is not None,
            sample_rate=audio.codec_context.sample_rate if audio is not None else None,
            channels=audio.codec_context.channels if audio is not None else None,
        )


def _load_rgb(path: Path, size: int) -> np.ndarray:
    regular_file(path, MediaError, "image")         # a FIFO or a device in place of a frame would block
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated/corrupt data raises here, not later
            rgb = img.convert("RGB")  # greyscale, CMYK, palette -> RGB
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{path}: unreadable image ({_reason(exc)})") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def read_faces(paths: Sequence[Path], size: int) -> np.ndarray:
    """Face JPEGs -> (T, size, size, 3) uint8 RGB, any input mode or size."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _load_rgb(Path(path), size)
    return out


def read_frames(mp4: Path, indices: Sequence[int], size: int) -> np.ndarray:
    """Full mp4 frames at `indices` (0-based decode order, repeats allowed) -> (len, size, size, 3) uint8."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    if wanted[0] < 0:
        raise MediaError(f"{mp4}: negative frame index {wanted[0]}")
    got: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    last = wanted[-1]
    decoded = 0
    with _open(mp4) as container:
        if not container.streams.video:
            raise MediaError(f"{mp4}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for n, frame in enumerate(container.decode(stream)):
                decoded = n + 1
                if n in wanted_set:
                    got[n] = frame.to_ndarray(format="rgb24", width=size, height=size)
                if n >= last:
                    break
        except av.FFmpegError as exc:
            raise MediaError(f"{mp4}: video decode failed at frame {len(got)} ({_reason(exc)})") from exc
    missing = [i for i in wanted if i not in got]
    if missing:
        raise MediaError(f"{mp4}: frame {missing[0]} requested but the video decodes only {decoded} frames")
    return np.stack([got[int(i)] for i in indices])


class _Growing:
    """A float32 buffer filled in place: no per-frame arrays kept alive (each would pin its FFmpeg buffer)."""

    def __init__(self, capacity: int):
        self.buf = np.empty(max(capacity, 1024), dtype=np.float32)
        self.n = 0

    def add(self, samples: np.ndarray) -> None:
        end = self.n + len(samples)
        if end > len(self.buf):
            grown = np.empty(max(end, int(len(self.buf) * 1.5)), dtype=np.float32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n:end] = samples
        self.n = end


def read_audio(mp4: Path, sample_rate: int = 16000) -> np.ndarray:
    """The whole audio track as float32 mono in [-1, 1] at `sample_rate`.

    Resampled by PyAV's AudioResampler (flushed at the end) keeping the channels, then mixed down as the
    mean of the channels: FFmpeg's own stereo->mono matrix adds both channels at -3 dB, which raises a
    centred sound by 3 dB and clips full-scale input. Memory: one output-sized buffer (20 min = 77 MB)."""
    with _open(mp4) as container:
        if not container.streams.audio:
            raise MediaError(f"{mp4}: no audio stream")
        stream = container.streams.audio[0]
        seconds = _seconds(stream.duration, stream.time_base) or (
            container.duration / av.time_base if container.duration else 0.0)
        out = _Growing(int(seconds * sample_rate) + sample_rate)
        resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=sample_rate)

        def take(frames: list) -> None:
            for frame in frames:
                planes = frame.to_ndarray()  # (channels, samples) float32
                out.add(planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0])

        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler run on its own timeline (odd pts in some files)
                take(resampler.resample(frame))
            take(resampler.resample(None))  # flush the samples the resampler still holds
        except (av.FFmpegError, ValueError) as exc:
            raise MediaError(f"{mp4}: audio decode failed ({_reason(exc)})") from exc
    if out.n == 0:
        raise MediaError(f"{mp4}: the audio stream holds no samples")
    wave = out.buf[: out.n]
    np.clip(wave, -1.0, 1.0, out=wave)
    return wave
