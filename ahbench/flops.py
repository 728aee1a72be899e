"""Analytic FLOP counts of the three encoders and the peak rates they are compared with.

Counted by hand because torch's FlopCounterMode misses fused attention (SDPA) on the CPU and trips on
HuBERT's weight-norm parametrisation. One multiply-add = 2 FLOPs.
"""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), matched on the device name.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.2,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}


def transformer_flops(tokens: int, hidden: int = 768, layers: int = 12, ffn: int = 3072) -> float:
    """Forward FLOPs of an encoder stack on one sequence: QKV/out projections, FFN and attention."""
    linear = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * tokens * tokens * hidden  # QK^T and AV
    return float(layers * (linear + attention))


def videomae_clip_flops(frames: int = 16, size: int = 224, patch: int = 16, tubelet: int = 2, hidden: int = 768,
                        layers: int = 12) -> float:
    tokens = (frames // tubelet) * (size // patch) ** 2
    embed = 2 * tokens * (3 * tubelet * patch * patch) * hidden
    return embed + transformer_flops(tokens, hidden, layers)


def hubert_flops(seconds: float, hidden: int = 768, layers: int = 12) -> float:
    """HuBERT-B on `seconds` of 16 kHz audio: conv feature encoder (512 channels) + transformer at 50 Hz."""
    samples = int(seconds * 16000)
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    flops, length, cin = 0.0, samples, 1
    for k, s in zip(kernels, strides):
        length = (length - k) // s + 1
        flops += 2 * length * k * cin * 512
        cin = 512
    tokens = length
    flops += 2 * tokens * 512 * hidden  # feature projection
    flops += 2 * tokens * 128 * (hidden // 16) * hidden  # grouped positional conv (k=128, 16 groups)
    return flops + transformer_flops(tokens, hidden, layers)


def roberta_flops(tokens: int = 512, hidden: int = 768, layers: int = 12) -> float:
    return transformer_flops(tokens, hidden, layers)


def device_peak_tflops(device: str) -> tuple[float, str]:
    """The peak to compare against: the datasheet bf16 peak on a known GPU, a measured fp32 GEMM rate on the CPU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{name}: datasheet dense bf16 peak"
        return measured_matmul_tflops(device, torch.bfloat16), f"{name}: measured bf16 GEMM (not in the peak table)"
    return measured_matmul_tflops("cpu", torch.float32), "CPU: measured fp32 GEMM rate"


def measured_matmul_tflops(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
