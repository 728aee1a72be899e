"""Throughput of the three full-size encoders (random-initialised: the real architectures' FLOPs)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ahbench.flops import hubert_flops, roberta_flops, videomae_clip_flops
from ahbench.models import full_size_models


@dataclass
class EncoderResult:
    name: str
    unit: str            # what one item is (a 16-frame clip, 27 s of audio, a 512-token transcript)
    items_per_s: float
    tflops: float
    gflop_per_item: float

    def to_dict(self) -> dict:
        return asdict(self)


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, autotuning
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / repeats


def bench_encoders(device: str, quick: bool, clip_batch: int | None = None, audio_seconds: float = 27.0) -> list[EncoderResult]:
    """Items/s and achieved TFLOP/s per encoder, bf16 autocast on CUDA, fp32 on the CPU."""
    cuda = device.startswith("cuda")
    models = full_size_models(device)
    clip_batch = clip_batch or (32 if cuda else 1)
    repeats = (3 if quick else 10) if cuda else 1
    audio_seconds = audio_seconds if cuda or not quick else 5.0
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    clips = torch.randn(clip_batch, 16, 3, 224, 224, device=device)
    wave = torch.randn(1, int(audio_seconds * 16000), device=device)
    text_batch = 16 if cuda else 1
    ids = torch.randint(5, 50000, (text_batch, 512), device=device)
    out = []
    with torch.inference_mode(), amp:
        dt = _time(lambda: models["video"](pixel_values=clips), device, repeats)
        f = videomae_clip_flops()
        out.append(EncoderResult("VideoMAE-B", "16-frame clip", clip_batch / dt, clip_batch * f / dt / 1e12, f / 1e9))
        dt = _time(lambda: models["audio"](wave), device, repeats)
        f = hubert_flops(audio_seconds)
        out.append(EncoderResult("HuBERT-B", f"{audio_seconds:g} s of audio", 1 / dt, f / dt / 1e12, f / 1e9))
        dt = _time(lambda: models["text"](input_ids=ids), device, repeats)
        f = roberta_flops(512)
        out.append(EncoderResult("RoBERTa-B", "512-token transcript", text_batch / dt, text_batch * f / dt / 1e12, f / 1e9))
    return out
