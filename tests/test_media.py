"""Media decoding: probe, face JPEGs of any mode/size, mp4 frames, audio resampled and mixed down."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.media import MediaError, probe, read_audio, read_faces, read_frames
from helpers_bah import write_jpeg, write_mp4


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("rate,channels", [(44100, 2), (48000, 2), (16000, 1), (22050, 1)])
def test_audio_resampled_and_mixed_down_keeps_tone(tmp_path, rate, channels):
    mp4 = write_mp4(tmp_path / "tone.mp4", seconds=1.0, audio_rate=rate, channels=channels, tone_hz=440.0,
                    amplitude=0.5)
    info = probe(mp4)
    assert (info.sample_rate, info.channels, info.has_audio) == (rate, channels, True)
    wave = read_audio(mp4)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - 1.0) < 0.05  # AAC pads at most one frame
    assert abs(_peak_hz(wave, 16000) - 440.0) < 3.0
    # mixing two equal channels must not change the level (FFmpeg's default matrix would add +3 dB)
    core = wave[2000:14000]
    assert np.sqrt(np.mean(core ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.08)
    assert np.abs(wave).max() <= 1.0


def test_audio_other_rate_and_full_scale_stereo_not_clipped(tmp_path):
    mp4 = write_mp4(tmp_path / "loud.mp4", seconds=0.5, audio_rate=48000, channels=2, tone_hz=1000.0,
                    amplitude=0.8)
    wave = read_audio(mp4, sample_rate=8000)
    assert abs(len(wave) / 8000 - 0.5) < 0.05
    assert abs(_peak_hz(wave, 8000) - 1000.0) < 6.0
    # a -3 dB sum of the two channels would reach 1.13 and be clipped; the mean keeps 0.8
    core = wave[500:3500]
    assert np.sqrt(np.mean(core ** 2)) == pytest.approx(0.8 / np.sqrt(2), rel=0.05)
    assert np.mean(np.abs(core) >= 0.999) < 0.002


def test_probe_reads_headers(tmp_path):
    info = probe(write_mp4(tmp_path / "a.mp4", seconds=0.8, fps=25))
    assert info.has_video and info.has_audio
    assert info.fps == 25.0 and info.frames == 20
    assert info.duration == pytest.approx(0.8, abs=0.05)


def test_zero_byte_and_garbage_mp4(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4: empty file"):
        probe(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not an mp4 at all" * 50)
    with pytest.raises(MediaError, match=r"junk\.mp4: unreadable media"):
        read_audio(junk)
    with pytest.raises(MediaError, match=r"missing\.mp4"):
        probe(tmp_path / "missing.mp4")


def test_no_video_stream_and_no_audio_stream(tmp_path):
    audio_only = write_mp4(tmp_path / "audio_only.mp4", video=False)
    info = probe(audio_only)
    assert not info.has_video and info.fps is None and info.has_audio
    with pytest.raises(MediaError, match=r"audio_only\.mp4: no video stream"):
        read_frames(audio_only, [0], 16)
    silent = write_mp4(tmp_path / "silent.mp4", audio_rate=None)
    assert not probe(silent).has_audio
    with pytest.raises(MediaError, match=r"silent\.mp4: no audio stream"):
        read_audio(silent)


def test_very_short_video(tmp_path):
    mp4 = write_mp4(tmp_path / "short.mp4", seconds=0.2, fps=25)
    info = probe(mp4)
    assert info.frames == 5
    frames = read_frames(mp4, [0, 4, 4], 16)
    assert frames.shape == (3, 16, 16, 3)
    assert len(read_audio(mp4)) > 0
    with pytest.raises(MediaError, match=r"short\.mp4: frame 9 requested but the video decodes only 5 frames"):
        read_frames(mp4, [0, 9], 16)


def test_read_frames_order_and_size(tmp_path):
    mp4 = write_mp4(tmp_path / "v.mp4", seconds=1.0, fps=25, size=32)
    frames = read_frames(mp4, [10, 2, 10], 24)
    assert frames.shape == (3, 24, 24, 3) and frames.dtype == np.uint8
    red = frames[..., 0].mean(axis=(1, 2))  # frame i has red = 8 i
    assert red[0] == pytest.approx(80, abs=8) and red[1] == pytest.approx(16, abs=8) and red[2] == red[0]


def test_faces_of_mixed_sizes_and_modes(tmp_path):
    paths = [
        write_jpeg(tmp_path / "frame-0.jpg", (64, 64), "RGB", (200, 40, 40)),
        write_jpeg(tmp_path / "frame-1.jpg", (100, 80), "RGB", (200, 40, 40)),
        write_jpeg(tmp_path / "frame-2.jpg", (64, 64), "L", (200, 40, 40)),
        write_jpeg(tmp_path / "frame-3.jpg", (48, 48), "CMYK", (200, 40, 40)),
    ]
    faces = read_faces(paths, 32)
    assert faces.shape == (4, 32, 32, 3) and faces.dtype == np.uint8
    for i in (0, 1, 3):
        assert np.allclose(faces[i].mean(axis=(0, 1)), (200, 40, 40), atol=12), i
    grey = faces[2].mean(axis=(0, 1))
    assert np.ptp(grey) < 2 and 80 < grey[0] < 110  # luminance of (200, 40, 40)
    with Image.open(paths[3]) as img:
        assert img.mode == "CMYK"


def test_corrupt_jpeg_in_the_middle_is_named(tmp_path):
    paths = [write_jpeg(tmp_path / f"frame-{i}.jpg") for i in range(5)]
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(MediaError, match=r"frame-2\.jpg: unreadable image"):
        read_faces(paths, 16)
    paths[2].write_bytes(b"\x00garbage")
    with pytest.raises(MediaError, match=r"frame-2\.jpg: unreadable image"):
        read_faces(paths, 16)
    assert read_faces(paths[:2] + paths[3:], 16).shape == (4, 16, 16, 3)


_PEAK_CHILD = """
import sys, numpy as np
from extract.media import read_audio
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak RSS: a forked child starts with its parent's
base = hwm()
w = read_audio(sys.argv[1])
np.save(sys.argv[2], w[:160000])
print(len(w), hwm() - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_twenty_minute_audio_memory_stays_bounded(tmp_path):
    mp4 = write_mp4(tmp_path / "long.mp4", seconds=1200.0, fps=1, size=16, audio_rate=16000, tone_hz=220.0,
                    amplitude=0.3)
    head = tmp_path / "head.npy"
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(mp4), str(head)], capture_output=True,
                         text=True, check=True).stdout.split()
    samples, grown_mb = int(out[0]), int(out[1])
    assert abs(samples / 16000 - 1200.0) < 1.0
    assert grown_mb < 200, f"reading grew the peak memory by {grown_mb} MB for a 77 MB result"
    assert abs(_peak_hz(np.load(head), 16000) - 220.0) < 3.0
