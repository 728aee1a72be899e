"""Where to compute: 'auto' (CUDA when there is one), 'cpu', 'cuda' or 'cuda:N', checked in one line."""
from __future__ import annotations

import torch

from extract.errors import AHError


class DeviceError(AHError):
    """A device name that does not exist, or CUDA asked for on a machine without it."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"--device {device}: not a device name (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine")
    return dev
