"""Multi-window inference: per-window logits of a whole split, window-averaged blended probabilities.

A video's probability is the mean over its first N cached windows of
    p_w = alpha sigmoid(l_text,w) + (1 - alpha) sigmoid(l_full,w)
(the paper averages the probabilities of N random windows; the cached eval windows are random starts,
so the first N of them are such a sample). Videos with fewer cached windows average what they have.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from heads.data import SplitData
from heads.model import ConflictAwareModel, blend


@dataclass
class WindowLogits:
    full: Tensor                 # (N, W) float32, cpu
    text: Tensor | None          # (N, W) or None without a text head
    valid: Tensor                # (N, W) bool: window cached for that video

    def probs(self, alpha: float) -> Tensor:
        """(N,) window-averaged blended probabilities."""
        p = blend(self.full, self.text, alpha)
        return (p * self.valid).sum(1) / self.valid.sum(1).clamp(min=1)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; never on the CPU (keeps CPU runs exact and deterministic)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def window_logits(
    model: torch.nn.Module,
    data: SplitData,
    *,
    windows: int | None = None,
    modalities: Sequence[str],
    layer: str = "last",
    text_source: str = "full",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: bool = True,
) -> WindowLogits:
    """Logits of every (video, window) pair for the first `windows` windows (None/0: all cached)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    w = data.max_windows if not windows else min(int(windows), data.max_windows)
    n = len(data)
    rows = torch.arange(n, device=data.device).repeat_interleave(w)
    wins = torch.arange(w, device=data.device).repeat(n)
    valid = wins < data.n_windows[rows]
    wins = torch.minimum(wins, data.n_windows[rows] - 1)    # past a video's last window: any real one, masked
    was_training = model.training
    model.eval()
    full, text = [], []
    try:
        for s in range(0, rows.numel(), batch_size):
            b = data.batch(rows[s : s + batch_size], wins[s : s + batch_size], modalities=modalities, layer=layer,
                           text_source=text_source, device=device)
            with autocast(device, amp):
                lf, lt = model(b.tokens)
            full.append(lf.float().cpu())
            if lt is not None:
                text.append(lt.float().cpu())
    finally:
        model.train(was_training)
    shape = (n, w)
    return WindowLogits(torch.cat(full).view(shape), torch.cat(text).view(shape) if text else None,
                        valid.cpu().view(shape))


def predict_split(run, data: SplitData, windows: int | None = 5, alpha: float | None = None,
                  device: str | torch.device | None = None,
                  batch_size: int = 64) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(video_ids, window-averaged blended probabilities, labels with NaN for unlabelled) for a split.

    `run` is a heads.checkpoint.Run; `alpha` defaults to the run's alpha (forced to 0 without text).
    """
    model: ConflictAwareModel = run.model
    if device is not None:
        model.to(device)
    cfg = run.train_config
    a = run.alpha if alpha is None else float(alpha)
    wl = window_logits(model, data, windows=windows, modalities=run.model_config.present, layer=cfg.layer,
                       text_source=cfg.text_source, batch_size=batch_size, amp=cfg.amp)
    probs = wl.probs(a if run.model_config.has_text else 0.0)
    return list(data.video_ids), probs.numpy().astype(np.float64), data.labels.cpu().numpy().astype(np.float64)


def evaluate_split(run, data: SplitData, windows: int | None = 5, alpha: float | None = None,
                   threshold: float | None = None, device: str | torch.device | None = None) -> dict:
    """Metrics of a run on a labelled split at the run's threshold (or `threshold`)."""
    from heads.metrics import bah_metrics

    ids, probs, labels = predict_split(run, data, windows=windows, alpha=alpha, device=device)
    t = run.threshold if threshold is None else float(threshold)
    keep = ~np.isnan(labels)
    used = data.max_windows if not windows else min(int(windows), data.max_windows)
    a = (run.alpha if alpha is None else float(alpha)) if run.model_config.has_text else 0.0
    out = {"split": data.split, "videos": len(ids), "labelled": int(keep.sum()), "threshold": t,
           "alpha": a, "windows": used, "metrics": None}
    if keep.any():
        out["metrics"] = bah_metrics(labels[keep], probs=probs[keep], threshold=t)
    return out
