"""A fine-tuned run's encoders over the raw media: the frozen lower blocks, decoding in workers, window logits.

Each encoder is split in two: the frozen lower part (everything below the top n blocks: eval mode, no
gradients, run under no_grad) and the top n blocks (heads/topblocks.py TopBlocks). The lower part produces
exactly the 'prefix' states the cache stores, so the end-to-end path (ahflows/finetune.py) and the cached fast
path train the same `TopBlocksHeads`. `RawMedia` re-runs a fine-tuned run's encoders on the raw media at a
cache's window starts, for caches without 'prefix' states (`ahcli evaluate RUN CACHE --data ROOT`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from extract.bah import Video, read_bah
from extract.decode import decode_windows
from extract.devices import resolve_device
from extract.encoders import audio_forward, audio_segment_lengths, text_segments, texts_forward, video_forward
from extract.errors import AHError
from extract.loading import load_backbone, load_preprocessor, resolve_spec, weights_id_of
from extract.run import window_count
from extract.spec import ExtractionSpec
from extract.stopping import quiet_worker
from extract.store import CacheReader
from extract.vocab import LAST, MODALITIES
from extract.windows import window_starts
from heads.split_data import SplitData
from heads.infer import WindowLogits, autocast, per_video_modalities
from heads.run_files import RunError
from heads.runs import Run, load_run
from heads.tokens import Tokens
from heads.topblocks import TopBlocks, TopBlocksHeads, as_spec, block_parts, hf_config_dict


class RawMediaError(AHError):
    """A video that no longer decodes, or encoders other than those a run was trained with."""


# ---- the frozen lower encoders ---------------------------------------------------------------------


def truncate_top(model: nn.Module, modality: str, n: int) -> nn.Module:
    """Drop the top n blocks (and a LayerNorm after them) so the model's last_hidden_state is the state
    entering those blocks: the cached 'prefix'. In place; returns the model."""
    blocks, final = block_parts(model, modality)
    if not 1 <= n <= len(blocks):
        raise RawMediaError(f"--unfreeze-top {n} is not in 1..{len(blocks)} (the {modality} encoder's layer count)")
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

    def __init__(self, spec: ExtractionSpec, modalities: Sequence[str], n: int, device: str | torch.device = "cpu",
                 keep_tops: bool = True):
        self.n = int(n)
        self.device = torch.device(device)
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.models: dict[str, nn.Module] = {}
        self.tops = nn.ModuleDict() if keep_tops else None
        self.hf_configs: dict[str, dict] = {}
        self.dims: dict[str, int] = {}
        self.extractor = load_preprocessor(spec, "audio")
        self.tokenizer = load_preprocessor(spec, "text")
        spec = resolve_spec(spec, {"audio": self.extractor, "text": self.tokenizer})
        for m in self.modalities:
            model = load_backbone(spec, m)
            if self.tops is not None:
                self.tops[m] = TopBlocks(model, m, self.n).requires_grad_(True)
            self.hf_configs[m] = hf_config_dict(model)
            self.dims[m] = int(model.config.hidden_size)
            self.models[m] = truncate_top(model, m, self.n).eval().requires_grad_(False).to(self.device)
        # The resolved spec with the weight ids of all three encoders, as extraction records them (so the
        # fingerprints agree).
        self.spec = spec.with_weights_id({m: weights_id_of(spec, m, self.models.get(m)) for m in MODALITIES})

    def weights_id(self) -> dict[str, str]:
        return dict(self.spec.weights_id)

    @torch.no_grad()
    def prefix(self, items: Sequence["RawItem"], text_source: str = "full") -> dict[str, Tokens]:
        """Prefix Tokens of decoded items: video (sum of windows, Lv, D) item-major; audio and text ragged
        per item (text per window when text_source is 'window') with their encoder-segment ids."""

        out: dict[str, Tokens] = {}
        spec, dev = self.spec, self.device
        if "video" in self.models:
            clips = np.concatenate([it.clips for it in items])
            v = video_forward(self.models["video"], spec, clips, (LAST,), dev)[LAST]
            out["video"] = Tokens(v, v.shape[0])
        if "audio" in self.models:
            model = self.models["audio"]
            seqs = [audio_forward(model, self.extractor, spec, it.wave, (LAST,), dev)[LAST] for it in items]
            lens = [audio_segment_lengths(model.config, spec, len(it.wave)) for it in items]
            out["audio"] = ragged_tokens(seqs, lens)
        if "text" in self.models:
            texts = [it.text for it in items] if text_source == "full" else [t for it in items for t in it.window_texts]
            # All the batch's transcripts (or window transcripts) in right-padded batches: each equals its own run.
            seqs = [o[LAST] for o in texts_forward(self.models["text"], self.tokenizer, spec, texts, (LAST,), dev)]
            lens = [[len(ids) for ids in text_segments(self.tokenizer, spec, t)] for t in texts]
            out["text"] = ragged_tokens(seqs, lens)
        return out


def ragged_tokens(seqs: Sequence[Tensor], part_lengths: Sequence[Sequence[int]]) -> Tokens:
    """Per-sample (L_i, D) sequences -> ragged Tokens with `parts` from each sample's segment lengths."""
    lengths = torch.tensor([int(s.shape[0]) for s in seqs], dtype=torch.long)
    for s, lens in zip(seqs, part_lengths):
        if sum(lens) != s.shape[0]:
            raise RawMediaError(f"encoder segments sum to {sum(lens)} tokens but the encoder gave {s.shape[0]}")
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


def decode(video: Video, starts: Sequence[int], spec: ExtractionSpec, modalities: Sequence[str], window_text: bool,
           row: int) -> RawItem:
    """Face frames of each window, the audio and the transcript(s) of one video; errors are returned, not
    raised, so the main process reports them as one line."""
    item = RawItem(row, list(starts), None, None, video.transcript)
    try:
        got = decode_windows(video, starts, spec, video="video" in modalities, audio="audio" in modalities,
                             texts=window_text)
        item.clips, item.wave, item.window_texts = got.clips, got.wave, got.texts
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
                        num_workers=workers, collate_fn=_first, prefetch_factor=4 if workers > 0 else None,
                        worker_init_fn=partial(quiet_worker, os.getpid()))
    for item in loader:
        if item.error is not None:
            raise RawMediaError(item.error if str(videos[item.row].video_id) in item.error
                                else f"{videos[item.row].video_id}: {item.error}")
        yield item


def eval_starts(video, spec, windows: int | None = None) -> list[int]:
    """The extraction spec's eval windows of a video (the cache's own starts), the first `windows`."""

    starts = window_starts(video.video_id, video.frame_count, window_count(spec, video.split), spec.windows.frames,
                           spec.seed)
    return starts[:windows] if windows else starts


# ---- window logits from the raw media ---------------------------------------------------------------


@torch.no_grad()
def raw_window_logits(core: TopBlocksHeads, lower: LowerEncoders, videos: Sequence[Video],
                      starts: Sequence[list[int]], valid: Tensor, *, text_source: str = "full", batch_size: int = 64, amp: bool = True, workers: int = 0):
    """Per-window logits (N, W) of `core` (a TopBlocksHeads) for videos decoded at `starts` (W each)."""
    n, w = valid.shape
    per = max(1, int(batch_size) // max(w, 1))
    plan = [(i, list(s)) for i, s in enumerate(starts)]
    mods = core.cfg.present
    shared = per_video_modalities(mods, text_source)
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
        if self._videos is None:
            ds = read_bah(self.data_root, private_root=self.private_root, allow_symlinks=self.allow_symlinks)
            self._videos = {v.video_id: v for v in ds.videos}
        missing = [v for v in ids if v not in self._videos]
        if missing:
            raise RunError(f"{self.data_root}: {len(missing)} video(s) of the cache are not readable in this BAH "
                           f"tree (first: {missing[0]}); pass the tree the cache was extracted from")
        return [self._videos[v] for v in ids]

    def lower(self, modalities: Sequence[str]) -> LowerEncoders:
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

    def window_logits(self, core: TopBlocksHeads, data: SplitData, *, windows: int | None = None,
                      text_source: str = "full", batch_size: int = 64, amp: bool = True) -> WindowLogits:
        if data.starts is None:
            raise RawMediaError(f"split {data.split!r} was loaded without its window starts")
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


def load_run_with_media(run_dir: str | Path, cache: CacheReader | None = None, device: str | torch.device = "cpu",
                        data_root: str | Path | None = None, private_root: str | Path | None = None,
                        workers: int = 0) -> Run:
    """heads.runs.load_run, and for a fine-tuned run given `data_root` (the BAH tree) a `RawMedia` that runs
    its encoders on the raw media when the cache has no 'prefix' states (`private_root`: the private split's
    tree, `workers`: decoding processes)."""
    run = load_run(run_dir, cache=cache, device=device)
    if run.unfreeze_top and data_root is not None:
        run.media = RawMedia(Path(data_root), run.config["encoders"]["spec"], run.unfreeze_top, device=device,
                             private_root=None if private_root is None else Path(private_root), workers=workers)
    return run
