"""Checkpoint A end to end: the encoders run on the raw BAH media every step, their top n blocks trained.

Each encoder is split in two: the frozen lower part (everything below the top n blocks: eval mode, no
gradients, run under no_grad: ahflows/raw_media.py) and the top n blocks (heads/topblocks.py, trainable at lr x
encoder_lr_scale). The lower part produces exactly the 'prefix' states the cache stores, so this path and
the cached fast path (`train-heads --unfreeze-top n`) train the same `TopBlocksHeads` and write the same
run folders; with the same weights their logits agree to fp32 precision (tested).

Per epoch each labelled train video is drawn in a seeded order with ONE random 16-frame window (start
uniform over the video, temporal augmentation); val is scored on the N windows the extraction spec gives
it (extract.windows.window_starts with the spec's seed and eval count: the cache's own windows). Decoding
(face JPEGs, audio) runs in DataLoader workers; the protocol (loss, accumulation, schedule, threshold
sweep, early stopping, checkpoints, resume) is heads.train.fit. On CUDA the encoders and heads run under
bf16 autocast (`amp`, or `precision`: extract/precision.py); the CPU runs fp32 (slowly, but it runs: the
tiny encoders are tested here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ahflows.raw_media import LowerEncoders, RawBatch, RawItem, decoded, eval_starts, raw_window_logits
from extract.bah import Video, read_bah
from extract.devices import resolve_device
from extract.errors import AHError
from extract.listing import Coverage
from extract.spec import ExtractionSpec, load_spec
from extract.vocab import TRAIN_SPLITS, parse_modalities
from heads.config import ModelConfig, TrainConfig
from heads.model import build_model
from heads.topblocks import TopBlocksHeads, encoders_record
from heads.train import Learner, fit
from heads.train_state import TrainResult


class FinetuneError(AHError):
    """Bad input to the end-to-end path: no labelled videos, or all-frozen options."""


def train_plan(videos: Sequence[Video], spec: ExtractionSpec, g: torch.Generator) -> list[tuple[int, list[int]]]:
    """This epoch's order and one random window start per video (uniform over the video)."""
    order = torch.randperm(len(videos), generator=g).tolist()
    u = torch.rand(len(videos), generator=g, dtype=torch.float64).tolist()
    length = spec.windows.frames
    return [(i, [int(u[k] * (max(videos[i].frame_count - length, 0) + 1))]) for k, i in enumerate(order)]




@dataclass
class FinetuneData:
    """The labelled train and val videos of a BAH tree, and the videos it could not read."""

    train: list
    val: list
    problems: list = field(default_factory=list)
    coverage: dict = field(default_factory=dict)     # split -> extract.listing.Coverage (used / listed)


def read_finetune_data(data_root: Path, allow_symlinks: bool = False) -> FinetuneData:

    ds = read_bah(data_root, splits=TRAIN_SPLITS, allow_symlinks=allow_symlinks)
    train = [v for v in ds.split("train") if v.label is not None]
    val = [v for v in ds.split("val") if v.label is not None]
    if not train:
        raise FinetuneError(f"{data_root}: no readable labelled train videos")
    if not val:
        raise FinetuneError(f"{data_root}: no readable labelled val videos (needed to select the epoch)")
    coverage = {s: Coverage(s, ds.listed.get(s, []), [v.video_id for v in vids])
                for s, vids in (("train", train), ("val", val))}
    return FinetuneData(train, val, list(ds.problems), coverage)


@dataclass
class Finetune:
    """Everything `heads.train.fit` needs for the end-to-end path, built by `prepare_finetune`."""

    learner: Learner                # over the raw media
    lower: LowerEncoders            # the frozen lower blocks (not trained, not saved)
    model_cfg: ModelConfig
    spec: ExtractionSpec            # with the encoders' weight ids
    data: FinetuneData
    cache: dict[str, Any]           # config.json's "cache": the spec's fingerprint (a cache made with it matches)
    encoders: dict[str, Any]        # config.json's "encoders"


def prepare_finetune(data_root: str | Path, spec_path: str | Path, model_options: dict[str, Any], cfg: TrainConfig, *,
                     workers: int = 2, allow_symlinks: bool = False) -> Finetune:
    """Read the tree, load the encoders (lower part frozen, top blocks copied), build heads and data path."""

    if cfg.unfreeze_top < 1:
        raise FinetuneError("finetune: --unfreeze-top must be >= 1 (all-frozen training is `ahcli train-heads`)")
    spec = load_spec(spec_path)
    data = read_finetune_data(Path(data_root), allow_symlinks)
    device = resolve_device(cfg.device)
    mods = parse_modalities(str(model_options.get("modalities", "vat")))
    lower = LowerEncoders(spec, mods, cfg.unfreeze_top, device)
    spec = lower.spec
    model_cfg = ModelConfig(input_dims=dict(lower.dims), **model_options)
    core = TopBlocksHeads(lower.tops, build_model(model_cfg, seed=cfg.seed))
    lower.tops = None                              # the trainable copy now lives in `core` only
    window_text = cfg.text_source == "window" and model_cfg.has_text

    def groups(epoch: int, g: torch.Generator):
        size, group, micro = cfg.batch_size, [], []
        for item in decoded(data.train, train_plan(data.train, spec, g), spec, model_cfg.present, window_text,
                            workers):
            micro.append(item)
            if len(micro) == size:
                group.append(_batch(micro, data.train))
                micro = []
                if len(group) == cfg.accum:
                    yield group
                    group = []
        if micro:
            group.append(_batch(micro, data.train))
        if group:
            yield group

    def forward(mb: RawBatch):
        return core(lower.prefix(mb.items, cfg.text_source))

    val_starts = [eval_starts(v, spec, cfg.eval_windows or None) for v in data.val]
    valid = torch.ones(len(data.val), len(val_starts[0]), dtype=torch.bool)

    def val_logits(model):
        return raw_window_logits(model, lower, data.val, val_starts, valid, text_source=cfg.text_source,
                                 batch_size=cfg.eval_batch_size, amp=cfg.amp_mode, workers=workers)

    def labels(videos) -> Tensor:
        return torch.tensor([float(v.label) for v in videos], dtype=torch.float32)

    learner = Learner(core, forward, groups, val_logits, labels(data.train), labels(data.val))
    cache = {"fingerprint": spec.fingerprint(), "path": None, "data": str(Path(data_root).resolve())}
    encoders = encoders_record(spec, lower.hf_configs, cfg.unfreeze_top, source="raw")
    return Finetune(learner, lower, model_cfg, spec, data, cache, encoders)


def finetune(
    data_root: str | Path,
    spec_path: str | Path,
    out: str | Path | None,
    model_options: dict[str, Any],
    cfg: TrainConfig,
    *,
    workers: int = 2,
    allow_symlinks: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    on_epoch: Callable | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_data: Callable[[FinetuneData], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train checkpoint A end to end from the raw BAH tree; returns a heads.train.TrainResult whose model
    is a TopBlocksHeads. `model_options` are heads.model.ModelConfig options except input_dims (taken from
    the encoders); `cfg` a heads.train.TrainConfig with unfreeze_top >= 1. The run folder records the spec's
    fingerprint as its cache fingerprint: a cache extracted with the same spec file matches it."""

    ft = prepare_finetune(data_root, spec_path, model_options, cfg, workers=workers, allow_symlinks=allow_symlinks)
    if on_data is not None:
        on_data(ft.data)
    return fit(ft.learner, ft.model_cfg, cfg, out, resume=resume, stop_after=stop_after, on_epoch=on_epoch,
               on_step=on_step, cache=ft.cache, extra=extra, encoders=ft.encoders,
               videos={s: c.counts() for s, c in ft.data.coverage.items()})


def _batch(items: list[RawItem], videos: Sequence) -> RawBatch:
    return RawBatch(list(items), torch.tensor([float(videos[it.row].label) for it in items], dtype=torch.float32))
