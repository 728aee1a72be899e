"""The arithmetic precision of encoder forwards (extraction) and of head / top-block training (`--precision`).

  auto   today's behaviour and the default: bf16 autocast on CUDA, fp32 on the CPU
  bf16   bf16 autocast (CUDA only)
  fp16   fp16 autocast (CUDA only); training also scales the loss (torch.amp.GradScaler), as the paper's
         fp16 training needs to keep small gradients from flushing to zero
  fp32   no autocast anywhere
On the CPU, half-precision autocast gains nothing for these models (and bf16 matmuls are slower on most
CPUs), so asking for bf16 or fp16 explicitly on a CPU device is refused in one line rather than silently
run in fp32; 'auto' stays fp32 there, which keeps CPU runs exact and deterministic. The precision actually
used is recorded: in the cache manifest's provenance (extraction) and in the run's config.json (training).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from extract.errors import AHError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(AHError):
    """A precision that does not exist, or half precision asked for on a device without it."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str | bool, device: torch.device | str) -> str:
    """The precision actually used on `device`: 'bf16', 'fp16' or 'fp32'. `True` (amp on) means 'auto',
    `False` (amp off) 'fp32'."""
    if isinstance(precision, bool):
        precision = "auto" if precision else "fp32"
    check_precision(precision)
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    if precision in HALF and not cuda:
        raise PrecisionError(f"--precision {precision}: half-precision autocast runs on CUDA only; on the CPU use "
                             "--precision fp32 (or auto, which is fp32 there)")
    return precision


def autocast_context(precision: str | bool, device: torch.device | str):
    """torch.autocast for a half precision on CUDA, else a no-op context."""
    used = resolve_precision(precision, device)
    if used in HALF:
        return torch.autocast(device_type="cuda", dtype=HALF[used])
    return nullcontext()


def grad_scaler(precision: str | bool, device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler that is active for fp16 on CUDA only (a disabled one passes everything through)."""
    return torch.amp.GradScaler("cuda", enabled=resolve_precision(precision, device) == "fp16")


__all__ = ["PRECISIONS", "PrecisionError", "check_precision", "resolve_precision", "autocast_context", "grad_scaler"]
