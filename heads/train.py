"""The paper's training protocol over a cached split (section 3.5 and 3.7).

- loss (1 - w) BCE(l_full, y~) + w BCE(l_text, y~), y~ = y (1 - eps) + 0.5 eps, pos_weight = n_neg / n_pos
  of the training labels (w is treated as 0 when the model has no text head);
- AdamW (0.9, 0.999, weight decay 1e-2), lr 3e-5 with cosine annealing to 3e-7 over the optimizer steps of
  the maximum number of epochs; batch 4 with 4-step gradient accumulation (a last, shorter group at the
  end of an epoch is averaged over its own micro-batches). An accumulation group runs as ONE forward pass
  with per-sample loss weights that give exactly the accumulated gradient (see accumulation_weights);
- each epoch, each labelled train video in a seeded random order, with one of its cached train windows
  drawn at random (temporal augmentation);
- after each epoch: the threshold swept in [0.25, 0.75] step 0.01 on the blended (alpha 0.6) validation
  probabilities averaged over the cached eval windows; early stopping on that Macro F1 (patience 15,
  max 60 epochs); the best epoch's weights and threshold are kept. Ties keep the earlier epoch.
Random draws come from generators seeded by (seed, epoch), so an epoch's numbers depend only on the state
at its start: a resumed run continues exactly like an uninterrupted one, from the last checkpoint (written
in a background thread at most every `checkpoint_seconds`, and always after the last or an interrupted
epoch: at the paper's sizes a checkpoint is ~1 GB, slower to write than a GPU epoch). On the CPU everything is
deterministic; on CUDA, bf16 autocast is used (amp) and atomics make the last bits vary.

The loop (`fit`) is shared by every data path through a `Learner`: how an epoch's accumulation groups are
drawn, how a micro-batch becomes logits, and how val is scored. `train_heads` is the cached path (heads
only, or with `unfreeze_top` the top encoder blocks from the cached 'prefix' states, heads/topblocks.py);
ahflows/finetune.py is the end-to-end path from the raw media. Unfrozen encoder blocks get their own
parameter group at lr x encoder_lr_scale (paper: 3e-6 = 3e-5 / 10); the cosine schedule anneals both groups
to lr_min.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extract.devices import resolve_device
from extract.files import atomic_write_json
from extract.host_memory import keep_freed_memory
from extract.locks import folder_lock
from extract.precision import grad_scaler
from extract.vocab import PREFIX
from heads import run_files as rf
from heads.config import ConfigError, ModelConfig, TrainConfig
from heads.infer import WindowLogits, autocast, window_logits
from heads.metrics import bah_metrics, sweep_threshold
from heads.model import build_model
from heads.resume import Checkpointer, SnapshotBuffers, check_out_folder, finalize, prepare_out, restore
from heads.split_data import SplitData
from heads.stream import StreamSplit
from heads.topblocks import TopBlocksHeads, head_model_of, tops_of
from heads.train_state import EpochRecord, TrainingStopped, TrainProgress, TrainResult, TrainState
from heads.uncertainty import bootstrap_intervals, participants_of_cache

# ---- pieces ----------------------------------------------------------------------------------------


def smooth(y: Tensor, eps: float) -> Tensor:
    return y * (1 - eps) + 0.5 * eps


def joint_loss(l_full: Tensor, l_text: Tensor | None, y: Tensor, pos_weight: Tensor, eps: float, w: float,
               reduction: str = "mean") -> Tensor:
    """(1 - w) BCE(l_full, y~) + w BCE(l_text, y~) with pos_weight; BCE(l_full) alone without text."""
    target = smooth(y.float(), eps)
    full = F.binary_cross_entropy_with_logits(l_full.float(), target, pos_weight=pos_weight, reduction=reduction)
    if l_text is None:
        return full
    text = F.binary_cross_entropy_with_logits(l_text.float(), target, pos_weight=pos_weight, reduction=reduction)
    return (1 - w) * full + w * text


def pos_weight_of(labels: Tensor) -> float:
    y = labels[~torch.isnan(labels)]
    n_pos = int((y > 0.5).sum())
    n_neg = int(y.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(f"training labels need both classes (positive {n_pos}, negative {n_neg})")
    return n_neg / n_pos


def pos_weight_for(source: str, train_labels: Tensor, val_labels: Tensor) -> float:
    """The BCE pos_weight: n_neg/n_pos of the train labels, of train + val, or the number given."""
    if source == "train":
        return pos_weight_of(train_labels)
    if source == "train+val":
        return pos_weight_of(torch.cat([train_labels.cpu(), val_labels.cpu()]))
    return float(source)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct 63-bit seed per (seed, epoch, stream), stable across runs and resumes."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def steps_per_epoch(n: int, batch_size: int, accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / accum)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Heads at lr; fine-tuned encoder blocks (a TopBlocksHeads' `tops`) at lr x encoder_lr_scale."""
    tops = tops_of(model)
    if tops is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    top_ids = {id(p) for p in tops.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in top_ids]
    blocks = [p for p in tops.parameters() if p.requires_grad]
    return [{"params": heads, "lr": cfg.lr}, {"params": blocks, "lr": cfg.lr * cfg.encoder_lr_scale}]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of the heads and (checkpoint A) of the unfrozen encoder blocks."""
    tops = tops_of(model)
    return {"heads": sum(p.numel() for p in head_model_of(model).parameters()),
            "encoder_blocks": 0 if tops is None else sum(p.numel() for p in tops.parameters())}


def _optimizer(model: nn.Module, cfg: TrainConfig, n_train: int, device: torch.device):
    """AdamW over the model's parameter groups and the cosine schedule over every step of cfg.epochs."""
    opt = make_optimizer(param_groups(model, cfg), cfg, device)
    total_steps = cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.accum)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=cfg.lr_min)


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)     # one kernel per step, CPU and CUDA
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


# ---- the loop --------------------------------------------------------------------------------------


@dataclass
class Learner:
    """One data path for the protocol loop (`fit`).

    `groups(epoch, g)` yields the epoch's accumulation groups, each a list of micro-batches (objects with a
    `.labels` (B,) tensor), drawn from the generator `g` (seeded per (seed, epoch)): all groups but the last
    hold `batch_size x accum` samples in micro-batches of `batch_size` (a group may also come as ONE
    micro-batch of all its samples: the per-sample weights then give the same gradient). `forward(mb)` gives
    (l_full, l_text); `val_logits(model)` the per-window logits of the val split; `model` is what is trained
    and checkpointed.
    """

    model: nn.Module
    forward: Callable[[Any], tuple[Tensor, Tensor | None]]
    groups: Callable[[int, torch.Generator], Iterable[list[Any]]]
    val_logits: Callable[[nn.Module], WindowLogits]
    train_labels: Tensor                  # (N,) labels of the training samples (pos_weight, step count)
    val_labels: Tensor                    # (N,) val labels, NaN = unlabelled
    val_groups: list[str] | None = None   # (N,) participant of each val video (bootstrap unit); None: the video


def train_heads(
    train: SplitData | StreamSplit,
    val: SplitData | StreamSplit,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    tops: nn.ModuleDict | None = None,
    encoders: dict[str, Any] | None = None,
    **loop: Any,
) -> TrainResult:
    """Train the heads on `train`, select on `val`; with `out`, write a run folder (crash-safe). `loop` takes
    `fit`'s options: resume, stop_after, on_epoch, on_step, cache, extra.

    With cfg.unfreeze_top = n the top n blocks of each encoder (`tops`, with config.json's `encoders` section:
    ahflows.checkpoint_a.cached_tops builds both from the encoders' weights) are trained too, from the
    cached 'prefix' states (the splits must be loaded with layers including 'prefix').
    Either split may be a StreamSplit (heads/stream.py): read from the cache as the epoch goes, same numbers.
    """
    device = resolve_device(cfg.device)
    layer = cfg.input_layer
    if cfg.text_source == "window" and model_cfg.has_text and not train.has_window_text(layer):
        raise ConfigError("text_source 'window': the cache holds no window-aligned transcripts"
                          + (" for the 'prefix' layer" if cfg.unfreeze_top else ""))
    labelled = train.labelled()
    if labelled.numel() == 0:
        raise ConfigError(f"split {train.split!r} has no labelled videos to train on")
    if val.labelled().numel() == 0:
        raise ConfigError(f"split {val.split!r} has no labelled videos to select the epoch on")

    model = build_model(model_cfg, seed=cfg.seed)
    if cfg.unfreeze_top:
        model = _with_tops(model, tops, train, val, cfg)

    def groups(epoch: int, g: torch.Generator):
        order = labelled.cpu()[torch.randperm(labelled.numel(), generator=g)]
        n_win = train.n_windows.cpu()[order]
        windows = (torch.rand(order.numel(), generator=g, dtype=torch.float64) * n_win).long().clamp(max=n_win - 1)
        size = cfg.batch_size * cfg.accum             # a group as ONE forward (see accumulation_weights)
        for batch in train.batches(order, windows, size, modalities=model_cfg.present, layer=layer,
                                   text_source=cfg.text_source, device=device):
            yield [batch]

    def val_logits(m: nn.Module) -> WindowLogits:
        kw = dict(windows=cfg.eval_windows or None, modalities=model_cfg.present, layer=layer,
                  text_source=cfg.text_source, batch_size=cfg.eval_batch_size, device=device, amp=cfg.amp_mode)
        return val.window_logits(m, **kw) if isinstance(val, StreamSplit) else window_logits(m, val, **kw)

    learner = Learner(model, lambda b: model(b.tokens), groups, val_logits, train.labels, val.labels,
                      participants_of_cache(loop.get("cache"), val.video_ids))
    return fit(learner, model_cfg, cfg, out, encoders=encoders, **loop)


def _with_tops(heads: nn.Module, tops: nn.ModuleDict | None, train: SplitData | StreamSplit,
               val: SplitData | StreamSplit, cfg: TrainConfig) -> TopBlocksHeads:
    """The cached fast path's model: the encoders' top blocks + the heads, over the splits' prefix states."""
    if tops is None:
        raise ConfigError(f"--unfreeze-top {cfg.unfreeze_top}: no top encoder blocks given to train")
    for data in (train, val):
        if not all(data.has_layer(m, PREFIX, cfg.text_source) for m in heads.cfg.present):
            raise ConfigError(f"--unfreeze-top: split {data.split!r} was loaded without the 'prefix' layer "
                              "(load it with layers including 'prefix')")
    return TopBlocksHeads(tops, heads)


def fit(
    learner: Learner,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    on_epoch: Callable[[EpochRecord, "TrainProgress"], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    cache: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    encoders: dict[str, Any] | None = None,
    videos: dict[str, Any] | None = None,
) -> TrainResult:
    """The paper's protocol over any data path: epochs, accumulation, cosine schedule, threshold sweep on
    val, early stopping, the best epoch's weights, crash-safe checkpoints and resume (see the module doc).
    `stop_after=k` returns after epoch k's checkpoint (a simulated interruption; resume with resume=True);
    `on_epoch` may raise TrainingStopped to stop the same way (a signal handler's way to stop cleanly).
    `cache` is {fingerprint, path} and `encoders` the "encoders" section (runs with fine-tuned top blocks)
    for config.json; `videos` (videos used / listed per split) goes into metrics.json. The run folder is
    locked for the whole run (extract/locks.py): a second writer is refused in one line."""
    if out is None:
        return _fit(learner, model_cfg, cfg, None, resume, stop_after, on_epoch, on_step, cache, extra, encoders,
                    videos)
    check_out_folder(out, resume)                # refuse before creating anything
    with folder_lock(out, "run folder"):
        return _fit(learner, model_cfg, cfg, Path(out), resume, stop_after, on_epoch, on_step, cache, extra,
                    encoders, videos)


def _fit(learner: Learner, model_cfg: ModelConfig, cfg: TrainConfig, out: Path | None, resume: bool,
         stop_after: int | None, on_epoch, on_step, cache, extra, encoders, videos) -> TrainResult:
    device = resolve_device(cfg.device)
    cache = cache or rf.cache_record()
    n_train = int((~torch.isnan(learner.train_labels)).sum())
    if n_train == 0:
        raise ConfigError("no labelled videos to train on")
    if int((~torch.isnan(learner.val_labels)).sum()) == 0:
        raise ConfigError("no labelled val videos to select the epoch on")
    pw = torch.tensor(pos_weight_for(cfg.pos_weight, learner.train_labels, learner.val_labels), device=device)
    w = cfg.text_weight if model_cfg.has_text else 0.0
    alpha = cfg.alpha if model_cfg.has_text else 0.0

    if device.type == "cpu":
        keep_freed_memory()
    model = learner.model.to(device)
    opt, sched = _optimizer(model, cfg, n_train, device)
    scaler = grad_scaler(cfg.amp_mode, device)      # active for fp16 only; refuses half precision on the CPU
    st = TrainState()
    best_weights: dict[str, Tensor] | None = None
    best_probs: np.ndarray | None = None        # the best epoch's val probabilities (for the intervals)

    config_json = rf.make_config(model_cfg, cfg, cache, extra, encoders=encoders, parameters=parameter_counts(model))
    if out is not None:
        done = prepare_out(out, resume, config_json)
        if done is not None:
            return done
        if resume and (out / rf.STATE_FILE).exists():
            st, best_weights = restore(out, model, opt, sched)
        atomic_write_json(out / rf.CONFIG_FILE, config_json)
        rf.write_history(out / rf.HISTORY_FILE, st.history)     # the checkpoint's epochs; one row per epoch after

    writer = Checkpointer(out) if out is not None else None
    best_bufs = SnapshotBuffers()
    progress = TrainProgress(cfg.epochs, st.epoch)
    stopped_early = st.bad_epochs >= cfg.patience
    interrupted = False
    last_write, written_best = time.perf_counter(), st.best_epoch     # the best file on disk names st's
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            while st.epoch < cfg.epochs and not stopped_early:
                epoch = st.epoch + 1
                t0 = time.perf_counter()
                train_loss = _train_epoch(learner, opt, sched, n_train, cfg, epoch, pw, w, device, on_step, scaler)
                rec, val_metrics, val_probs = _validate(learner.val_logits(model), learner.val_labels, cfg, pw, w,
                                                        alpha, epoch, train_loss, sched.get_last_lr()[0])
                if st.record(rec, val_metrics):
                    best_probs = val_probs
                    if writer is not None:
                        writer.wait()                  # the best buffers may still be being written
                    best_weights = best_bufs.capture(model.state_dict())
                if out is not None:
                    rf.append_history(out / rf.HISTORY_FILE, st.history[-1])
                stopped_early = st.bad_epochs >= cfg.patience
                st.seconds += time.perf_counter() - t0
                progress.epoch = epoch
                progress.best_epoch, progress.best_f1 = st.best_epoch, st.best_f1
                try:
                    if on_epoch is not None:
                        on_epoch(rec, progress)
                except TrainingStopped:
                    interrupted = True
                if stop_after is not None and epoch >= stop_after and epoch < cfg.epochs and not stopped_early:
                    interrupted = True
                last = interrupted or stopped_early or epoch >= cfg.epochs
                if writer is not None and (last or time.perf_counter() - last_write >= cfg.checkpoint_seconds):
                    writer.save(model, opt, sched, st, best_weights if st.best_epoch != written_best else None)
                    last_write, written_best = time.perf_counter(), st.best_epoch
                if interrupted:
                    break
    finally:
        if writer is not None:
            writer.close()

    assert best_weights is not None
    model.load_state_dict(best_weights)
    model.eval()
    history = [EpochRecord(**h) for h in st.history]
    result = TrainResult(model, model_cfg, cfg, st.best_epoch, st.best_threshold, st.best_metrics, history,
                         stopped_early, st.seconds, completed=not interrupted, videos=videos)
    if out is not None and not interrupted:
        result.intervals = {"val": _val_intervals(learner, model, alpha, best_probs, st.best_threshold)}
        finalize(out, result)
    return result


def _val_intervals(learner: Learner, model: nn.Module, alpha: float, probs: np.ndarray | None,
                   threshold: float) -> dict:
    """Participant-bootstrap 95% intervals of the best epoch's labelled val metrics (heads/uncertainty.py)."""
    keep = ~torch.isnan(learner.val_labels.cpu()).numpy()
    if probs is None:                         # best epoch before a resume: score val once more
        probs = learner.val_logits(model).probs(alpha).numpy().astype(np.float64)[keep]
    groups = learner.val_groups or [f"video:{i}" for i in range(len(keep))]
    return bootstrap_intervals(learner.val_labels.cpu().numpy()[keep], probs, threshold,
                               [g for g, k in zip(groups, keep) if k])


def _train_epoch(learner: Learner, opt, sched, n: int, cfg: TrainConfig, epoch: int, pw: Tensor, w: float,
                 device: torch.device, on_step: Callable[[int, int], None] | None,
                 scaler: torch.amp.GradScaler | None = None) -> float:
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 0))
    groups = iter(learner.groups(epoch, g))
    torch.manual_seed(epoch_seed(cfg.seed, epoch, 1))          # dropout
    learner.model.train()
    n_steps = math.ceil(n / (cfg.batch_size * cfg.accum))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for step, group in enumerate(groups):
        k = sum(int(mb.labels.numel()) for mb in group)
        weights = accumulation_weights(k, cfg.batch_size, device)
        at = 0
        for mb in group:
            with autocast(device, cfg.amp_mode):
                l_full, l_text = learner.forward(mb)
            y = mb.labels.to(device)
            per = joint_loss(l_full, l_text, y, pw, cfg.label_smoothing, w, reduction="none")
            loss = (per * weights[at : at + y.numel()]).sum()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            at += y.numel()
            total += per.detach().double().sum()
        if scaler is not None:
            scaler.step(opt)                          # fp16: skips a step whose gradients overflowed
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, n_steps)
    return float(total.item() / n)


def accumulation_weights(k: int, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Per-sample loss weights of one accumulation group of k samples in micro-batches of `batch_size`.

    Accumulating the mean loss of each micro-batch, divided by the number of micro-batches, weighs
    sample i by 1 / (n_micro * size of its micro-batch). The model has no cross-sample operation, so one
    forward pass over the whole group with these weights gives the same gradient as the micro-batches
    run one by one (fewer, larger kernels; only the dropout draws are laid out differently).
    """
    n_micro = math.ceil(k / batch_size)
    sizes = torch.full((n_micro,), batch_size, dtype=torch.float32)
    sizes[-1] = k - batch_size * (n_micro - 1)
    return (1.0 / (n_micro * sizes)).repeat_interleave(sizes.long()).to(device)


def _validate(wl: WindowLogits, val_labels: Tensor, cfg: TrainConfig, pw: Tensor, w: float, alpha: float,
              epoch: int, train_loss: float, lr: float) -> tuple[EpochRecord, dict, np.ndarray]:
    keep = ~torch.isnan(val_labels.cpu())
    y = val_labels.cpu()[keep]
    valid = wl.valid[keep]
    per = joint_loss(wl.full[keep], None if wl.text is None else wl.text[keep],
                     y[:, None].expand_as(valid), pw.cpu(), cfg.label_smoothing, w, reduction="none")
    val_loss = float(((per * valid).sum(1) / valid.sum(1).clamp(min=1)).mean())
    probs = wl.probs(alpha)[keep].numpy().astype(np.float64)
    labels = y.numpy()
    t, _ = sweep_threshold(probs, labels, cfg.threshold_lo, cfg.threshold_hi, cfg.threshold_step)
    m = bah_metrics(labels, probs=probs, threshold=t)
    rec = EpochRecord(epoch, train_loss, val_loss, m["macro_f1"], m["f1_ah"], m["f1_noah"], t, float(lr))
    return rec, m, probs
