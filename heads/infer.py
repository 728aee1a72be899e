"""Multi-window inference: per-window logits of a whole split, window-averaged blended probabilities.

A video's probability is the mean over its first N cached windows of
    p_w = alpha sigmoid(l_text,w) + (1 - alpha) sigmoid(l_full,w)
(the paper averages the probabilities of N random windows; the cached eval windows are random starts,
so the first N of them are such a sample). Videos with fewer cached windows average what they have.

One loop serves every model kind through `model.window_forward`: the frozen-encoder heads read the heads'
layer, a run with fine-tuned top encoder blocks (checkpoint A) the cached 'prefix' states. When a cache has
no prefix states, such a run may carry a `media` object that runs its encoders on the raw media at the
cache's own window starts (ahflows/raw_media.py). `layers_needed(run)` says which cached layers to load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from extract.precision import autocast_context
from extract.store import CacheReader
from extract.vocab import LAST, MODALITIES, PREFIX
from heads.split_data import SplitData
from heads.metrics import bah_metrics
from heads.model import blend
from heads.run_files import RunError, unit_interval
from heads.runs import Run
from heads.topblocks import cache_prefix_problem, data_has_prefix
from heads.uncertainty import bootstrap_intervals


@dataclass
class WindowLogits:
    full: Tensor                 # (N, W) float32, cpu
    text: Tensor | None          # (N, W) or None without a text head
    valid: Tensor                # (N, W) bool: window cached for that video

    def probs(self, alpha: float) -> Tensor:
        """(N,) window-averaged blended probabilities."""
        p = blend(self.full, self.text, alpha)
        return (p * self.valid).sum(1) / self.valid.sum(1).clamp(min=1)


class MediaSource(Protocol):
    """Runs a fine-tuned run's encoders on the raw media of a split (see the module doc)."""

    def window_logits(self, core: torch.nn.Module, data: SplitData, *, windows: int | None, text_source: str,
                      batch_size: int, amp: bool | str) -> WindowLogits: ...


def autocast(device: torch.device, amp: bool | str):
    """Autocast as `amp` says (TrainConfig.amp_mode): True = bf16 on CUDA, False = fp32, or a precision name
    (extract/precision.py); never on the CPU (keeps CPU runs exact and deterministic)."""
    return autocast_context(amp, device)


def per_video_modalities(modalities: Sequence[str], text_source: str) -> list[str]:
    """The modalities that are the same for all of a video's windows: audio, and the full transcript."""
    return [m for m in modalities if m == "audio" or (m == "text" and text_source != "window")]


@torch.no_grad()
def window_logits(
    model: torch.nn.Module,
    data: SplitData,
    *,
    windows: int | None = None,
    modalities: Sequence[str],
    layer: str = LAST,
    text_source: str = "full",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: bool | str = True,
    span: int | None = None,
) -> WindowLogits:
    """Logits of every (video, window) pair for the first `windows` windows (None/0: all cached).
    `model` is anything with `window_forward(tokens, windows, per_video)`; `layer` the cached layer it reads.
    `span` fixes the windows per video (default: from `data`), e.g. for a chunk of a streamed split."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    w = data.max_windows if not windows else min(int(windows), data.max_windows)
    w = w if span is None else int(span)
    n = len(data)
    rows = torch.arange(n, device=data.device).repeat_interleave(w)
    wins = torch.arange(w, device=data.device).repeat(n)
    valid = wins < data.n_windows[rows]
    wins = torch.minimum(wins, data.n_windows[rows] - 1)    # past a video's last window: any real one, masked
    per_video = per_video_modalities(modalities, text_source)
    per_window = [m for m in modalities if m not in per_video]
    videos_per_batch = max(1, batch_size // max(w, 1))
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
                lf, lt = model.window_forward(bw.tokens | bv.tokens, w, per_video)
            full.append(lf.float().cpu())
            if lt is not None:
                text.append(lt.float().cpu())
    finally:
        model.train(was_training)
    shape = (n, w)
    return WindowLogits(torch.cat(full).view(shape), torch.cat(text).view(shape) if text else None,
                        valid.cpu().view(shape))


def layers_needed(run: Run, cache: CacheReader | None = None) -> tuple[str, ...]:
    """The cached layers to load (heads.data.load_split) for `run`: its heads' layer for a frozen-encoder
    run; 'prefix' for fine-tuned top blocks, or nothing but the metadata when the cache (given here or to
    load_run) has no prefix states and the run runs its encoders on the raw media instead."""
    cfg = run.train_config
    if not cfg.unfreeze_top:
        return (cfg.layer,)
    cached = run.prefix_cached
    if cache is not None:
        cached = cache_prefix_problem(cache.spec, cfg.unfreeze_top) is None
    if cached is False and run.media is not None:
        return ()
    return (PREFIX,)


@dataclass
class DataNeeds:
    """What one load of a split must hold so every run can read it."""
    modalities: tuple[str, ...]
    layers: tuple[str, ...]
    text_window: bool


def data_needs(runs: Sequence[Run], reader: CacheReader | None = None) -> DataNeeds:
    """The modalities, layers and window transcripts a split must be loaded with for all of `runs`."""
    mods = {m for r in runs for m in r.model_config.present}
    layers: list[str] = []
    for r in runs:
        layers += [x for x in layers_needed(r, reader) if x not in layers]
    window = any(r.train_config.text_source == "window" and r.model_config.has_text for r in runs)
    return DataNeeds(tuple(m for m in MODALITIES if m in mods), tuple(layers) or (LAST,), window)


def run_window_logits(run: Run, data: SplitData, windows: int | None = None, batch_size: int = 64,
                      device: str | torch.device | None = None) -> WindowLogits:
    """Per-window logits of a run over a split, whichever kind the run is (see the module doc)."""
    cfg = run.train_config
    if device is not None:
        run.model.to(device)
    if cfg.unfreeze_top and not data_has_prefix(data, run.model_config.present, cfg.text_source):
        if run.media is None:
            raise _no_prefix(run, f"the {data.split!r} data")
        return run.media.window_logits(run.model, data, windows=windows, text_source=cfg.text_source,
                                       batch_size=batch_size, amp=cfg.amp_mode)
    return window_logits(run.model, data, windows=windows, modalities=run.model_config.present,
                         layer=cfg.input_layer, text_source=cfg.text_source, batch_size=batch_size,
                         amp=cfg.amp_mode)


def _no_prefix(run: Run, what: str) -> RunError:
    n = run.train_config.unfreeze_top
    return RunError(f"{run.path}: fine-tuned run (top-{n} encoder blocks) but {what} holds no usable 'prefix' "
                    f"states: re-extract the cache with 'prefix' added to the spec's layers and unfreeze_top {n}, "
                    "or pass --data ROOT (the BAH tree) to run its encoders on the raw media")


def require_inputs(run: Run, cache: CacheReader | None = None) -> None:
    """Raise one clear line when a fine-tuned run can read neither the cache's prefix states nor raw media."""
    if not run.train_config.unfreeze_top or run.media is not None:
        return
    if cache is not None:
        if cache_prefix_problem(cache.spec, run.train_config.unfreeze_top) is not None:
            raise _no_prefix(run, f"the cache {cache.path}")
    elif run.prefix_cached is False:
        raise _no_prefix(run, "the cache")


def predict_split(run: Run, data: SplitData, windows: int | None = 5, alpha: float | None = None,
                  device: str | torch.device | None = None,
                  batch_size: int = 64) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(video_ids, window-averaged blended probabilities, labels with NaN for unlabelled) for a split.
    `alpha` defaults to the run's alpha (forced to 0 without text)."""
    a = run.alpha if alpha is None else unit_interval("alpha", alpha)
    wl = run_window_logits(run, data, windows=windows, batch_size=batch_size, device=device)
    probs = wl.probs(a if run.model_config.has_text else 0.0)
    return list(data.video_ids), probs.numpy().astype(np.float64), data.labels.cpu().numpy().astype(np.float64)


def evaluate_split(run: Run, data: SplitData, windows: int | None = 5, alpha: float | None = None,
                   threshold: float | None = None, device: str | torch.device | None = None,
                   groups: Sequence[str] | None = None, calibrated: bool = True) -> dict:
    """Metrics of a run on a labelled split at the run's threshold (or `threshold`); with `groups` (the
    participant of each video, heads.uncertainty.participant_ids) also their bootstrap 95% intervals. A run
    with a calibration.json is scored on its calibrated probabilities at the threshold re-tuned on them
    (unless `calibrated` is False)."""
    ids, probs, labels = predict_split(run, data, windows=windows, alpha=alpha, device=device)
    cal = run.calibration if calibrated else None
    if cal is not None:
        probs = cal.apply(probs)
    default_t = run.threshold if cal is None else cal.threshold
    t = default_t if threshold is None else unit_interval("threshold", threshold)
    keep = ~np.isnan(labels)
    used = data.max_windows if not windows else min(int(windows), data.max_windows)
    a = (run.alpha if alpha is None else float(alpha)) if run.model_config.has_text else 0.0
    out = {"split": data.split, "videos": len(ids), "labelled": int(keep.sum()), "threshold": t,
           "alpha": a, "windows": used, "metrics": None,
           "temperature": None if cal is None else cal.temperature}
    if keep.any():
        out["metrics"] = bah_metrics(labels[keep], probs=probs[keep], threshold=t)
        if groups is not None:
            out["intervals"] = bootstrap_intervals(labels[keep], probs[keep], t,
                                                   [g for g, k in zip(groups, keep) if k])
    return out
