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
heads/finetune.py is the end-to-end path from the raw media. Unfrozen encoder blocks get their own
parameter group at lr x encoder_lr_scale (paper: 3e-6 = 3e-5 / 10); the cosine schedule anneals both groups
to lr_min.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads import checkpoint as ckpt
from heads.data import TEXT_SOURCES, SplitData, resolve_device
from heads.host_memory import keep_freed_memory
from heads.infer import WindowLogits, autocast, window_logits
from heads.metrics import bah_metrics, sweep_threshold
from heads.model import ConfigError, ConflictAwareModel, ModelConfig, build_model, dataclass_from_dict


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 60                 # maximum epochs
    patience: int = 15               # epochs without a better val Macro F1 before stopping
    lr: float = 3e-5
    lr_min: float = 3e-7             # cosine annealing floor
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    batch_size: int = 4              # micro-batch size
    accum: int = 4                   # micro-batches per optimizer step (run together as one forward)
    text_weight: float = 0.5         # w in the joint loss
    label_smoothing: float = 0.0     # eps; the paper's checkpoint B uses 0.1
    alpha: float = 0.6               # blend weight of the text head at evaluation
    threshold_lo: float = 0.25
    threshold_hi: float = 0.75
    threshold_step: float = 0.01
    eval_windows: int = 0            # eval windows averaged on val; 0 = all cached
    text_source: str = "full"        # 'full' transcript or 'window'-aligned transcript
    layer: str = "last"              # cached layer the heads read
    amp: bool = True                 # bf16 autocast on CUDA (never on the CPU)
    eval_batch_size: int = 64        # (video, window) samples per evaluation forward
    device: str = "auto"             # where to train; not part of a run's identity
    unfreeze_top: int = 0            # top encoder blocks trained too (0: heads only); reads the 'prefix' layer
    encoder_lr_scale: float = 0.1    # their learning rate = lr x this (paper: 3e-6 for lr 3e-5)
    # Least seconds between resume checkpoints (model + optimizer: ~1 GB at the paper's sizes, seconds to
    # write); the last epoch and an interrupted run are always written. 0: after every epoch.
    checkpoint_seconds: float = 60.0

    RUNTIME = ("device", "eval_batch_size", "checkpoint_seconds")   # options a resumed run may change

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"), (self.patience >= 1, "patience must be >= 1"),
            (self.batch_size >= 1 and self.accum >= 1, "batch_size and accum must be >= 1"),
            (self.lr > 0 and 0 <= self.lr_min <= self.lr, "need lr > 0 and 0 <= lr_min <= lr"),
            (0 <= self.text_weight <= 1, "text_weight must lie in [0, 1]"),
            (0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (0 <= self.alpha <= 1, "alpha must lie in [0, 1]"),
            (0 <= self.threshold_lo <= self.threshold_hi <= 1 and self.threshold_step > 0,
             "thresholds: need 0 <= lo <= hi <= 1 and step > 0"),
            (self.text_source in TEXT_SOURCES, f"text_source must be one of {', '.join(TEXT_SOURCES)}"),
            (self.eval_windows >= 0, "eval_windows must be >= 0"),
            (self.unfreeze_top >= 0, "unfreeze_top must be >= 0"),
            (self.encoder_lr_scale > 0, "encoder_lr_scale must be > 0"),
            (self.checkpoint_seconds >= 0, "checkpoint_seconds must be >= 0"),
            (self.unfreeze_top == 0 or self.layer == "last",
             "with unfreeze_top the heads read the top blocks' output: layer must be 'last'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in self.RUNTIME:
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> "TrainConfig":
        return dataclass_from_dict(cls, data, where)

    @property
    def input_layer(self) -> str:
        """The cached layer a batch is read from: the heads' layer, or 'prefix' under unfrozen top blocks."""
        return "prefix" if self.unfreeze_top else self.layer


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_macro_f1: float
    val_f1_ah: float
    val_f1_noah: float
    threshold: float
    lr: float


@dataclass
class TrainResult:
    model: nn.Module                      # best epoch's weights, eval mode: ConflictAwareModel, or
                                          # heads.topblocks.TopBlocksHeads with unfrozen top blocks
    model_config: ModelConfig
    train_config: TrainConfig
    best_epoch: int
    threshold: float
    val_metrics: dict[str, Any]
    history: list[EpochRecord]
    stopped_early: bool
    seconds: float
    completed: bool = True                # False when stopped by `stop_after`

    def metrics_record(self) -> dict[str, Any]:
        alpha = self.train_config.alpha if self.model_config.has_text else 0.0
        return {"best_epoch": self.best_epoch, "threshold": self.threshold, "alpha": alpha,
                "windows": self.train_config.eval_windows or None, "epochs_run": len(self.history),
                "stopped_early": self.stopped_early, "val": self.val_metrics, "seconds": round(self.seconds, 3)}


class TrainingStopped(Exception):
    """Raised by a callback to stop training after the current epoch's checkpoint (simulates a crash)."""


@dataclass
class _State:
    """Everything an epoch boundary needs to continue (besides model and optimizer tensors)."""
    epoch: int = 0
    best_epoch: int = 0
    best_f1: float = -1.0
    best_threshold: float = 0.5
    best_metrics: dict = field(default_factory=dict)
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0


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


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct 63-bit seed per (seed, epoch, stream), stable across runs and resumes."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def steps_per_epoch(n: int, batch_size: int, accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / accum)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Heads at lr; fine-tuned encoder blocks (a TopBlocksHeads' `tops`) at lr x encoder_lr_scale."""
    from heads.topblocks import tops_of

    tops = tops_of(model)
    if tops is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    top_ids = {id(p) for p in tops.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in top_ids]
    blocks = [p for p in tops.parameters() if p.requires_grad]
    return [{"params": heads, "lr": cfg.lr}, {"params": blocks, "lr": cfg.lr * cfg.encoder_lr_scale}]


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)     # one kernel per step, CPU and CUDA
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


# ---- optimizer state as safetensors + JSON ---------------------------------------------------------


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's tensors by flat name (device tensors, not copied) and the rest as JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    groups = json.loads(json.dumps(sd["param_groups"], default=list))
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---- snapshots and the checkpoint writer -----------------------------------------------------------


class _Buffers:
    """CPU copies of device tensors, allocated once (pinned for CUDA sources) and refilled in place."""

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}

    def capture(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out, cuda = {}, False
        for k, v in tensors.items():
            v = v.detach()
            buf = self.bufs.get(k)
            if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
                self.bufs[k] = buf
            buf.copy_(v, non_blocking=v.is_cuda)
            cuda |= v.is_cuda
            out[k] = buf
        if cuda:
            torch.cuda.synchronize()
        return out


class _Checkpointer:
    """Writes epoch checkpoints from a background thread, in order, one epoch in flight at a time.
    Before the next snapshot refills the buffers, the previous write is waited for."""

    def __init__(self, out: Path):
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self.pending: Future | None = None
        self.state_bufs = _Buffers()

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()        # re-raises a write error here
            self.pending = None

    def save(self, model, opt, sched, st: "_State", best: dict[str, Tensor] | None) -> None:
        """Snapshot now (training goes on mutating the tensors); write in the thread. `best`, when
        the epoch improved, must stay untouched until the next call (it is the trainer's best copy)."""
        self.wait()
        optim_t, optim_meta = optimizer_tensors(opt)
        tensors = self.state_bufs.capture({f"model/{k}": v for k, v in model.state_dict().items()} | optim_t)
        meta = {"state": asdict(st), "optimizer": optim_meta, "scheduler": sched.state_dict()}
        self.pending = self.pool.submit(_write_epoch, self.out, tensors, meta, best, st.best_epoch)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _best_name(epoch: int) -> str:
    return f"best-e{epoch:03d}.safetensors"


def _write_epoch(out: Path, tensors: dict, meta: dict, best: dict | None, best_epoch: int) -> None:
    if best is not None:
        ckpt.save_tensors(out / _best_name(best_epoch), best, {"epoch": str(best_epoch)})
    ckpt.save_tensors(out / ckpt.STATE_FILE, tensors, {"state": json.dumps(meta)})
    for stale in out.glob("best-e*.safetensors"):         # only after the state that names the new one
        if stale.name != _best_name(best_epoch):
            stale.unlink(missing_ok=True)


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


def train_heads(
    train: SplitData,
    val: SplitData,
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
    encoder_spec: dict[str, Any] | None = None,
) -> TrainResult:
    """Train the heads on `train`, select on `val`; with `out`, write a run folder (crash-safe).

    With cfg.unfreeze_top = n the top n blocks of each encoder are trained too, from the cached 'prefix'
    states (the splits must be loaded with layers including 'prefix'); they start from the encoders' weights,
    loaded from `encoder_spec` (the cache's spec dict; default: the spec of the cache at cache['path']).
    `stop_after=k` returns after epoch k's checkpoint (a simulated interruption; resume with resume=True).
    `on_epoch` may raise TrainingStopped to stop the same way. `cache` is {fingerprint, path} for config.json.
    """
    device = resolve_device(cfg.device)
    cache = cache or ckpt.cache_record()
    layer = cfg.input_layer
    if cfg.text_source == "window" and model_cfg.has_text and layer not in train.text_window:
        raise ConfigError("text_source 'window': the cache holds no window-aligned transcripts"
                          + (" for the 'prefix' layer" if cfg.unfreeze_top else ""))
    labelled = train.labelled()
    if labelled.numel() == 0:
        raise ConfigError(f"split {train.split!r} has no labelled videos to train on")
    if val.labelled().numel() == 0:
        raise ConfigError(f"split {val.split!r} has no labelled videos to select the epoch on")

    model = build_model(model_cfg, seed=cfg.seed)
    encoders = None
    if cfg.unfreeze_top:
        model, encoders = _cached_top_model(model, train, val, model_cfg, cfg, cache, encoder_spec)

    def groups(epoch: int, g: torch.Generator):
        order = labelled.cpu()[torch.randperm(labelled.numel(), generator=g)]
        n_win = train.n_windows.cpu()[order]
        windows = (torch.rand(order.numel(), generator=g, dtype=torch.float64) * n_win).long().clamp(max=n_win - 1)
        order, windows = order.to(train.device), windows.to(train.device)
        size = cfg.batch_size * cfg.accum
        for s in range(0, order.numel(), size):       # a group as ONE forward (see accumulation_weights)
            yield [train.batch(order[s : s + size], windows[s : s + size], modalities=model_cfg.present,
                               layer=layer, text_source=cfg.text_source, device=device)]

    def val_logits(m: nn.Module) -> WindowLogits:
        return window_logits(m, val, windows=cfg.eval_windows or None, modalities=model_cfg.present, layer=layer,
                             text_source=cfg.text_source, batch_size=cfg.eval_batch_size, device=device,
                             amp=cfg.amp)

    learner = Learner(model, lambda b: model(b.tokens), groups, val_logits, train.labels, val.labels)
    return fit(learner, model_cfg, cfg, out, resume=resume, stop_after=stop_after, on_epoch=on_epoch,
               on_step=on_step, cache=cache, extra=extra, encoders=encoders)


def _cached_top_model(heads, train: SplitData, val: SplitData, model_cfg: ModelConfig, cfg: TrainConfig,
                      cache: dict[str, Any], encoder_spec: dict[str, Any] | None):
    """The cached fast path's model: the encoders' top blocks (from their weights) + the heads."""
    from heads import topblocks

    spec = encoder_spec
    if spec is None:
        if not cache.get("path"):
            raise ConfigError("unfreeze_top: give the cache's spec (encoder_spec) to initialise the top blocks")
        from extract.store import CacheReader

        spec = CacheReader(cache["path"]).spec
    problem = topblocks.cache_prefix_problem(spec, cfg.unfreeze_top)
    if problem is not None:
        raise ConfigError(f"--unfreeze-top {cfg.unfreeze_top}: {problem}")
    for data in (train, val):
        if not topblocks.data_has_prefix(data, model_cfg.present, cfg.text_source):
            raise ConfigError(f"--unfreeze-top: split {data.split!r} was loaded without the 'prefix' layer "
                              "(load it with layers including 'prefix')")
    tops, configs = topblocks.initial_tops(spec, model_cfg.present, cfg.unfreeze_top)
    return (topblocks.TopBlocksHeads(tops, heads),
            topblocks.encoders_record(spec, configs, cfg.unfreeze_top, source="cache"))


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
) -> TrainResult:
    """The paper's protocol over any data path: epochs, accumulation, cosine schedule, threshold sweep on
    val, early stopping, the best epoch's weights, crash-safe checkpoints and resume (see the module doc).
    `encoders` is config.json's "encoders" section of a run with fine-tuned top blocks."""
    device = resolve_device(cfg.device)
    out = Path(out) if out is not None else None
    cache = cache or ckpt.cache_record()
    n_train = int((~torch.isnan(learner.train_labels)).sum())
    if n_train == 0:
        raise ConfigError("no labelled videos to train on")
    if int((~torch.isnan(learner.val_labels)).sum()) == 0:
        raise ConfigError("no labelled val videos to select the epoch on")
    pw = torch.tensor(pos_weight_of(learner.train_labels), device=device)
    w = cfg.text_weight if model_cfg.has_text else 0.0
    alpha = cfg.alpha if model_cfg.has_text else 0.0

    if device.type == "cpu":
        keep_freed_memory()
    model = learner.model.to(device)
    opt = make_optimizer(param_groups(model, cfg), cfg, device)
    total_steps = cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.accum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=cfg.lr_min)
    st = _State()
    best_weights: dict[str, Tensor] | None = None

    config_json = ckpt.make_config(model_cfg, cfg, cache, extra, encoders=encoders)
    if out is not None:
        done = _prepare_out(out, resume, config_json)
        if done is not None:
            return done
        if resume and (out / ckpt.STATE_FILE).exists():
            st, best_weights = _restore(out, model, opt, sched)
        ckpt.atomic_write_json(out / ckpt.CONFIG_FILE, config_json)

    writer = _Checkpointer(out) if out is not None else None
    best_bufs = _Buffers()
    progress = TrainProgress(cfg.epochs, st.epoch)
    stopped_early = st.bad_epochs >= cfg.patience
    interrupted = False
    last_write, written_best = time.perf_counter(), st.best_epoch     # the best file on disk names st's
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            while st.epoch < cfg.epochs and not stopped_early:
                epoch = st.epoch + 1
                t0 = time.perf_counter()
                train_loss = _train_epoch(learner, opt, sched, n_train, cfg, epoch, pw, w, device, on_step)
                rec, val_metrics = _validate(learner.val_logits(model), learner.val_labels, cfg, pw, w, alpha,
                                             epoch, train_loss, sched.get_last_lr()[0])
                st.epoch = epoch
                st.history.append(asdict(rec))
                improved = rec.val_macro_f1 > st.best_f1
                if improved:
                    st.best_epoch, st.best_f1, st.best_threshold = epoch, rec.val_macro_f1, rec.threshold
                    st.best_metrics = val_metrics
                    st.bad_epochs = 0
                    if writer is not None:
                        writer.wait()                  # the best buffers may still be being written
                    best_weights = best_bufs.capture(model.state_dict())
                else:
                    st.bad_epochs += 1
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
                         stopped_early, st.seconds, completed=not interrupted)
    if out is not None and not interrupted:
        _finalize(out, result)
    return result


@dataclass
class TrainProgress:
    epochs: int
    epoch: int
    best_epoch: int = 0
    best_f1: float = -1.0


def _train_epoch(learner: Learner, opt, sched, n: int, cfg: TrainConfig, epoch: int, pw: Tensor, w: float,
                 device: torch.device, on_step: Callable[[int, int], None] | None) -> float:
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
            with autocast(device, cfg.amp):
                l_full, l_text = learner.forward(mb)
            y = mb.labels.to(device)
            per = joint_loss(l_full, l_text, y, pw, cfg.label_smoothing, w, reduction="none")
            (per * weights[at : at + y.numel()]).sum().backward()
            at += y.numel()
            total += per.detach().double().sum()
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
              epoch: int, train_loss: float, lr: float) -> tuple[EpochRecord, dict]:
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
    return rec, m


# ---- run folder plumbing ---------------------------------------------------------------------------


def check_out_folder(out: str | Path, resume: bool) -> None:
    """Refuse (one line) to train into a folder that already holds a run unless resuming it."""
    out = Path(out)
    if not resume and ((out / ckpt.STATE_FILE).exists() or (out / ckpt.METRICS_FILE).exists()):
        raise ckpt.RunError(f"{out}: already holds a run; pass --resume to continue it or choose another folder")


def _prepare_out(out: Path, resume: bool, config_json: dict) -> TrainResult | None:
    """Create `out`; refuse to overwrite a run; with resume, check it is the same run (options and cache).
    Returns the result of a run that is already finished, else None (train or continue)."""
    check_out_folder(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp-*"):                      # half-written files of a killed run
        tmp.unlink(missing_ok=True)
    has_state = (out / ckpt.STATE_FILE).exists()
    finished = (out / ckpt.METRICS_FILE).exists()
    if (has_state or finished) and resume:
        old = ckpt.read_config(out)
        for section in ("model", "train"):
            a, b = dict(old[section]), dict(config_json[section])
            if section == "train":
                a = {**_train_defaults(), **a}           # a run written before an option existed
                for k in TrainConfig.RUNTIME:
                    a.pop(k, None), b.pop(k, None)
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ckpt.RunError(f"{out}: --resume with different {section} options ({', '.join(diff)})")
        fp_old, fp_new = (old.get("cache") or {}).get("fingerprint"), config_json["cache"].get("fingerprint")
        if fp_old != fp_new:
            raise ckpt.RunError(f"{out}: --resume on another cache (fingerprint {fp_old} vs {fp_new})")
    if finished and resume:
        return _load_finished(out)
    return None


def _train_defaults() -> dict[str, Any]:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _load_finished(out: Path) -> TrainResult:
    run = ckpt.load_run(out)
    hist = [EpochRecord(**h) for h in ckpt.read_history(out / ckpt.HISTORY_FILE)]
    m = run.metrics
    for stale in [out / ckpt.STATE_FILE, *out.glob("best-e*.safetensors")]:   # leftovers of a kill after finish
        stale.unlink(missing_ok=True)
    return TrainResult(run.model, run.model_config, run.train_config, int(m["best_epoch"]), float(m["threshold"]),
                       m["val"], hist, bool(m["stopped_early"]), float(m.get("seconds", 0.0)))


def _restore(out: Path, model, opt, sched) -> tuple[_State, dict[str, Tensor]]:
    tensors, meta = ckpt.load_tensors(out / ckpt.STATE_FILE)
    try:
        blob = json.loads(meta["state"])
        st = _State(**blob["state"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ckpt.RunError(f"{out / ckpt.STATE_FILE}: not a training state ({exc})") from exc
    model_t = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    ckpt.load_weights(model, model_t, str(out / ckpt.STATE_FILE))
    optimizer_from_flat(opt, tensors, blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    best_path = out / _best_name(st.best_epoch)
    if not best_path.exists():
        raise ckpt.RunError(f"{out}: {best_path.name} is missing; the training state cannot be resumed")
    best, _ = ckpt.load_tensors(best_path)
    return st, best


def _finalize(out: Path, result: TrainResult) -> None:
    from heads.topblocks import TOPS_FILE, head_model_of, save_tops, tops_of

    ckpt.save_model(out / ckpt.MODEL_FILE, head_model_of(result.model), {"epoch": str(result.best_epoch)})
    if tops_of(result.model) is not None:                # fine-tuned encoder blocks beside the heads
        save_tops(out / TOPS_FILE, tops_of(result.model))
    ckpt.write_history(out / ckpt.HISTORY_FILE, [asdict(h) for h in result.history])
    ckpt.atomic_write_json(out / ckpt.METRICS_FILE, result.metrics_record())    # last: marks the run complete
    for stale in [out / ckpt.STATE_FILE, *out.glob("best-e*.safetensors")]:
        stale.unlink(missing_ok=True)


__all__ = ["TrainConfig", "TrainResult", "EpochRecord", "TrainProgress", "TrainingStopped", "train_heads",
           "fit", "Learner", "param_groups", "check_out_folder", "accumulation_weights",
           "joint_loss", "smooth", "pos_weight_of", "epoch_seed", "steps_per_epoch"]
