"""Multi-window inference: per-window logits of a whole split, window-averaged blended probabilities.

A video's probability is the mean over its first N cached windows of
    p_w = alpha sigmoid(l_text,w) + (1 - alpha) sigmoid(l_full,w)
(the paper averages the probabilities of N random windows; the cached eval windows are random starts,
so the first N of them are such a sample). Videos with fewer cached windows average what they have.

A run with fine-tuned top encoder blocks (checkpoint A, heads/topblocks.py) reads the cached 'prefix'
states through its blocks; when the cache has none, and the run was loaded with `data_root`, its encoders
run on the raw media at the cache's own window starts (heads/finetune.py). `layers_needed(run)` says
which cached layers to load for a run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from heads.data import SplitData
from heads.model import blend


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
    from heads.topblocks import TopBlocksHeads, cached_window_logits

    if isinstance(model, TopBlocksHeads):                 # prefix states through the top blocks
        return cached_window_logits(model, data, windows=windows, text_source=text_source, batch_size=batch_size,
                                    device=device, amp=amp)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    w = data.max_windows if not windows else min(int(windows), data.max_windows)
    n = len(data)
    rows = torch.arange(n, device=data.device).repeat_interleave(w)
    wins = torch.arange(w, device=data.device).repeat(n)
    valid = wins < data.n_windows[rows]
    wins = torch.minimum(wins, data.n_windows[rows] - 1)    # past a video's last window: any real one, masked
    # Audio and the full transcript are the same for all of a video's windows: pooled once per video.
    per_video = [m for m in modalities if m == "audio" or (m == "text" and text_source != "window")]
    per_window = [m for m in modalities if m not in per_video]
    videos_per_batch = max(1, batch_size // w)
    was_training = model.training
    model.eval()
    full, text = [], []
    try:
        for v in range(0, n, videos_per_batch):
            at = slice(v * w, min(n, v + videos_per_batch) * w)
            bw = data.batch(rows[at], wins[at], modalities=per_window, layer=layer, text_source=text_source,
                            device=device)
            bv = data.batch(rows[at][::w], modalities=per_video, layer=layer, text_source=text_source, device=device)
            with autocast(device, amp):
                emb = {m: model.pools[m](t) for m, t in bw.tokens.items()}
                emb |= {m: model.pools[m](t).repeat_interleave(w, 0) for m, t in bv.tokens.items()}
                lf, lt = model.heads(emb)
            full.append(lf.float().cpu())
            if lt is not None:
                text.append(lt.float().cpu())
    finally:
        model.train(was_training)
    shape = (n, w)
    return WindowLogits(torch.cat(full).view(shape), torch.cat(text).view(shape) if text else None,
                        valid.cpu().view(shape))


def layers_needed(run, cache=None) -> tuple[str, ...]:
    """The cached layers to load (heads.data.load_split) for `run`: its heads' layer for a frozen-encoder
    run; 'prefix' for fine-tuned top blocks, or nothing but the metadata when the cache (given here or to
    load_run) has no prefix states and the run runs its encoders on the raw media instead."""
    cfg = run.train_config
    if not getattr(cfg, "unfreeze_top", 0):
        return (cfg.layer,)
    cached = getattr(run, "prefix_cached", None)
    if cache is not None:
        from heads.topblocks import cache_prefix_problem

        cached = cache_prefix_problem(getattr(cache, "spec", None), cfg.unfreeze_top) is None
    if cached is False and getattr(run, "media", None) is not None:
        return ()
    return ("prefix",)


def run_window_logits(run, data: SplitData, windows: int | None = None, batch_size: int = 64,
                      device: str | torch.device | None = None) -> WindowLogits:
    """Per-window logits of a run over a split, whichever kind the run is (see the module doc)."""
    cfg = run.train_config
    model = run.model
    if device is not None:
        model.to(device)
    if getattr(cfg, "unfreeze_top", 0):
        from heads.topblocks import data_has_prefix

        if not data_has_prefix(data, run.model_config.present, cfg.text_source):
            return _raw_window_logits(run, data, windows, batch_size)
    return window_logits(model, data, windows=windows, modalities=run.model_config.present, layer=cfg.layer,
                         text_source=cfg.text_source, batch_size=batch_size, amp=cfg.amp)


def _no_prefix(run, what: str):
    from heads.checkpoint import RunError

    n = run.train_config.unfreeze_top
    return RunError(f"{run.path}: fine-tuned run (top-{n} encoder blocks) but {what} holds no usable 'prefix' "
                    f"states: re-extract the cache with 'prefix' added to the spec's layers and unfreeze_top {n}, "
                    "or pass --data ROOT (the BAH tree) to run its encoders on the raw media")


def require_inputs(run, cache=None) -> None:
    """Raise one clear line when a fine-tuned run can read neither the cache's prefix states nor raw media."""
    if not getattr(run.train_config, "unfreeze_top", 0) or getattr(run, "media", None) is not None:
        return
    if cache is not None:
        from heads.topblocks import cache_prefix_problem

        if cache_prefix_problem(getattr(cache, "spec", None), run.train_config.unfreeze_top) is not None:
            raise _no_prefix(run, f"the cache {getattr(cache, 'path', '')}".rstrip())
    elif getattr(run, "prefix_cached", None) is False:
        raise _no_prefix(run, "the cache")


def _raw_window_logits(run, data: SplitData, windows: int | None, batch_size: int) -> WindowLogits:
    if getattr(run, "media", None) is None:
        raise _no_prefix(run, f"the {data.split!r} data")
    return run.media.window_logits(run.model, data, windows=windows, text_source=run.train_config.text_source,
                                   batch_size=batch_size, amp=run.train_config.amp)


def predict_split(run, data: SplitData, windows: int | None = 5, alpha: float | None = None,
                  device: str | torch.device | None = None,
                  batch_size: int = 64) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(video_ids, window-averaged blended probabilities, labels with NaN for unlabelled) for a split.

    `run` is a heads.checkpoint.Run; `alpha` defaults to the run's alpha (forced to 0 without text).
    A fine-tuned run (top encoder blocks) reads the split's 'prefix' states, or, when it has none and the
    run was loaded with `data_root`, runs its encoders on the raw media at the split's window starts.
    """
    a = run.alpha if alpha is None else float(alpha)
    wl = run_window_logits(run, data, windows=windows, batch_size=batch_size, device=device)
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
