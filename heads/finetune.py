"""Checkpoint A end to end: the encoders run on the raw BAH media every step, their top n blocks trained.

Each encoder is split in two: the frozen lower part (everything below the top n blocks: eval mode, no
gradients, run under no_grad) and the top n blocks (heads/topblocks.py TopBlocks, trainable at lr x
encoder_lr_scale). The lower part produces exactly the 'prefix' states the cache stores, so this path and
the cached fast path (`train-heads --unfreeze-top n`) train the same `TopBlocksHeads` and write the same
run folders; with the same weights their logits agree to fp32 precision (tested).

Per epoch each labelled train video is drawn in a seeded order with ONE random 16-frame window (start
uniform over the video, temporal augmentation); val is scored on the N windows the extraction spec gives
it (extract.windows.window_starts with the spec's seed and eval count: the cache's own windows). Decoding
(face JPEGs, audio) runs in DataLoader workers; the protocol (loss, accumulation, schedule, threshold
sweep, early stopping, checkpoints, resume) is heads.train.fit. On CUDA the encoders and heads run under
bf16 autocast (`amp`); the CPU runs fp32 (slowly, but it runs: the tiny encoders are tested here).

`RawMedia` re-runs a fine-tuned run's encoders on the raw media at a cache's window starts, for caches
without 'prefix' states (`ahcli evaluate RUN CACHE --data ROOT`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from extract.errors import AHError
from heads.data import MODALITIES, Tokens, parse_modalities, resolve_device

TRAIN_SPLITS = ("train", "val")


class FinetuneError(AHError):
    """Bad input to the end-to-end path: no labelled videos, a video that no longer decodes, other encoders."""


# ---- the frozen lower encoders ---------------------------------------------------------------------


def truncate_top(model: nn.Module, modality: str, n: int) -> nn.Module:
    """Drop the top n blocks (and a LayerNorm after them) so the model's last_hidden_state is the state
    entering those blocks: the cached 'prefix'. In place; returns the model."""
    from extract.encoders import _block_parts  # the encoders' own block/final-norm lookup

    blocks, final = _block_parts(model, modality)
    if not 1 <= n <= len(blocks):
        raise FinetuneError(f"--unfreeze-top {n} is not in 1..{len(blocks)} (the {modality} encoder's layer count)")
    kept = nn.ModuleList(list(blocks)[: len(blocks) - n])
    name = "layer" if getattr(model.encoder, "layer", None) is blocks else "layers"
    setattr(model.encoder, name, kept)
    if final is not None:
        if modality == "video":
            model.layernorm = None            # VideoMAE applies it only when set
        else:
            model.encoder.layer_norm = nn.Identity()   # pre-LN HuBERT: the norm after the blocks
    return model


class LowerEncoders:
    """The frozen lower part of each encoder of a spec, plus (once, at load) a trainable copy of the top n
    blocks taken from the same weights. `prefix(items)` gives the prefix Tokens of decoded items."""

    def __init__(self, spec, modalities: Sequence[str], n: int, device: str | torch.device = "cpu",
                 keep_tops: bool = True):
        from extract.encoders import TopBlocks, load_backbone, load_preprocessor
        from heads.topblocks import hf_config_dict

        self.spec = spec
        self.n = int(n)
        self.device = torch.device(device)
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.models: dict[str, nn.Module] = {}
        self.tops = nn.ModuleDict() if keep_tops else None
        self.hf_configs: dict[str, dict] = {}
        self.dims: dict[str, int] = {}
        for m in self.modalities:
            model = load_backbone(spec, m)
            if self.tops is not None:
                self.tops[m] = TopBlocks(model, m, self.n).requires_grad_(True)
            self.hf_configs[m] = hf_config_dict(model)
            self.dims[m] = int(model.config.hidden_size)
            self.models[m] = truncate_top(model, m, self.n).eval().requires_grad_(False).to(self.device)
        self.extractor = load_preprocessor(spec, "audio") if "audio" in self.modalities else None
        self.tokenizer = load_preprocessor(spec, "text") if "text" in self.modalities else None

    def weights_id(self) -> dict[str, str]:
        """The weight ids of all three encoders, as extraction records them (so fingerprints agree)."""
        from extract.encoders import weights_id_of

        return {m: weights_id_of(self.spec, m, self.models.get(m)) for m in MODALITIES}

    @torch.no_grad()
    def prefix(self, items: Sequence["RawItem"], text_source: str = "full") -> dict[str, Tokens]:
        """Prefix Tokens of decoded items: video (sum of windows, Lv, D) item-major; audio and text ragged
        per item (text per window when text_source is 'window') with their encoder-segment ids."""
        from extract.encoders import audio_forward, audio_segment_lengths, text_segments, texts_forward, video_forward

        out: dict[str, Tokens] = {}
        spec, dev = self.spec, self.device
        if "video" in self.models:
            clips = np.concatenate([it.clips for it in items])
            v = video_forward(self.models["video"], spec, clips, ("last",), dev)["last"]
            out["video"] = Tokens(v, v.shape[0])
        if "audio" in self.models:
            model = self.models["audio"]
            seqs = [audio_forward(model, self.extractor, spec, it.wave, ("last",), dev)["last"] for it in items]
            lens = [audio_segment_lengths(model.config, spec, len(it.wave)) for it in items]
            out["audio"] = ragged_tokens(seqs, lens)
        if "text" in self.models:
            texts = [it.text for it in items] if text_source == "full" else [t for it in items for t in it.window_texts]
            # All the batch's transcripts (or window transcripts) in right-padded batches: each equals its own run.
            seqs = [o["last"] for o in texts_forward(self.models["text"], self.tokenizer, spec, texts, ("last",), dev)]
            lens = [[len(ids) for ids in text_segments(self.tokenizer, spec, t)] for t in texts]
            out["text"] = ragged_tokens(seqs, lens)
        return out


def ragged_tokens(seqs: Sequence[Tensor], part_lengths: Sequence[Sequence[int]]) -> Tokens:
    """Per-sample (L_i, D) sequences -> ragged Tokens with `parts` from each sample's segment lengths."""
    lengths = torch.tensor([int(s.shape[0]) for s in seqs], dtype=torch.long)
    for s, lens in zip(seqs, part_lengths):
        if sum(lens) != s.shape[0]:
            raise FinetuneError(f"encoder segments sum to {sum(lens)} tokens but the encoder gave {s.shape[0]}")
    device = seqs[0].device
    parts = torch.cat([torch.repeat_interleave(torch.arange(len(x)), torch.tensor(list(x), dtype=torch.long))
                       for x in part_lengths])
    segments = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    return Tokens(torch.cat(list(seqs)), len(seqs), segments=segments.to(device), parts=parts.to(device))


# ---- decoding in workers ---------------------------------------------------------------------------


@dataclass
class RawItem:
    """One video decoded at some windows (in a DataLoader worker)."""

    row: int                        # index in the caller's video list
    starts: list[int]
    clips: np.ndarray | None        # (W, T, S, S, 3) uint8
    wave: np.ndarray | None         # float32 mono
    text: str
    window_texts: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class RawBatch:
    """A micro-batch of decoded videos (one window each) and their labels."""

    items: list[RawItem]
    labels: Tensor


def decode(video, starts: Sequence[int], spec, modalities: Sequence[str], window_text: bool, row: int) -> RawItem:
    """Face frames of each window, the audio and the transcript(s) of one video; errors are returned, not
    raised, so the main process reports them as one line."""
    from extract.media import read_audio, read_faces
    from extract.windows import clip_indices, window_text as text_of

    length, n = spec.windows.frames, video.frame_count
    item = RawItem(row, list(starts), None, None, video.transcript)
    try:
        if "video" in modalities:
            needed = sorted({i for s in starts for i in clip_indices(s, length, n)})
            frames = read_faces([video.face_frames[i] for i in needed], spec.video.size)
            pos = {f: k for k, f in enumerate(needed)}
            item.clips = np.stack([frames[[pos[i] for i in clip_indices(s, length, n)]] for s in starts])
        if "audio" in modalities:
            item.wave = read_audio(video.mp4, spec.audio.sample_rate)
        if window_text:
            item.window_texts = [text_of(video.chunks, s / video.fps, (s + length) / video.fps) for s in starts]
    except AHError as exc:
        item.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one file: reported with the file's name
        item.error = f"{video.mp4}: {type(exc).__name__}: {exc}"
    return item


class _DecodeSet(Dataset):
    def __init__(self, videos: Sequence, plan: Sequence[tuple[int, list[int]]], spec, modalities, window_text: bool):
        self.videos, self.plan, self.spec = list(videos), list(plan), spec
        self.modalities, self.window_text = tuple(modalities), window_text

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> RawItem:
        row, starts = self.plan[k]
        return decode(self.videos[row], starts, self.spec, self.modalities, self.window_text, row)


def _first(batch):
    return batch


def decoded(videos: Sequence, plan: Sequence[tuple[int, list[int]]], spec, modalities: Sequence[str],
            window_text: bool, workers: int) -> Iterator[RawItem]:
    """Decode `plan` [(video row, window starts)] in order, in `workers` processes (0: here)."""
    loader = DataLoader(_DecodeSet(videos, plan, spec, modalities, window_text), batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=_first, prefetch_factor=4 if workers > 0 else None)
    for item in loader:
        if item.error is not None:
            raise FinetuneError(item.error if str(videos[item.row].video_id) in item.error
                                else f"{videos[item.row].video_id}: {item.error}")
        yield item


def train_plan(videos: Sequence, spec, g: torch.Generator) -> list[tuple[int, list[int]]]:
    """This epoch's order and one random window start per video (uniform over the video)."""
    order = torch.randperm(len(videos), generator=g).tolist()
    u = torch.rand(len(videos), generator=g, dtype=torch.float64).tolist()
    length = spec.windows.frames
    return [(i, [int(u[k] * (max(videos[i].frame_count - length, 0) + 1))]) for k, i in enumerate(order)]


def eval_starts(video, spec, windows: int | None = None) -> list[int]:
    """The extraction spec's eval windows of a video (the cache's own starts), the first `windows`."""
    from extract.windows import window_starts

    count = spec.windows.train if video.split == "train" else spec.windows.eval
    starts = window_starts(video.video_id, video.frame_count, count, spec.windows.frames, spec.seed)
    return starts[:windows] if windows else starts


# ---- window logits from the raw media ---------------------------------------------------------------


@torch.no_grad()
def raw_window_logits(core, lower: LowerEncoders, videos: Sequence, starts: Sequence[list[int]], valid: Tensor,
                      *, text_source: str = "full", batch_size: int = 64, amp: bool = True, workers: int = 0):
    """Per-window logits (N, W) of `core` (a TopBlocksHeads) for videos decoded at `starts` (W each)."""
    from heads.infer import WindowLogits, autocast

    n, w = valid.shape
    per = max(1, int(batch_size) // max(w, 1))
    shared = ["audio"] + (["text"] if text_source == "full" else [])
    plan = [(i, list(s)) for i, s in enumerate(starts)]
    mods = core.cfg.present
    was_training = core.training
    core.eval()
    full, text = [], []

    def run(chunk: list[RawItem]) -> None:
        with autocast(lower.device, amp):
            lf, lt = core.window_forward(lower.prefix(chunk, text_source), w, per_video=shared)
        full.append(lf.float().cpu())
        if lt is not None:
            text.append(lt.float().cpu())

    try:
        chunk: list[RawItem] = []
        for item in decoded(videos, plan, lower.spec, mods, text_source == "window" and "text" in mods, workers):
            chunk.append(item)
            if len(chunk) == per:
                run(chunk)
                chunk = []
        if chunk:
            run(chunk)
    finally:
        core.train(was_training)
    return WindowLogits(torch.cat(full).view(n, w), torch.cat(text).view(n, w) if text else None, valid.cpu())


class RawMedia:
    """A fine-tuned run's encoders over the raw BAH media, for splits whose cache has no 'prefix' states:
    window logits at the split's own cached window starts. Encoders and the tree load on first use."""

    def __init__(self, data_root: Path, spec, n: int, device: str | torch.device = "cpu",
                 private_root: Path | None = None, workers: int = 0, allow_symlinks: bool = False):
        self.data_root = Path(data_root)
        self.spec_dict = spec if isinstance(spec, dict) else spec.to_dict()
        self.n, self.device = int(n), resolve_device(device) if str(device) == "auto" else torch.device(device)
        self.private_root, self.workers, self.allow_symlinks = private_root, int(workers), allow_symlinks
        self._videos: dict[str, Any] | None = None
        self._lower: dict[tuple[str, ...], LowerEncoders] = {}

    def videos(self, ids: Sequence[str]) -> list:
        from extract.bah import read_bah
        from heads.checkpoint import RunError

        if self._videos is None:
            ds = read_bah(self.data_root, private_root=self.private_root, allow_symlinks=self.allow_symlinks)
            self._videos = {v.video_id: v for v in ds.videos}
        missing = [v for v in ids if v not in self._videos]
        if missing:
            raise RunError(f"{self.data_root}: {len(missing)} video(s) of the cache are not readable in this BAH "
                           f"tree (first: {missing[0]}); pass the tree the cache was extracted from")
        return [self._videos[v] for v in ids]

    def lower(self, modalities: Sequence[str]) -> LowerEncoders:
        from heads.checkpoint import RunError
        from heads.topblocks import as_spec

        key = tuple(modalities)
        if key not in self._lower:
            spec = as_spec(self.spec_dict)
            enc = LowerEncoders(spec, key, self.n, self.device, keep_tops=False)
            want = dict(tuple(x) for x in self.spec_dict.get("weights_id") or [])
            have = enc.weights_id()
            changed = sorted(m for m in key if m in want and want[m] != have[m])
            if changed:
                raise RunError(f"the {', '.join(changed)} encoder weights differ from those the run was trained "
                               "on (the spec's model folder changed); its blocks would sit on other layers")
            self._lower[key] = enc
        return self._lower[key]

    def window_logits(self, core, data, *, windows: int | None = None, text_source: str = "full",
                      batch_size: int = 64, amp: bool = True):
        if data.starts is None:
            raise FinetuneError(f"split {data.split!r} was loaded without its window starts")
        w = data.max_windows if not windows else min(int(windows), data.max_windows)
        nwin = data.n_windows.cpu()
        valid = torch.arange(w)[None, :] < nwin[:, None]
        starts = []
        for i in range(len(data)):
            s = [int(x) for x in data.starts[i, : int(nwin[i])].tolist()][:w]
            starts.append(s + [s[-1]] * (w - len(s)))       # missing windows: repeated, masked by `valid`
        videos = self.videos(data.video_ids)
        core.to(self.device)
        return raw_window_logits(core, self.lower(core.cfg.present), videos, starts, valid, text_source=text_source,
                                 batch_size=batch_size, amp=amp, workers=self.workers)


# ---- training --------------------------------------------------------------------------------------


@dataclass
class FinetuneData:
    """The labelled train and val videos of a BAH tree, and the videos it could not read."""

    train: list
    val: list
    problems: list = field(default_factory=list)


def read_finetune_data(data_root: Path, allow_symlinks: bool = False) -> FinetuneData:
    from extract.bah import read_bah

    ds = read_bah(data_root, splits=TRAIN_SPLITS, allow_symlinks=allow_symlinks)
    train = [v for v in ds.split("train") if v.label is not None]
    val = [v for v in ds.split("val") if v.label is not None]
    if not train:
        raise FinetuneError(f"{data_root}: no readable labelled train videos")
    if not val:
        raise FinetuneError(f"{data_root}: no readable labelled val videos (needed to select the epoch)")
    return FinetuneData(train, val, list(ds.problems))


@dataclass
class Finetune:
    """Everything `heads.train.fit` needs for the end-to-end path, built by `prepare_finetune`."""

    learner: Any                    # heads.train.Learner over the raw media
    lower: LowerEncoders            # the frozen lower blocks (not trained, not saved)
    model_cfg: Any                  # heads.model.ModelConfig
    spec: Any                       # the ExtractionSpec, with the encoders' weight ids
    data: FinetuneData
    cache: dict[str, Any]           # config.json's "cache": the spec's fingerprint (a cache made with it matches)
    encoders: dict[str, Any]        # config.json's "encoders"


def prepare_finetune(data_root: str | Path, spec_path: str | Path, model_options: dict[str, Any], cfg, *,
                     workers: int = 2, allow_symlinks: bool = False) -> Finetune:
    """Read the tree, load the encoders (lower part frozen, top blocks copied), build heads and data path."""
    from extract.spec import load_spec
    from heads.model import ModelConfig, build_model
    from heads.topblocks import TopBlocksHeads, encoders_record
    from heads.train import Learner

    if cfg.unfreeze_top < 1:
        raise FinetuneError("finetune: --unfreeze-top must be >= 1 (all-frozen training is `ahcli train-heads`)")
    spec = load_spec(spec_path)
    data = read_finetune_data(Path(data_root), allow_symlinks)
    device = resolve_device(cfg.device)
    mods = parse_modalities(str(model_options.get("modalities", "vat")))
    lower = LowerEncoders(spec, mods, cfg.unfreeze_top, device)
    spec = spec.with_weights_id(lower.weights_id())
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
                                 batch_size=cfg.eval_batch_size, amp=cfg.amp, workers=workers)

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
    cfg,
    *,
    workers: int = 2,
    allow_symlinks: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    on_epoch: Callable | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_data: Callable[[FinetuneData], None] | None = None,
    extra: dict[str, Any] | None = None,
):
    """Train checkpoint A end to end from the raw BAH tree; returns a heads.train.TrainResult whose model
    is a TopBlocksHeads. `model_options` are heads.model.ModelConfig options except input_dims (taken from
    the encoders); `cfg` a heads.train.TrainConfig with unfreeze_top >= 1. The run folder records the spec's
    fingerprint as its cache fingerprint: a cache extracted with the same spec file matches it."""
    from heads.train import fit

    ft = prepare_finetune(data_root, spec_path, model_options, cfg, workers=workers, allow_symlinks=allow_symlinks)
    if on_data is not None:
        on_data(ft.data)
    return fit(ft.learner, ft.model_cfg, cfg, out, resume=resume, stop_after=stop_after, on_epoch=on_epoch,
               on_step=on_step, cache=ft.cache, extra=extra, encoders=ft.encoders)


def _batch(items: list[RawItem], videos: Sequence) -> RawBatch:
    return RawBatch(list(items), torch.tensor([float(videos[it.row].label) for it in items], dtype=torch.float32))


def bench_top2_epoch(device: str = "auto", quick: bool = True) -> dict[str, Any]:
    """One epoch of the cached top-2 path vs the end-to-end path at BAH scale (see heads/finetune_bench.py)."""
    from heads.finetune_bench import bench_top2_epoch as run

    return run(device, quick)


__all__ = ["finetune", "prepare_finetune", "Finetune", "FinetuneError", "LowerEncoders", "RawMedia", "RawItem", "RawBatch", "truncate_top",
           "raw_window_logits", "eval_starts", "train_plan", "decode", "decoded", "bench_top2_epoch",
           "read_finetune_data", "FinetuneData"]
