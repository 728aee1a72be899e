"""One split of the cache held in memory as tensors; a batch is a handful of index operations.

Layout of a `SplitData` (N videos, W = the split's most windows per video):
- video:       layer -> (N, W, Lv, Dv) tokens (fixed length per window; fp16 as cached)
- audio, text: layer -> `Ragged`: one flat (T, D) tensor + (N+1,) offsets, no padding to the split max
- text_window: layer -> `Ragged` over N*W rows (row n*W + w: the transcript spoken during window w)
- n_windows:   (N,) windows actually cached per video (rows past it are zeros and are never drawn)
- labels:      (N,) float32, NaN for an unlabelled video (the private split)

A batch gathers the chosen rows (and one window per row) without any per-sample Python loop: fixed-length
video tokens by advanced indexing, ragged tokens by `repeat_interleave` position arithmetic (heads/tokens.py).
Reading a split from the cache is heads/load.py; streaming one that does not fit, heads/stream.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from extract.errors import AHError
from extract.vocab import LAST, MODALITIES
from heads.tokens import Batch, Ragged, Tokens


class DataError(AHError):
    """A cache split that cannot be loaded into tensors (missing arrays, inconsistent shapes)."""



@dataclass
class SplitData:
    split: str
    video_ids: list[str]
    labels: Tensor                                      # (N,) float32, NaN = unlabelled
    n_windows: Tensor                                   # (N,) int64
    video: dict[str, Tensor] = field(default_factory=dict)
    audio: dict[str, Ragged] = field(default_factory=dict)
    text: dict[str, Ragged] = field(default_factory=dict)
    text_window: dict[str, Ragged] = field(default_factory=dict)
    starts: Tensor | None = None                        # (N, W) int64 window start frames, -1 = none

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def max_windows(self) -> int:
        return int(self.n_windows.max().item()) if len(self) else 0

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m))

    @property
    def layers(self) -> tuple[str, ...]:
        found = set()
        for m in MODALITIES:
            found |= set(getattr(self, m))
        return tuple(sorted(found))

    def dims(self, layer: str = LAST) -> dict[str, int]:
        """Token width per modality present in this split (the model's input sizes)."""
        out = {}
        if layer in self.video:
            out["video"] = int(self.video[layer].shape[-1])
        if layer in self.audio:
            out["audio"] = self.audio[layer].dim
        if layer in self.text:
            out["text"] = self.text[layer].dim
        return out

    def labelled(self) -> Tensor:
        """Indices (on the data's device) of the videos that carry a label."""
        return torch.nonzero(~torch.isnan(self.labels)).flatten()

    def nbytes(self) -> int:
        total = 0
        for t in self._tensors():
            total += t.numel() * t.element_size()
        return total

    def _tensors(self) -> list[Tensor]:
        out = [self.labels, self.n_windows, *self.video.values()]
        for d in (self.audio, self.text, self.text_window):
            for r in d.values():
                out += [r.values, r.offsets] + ([] if r.parts is None else [r.parts])
        return out

    def to(self, device: torch.device | str) -> "SplitData":
        return SplitData(
            self.split, list(self.video_ids), self.labels.to(device), self.n_windows.to(device),
            {k: v.to(device) for k, v in self.video.items()},
            {k: v.to(device) for k, v in self.audio.items()},
            {k: v.to(device) for k, v in self.text.items()},
            {k: v.to(device) for k, v in self.text_window.items()},
            None if self.starts is None else self.starts.to(device),
        )

    def subset(self, rows: Sequence[int] | Tensor) -> "SplitData":
        """A SplitData holding only `rows` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        w_old = self.max_windows                            # row stride of text_window here
        w_new = int(self.n_windows[rows].max().item()) if rows.numel() else 0   # and in the subset
        win_rows = (rows[:, None] * w_old + torch.arange(w_new, device=self.device)).flatten()
        return SplitData(
            self.split, [self.video_ids[i] for i in rows.tolist()], self.labels[rows], self.n_windows[rows],
            {k: v[rows] for k, v in self.video.items()},
            {k: v.select(rows) for k, v in self.audio.items()},
            {k: v.select(rows) for k, v in self.text.items()},
            {k: v.select(win_rows) for k, v in self.text_window.items()},
            None if self.starts is None else self.starts[rows][:, :max(w_new, 1)],
        )

    def batch(
        self,
        rows: Tensor,
        windows: Tensor | None = None,
        *,
        modalities: Sequence[str] = MODALITIES,
        layer: str = LAST,
        text_source: str = "full",
        device: torch.device | str | None = None,
    ) -> Batch:
        """Gather the tokens of `rows` (B,), window `windows[i]` of row i (default window 0)."""
        rows = rows.to(self.device)
        windows = torch.zeros_like(rows) if windows is None else windows.to(self.device)
        tokens: dict[str, Tokens] = {}
        if "video" in modalities:
            v = self._layer(self.video, "video", layer)[rows, windows]
            tokens["video"] = Tokens(v, rows.numel())
        if "audio" in modalities:
            tokens["audio"] = self._layer(self.audio, "audio", layer).gather(rows)
        if "text" in modalities:
            if text_source == "window":
                r = self._layer(self.text_window, "window-aligned text", layer)
                tokens["text"] = r.gather(rows * self.max_windows + windows)
            else:
                tokens["text"] = self._layer(self.text, "text", layer).gather(rows)
        labels = self.labels[rows]
        if device is not None and torch.device(device) != self.device:
            tokens = {k: t.to(device, non_blocking=True) for k, t in tokens.items()}
            labels = labels.to(device, non_blocking=True)
        return Batch(tokens, labels)

    def has_window_text(self, layer: str) -> bool:
        return layer in self.text_window

    def has_layer(self, modality: str, layer: str, text_source: str = "full") -> bool:
        """Whether batches of `modality` can be read at `layer` (the window-aligned text for 'window')."""
        table = self.text_window if modality == "text" and text_source == "window" else getattr(self, modality)
        return layer in table

    def batches(self, rows: Tensor, windows: Tensor, size: int, **batch: Any) -> Iterator[Batch]:
        """`batch` over consecutive runs of `size` (row, window) pairs: an epoch's accumulation groups.
        heads/stream.py's StreamSplit yields the same batches read from the cache."""
        rows, windows = rows.to(self.device), windows.to(self.device)
        for s in range(0, rows.numel(), size):
            yield self.batch(rows[s : s + size], windows[s : s + size], **batch)

    def _layer(self, table: dict, what: str, layer: str):
        if layer not in table:
            have = ", ".join(sorted(table)) or "none"
            raise DataError(f"split {self.split!r}: no {what} tokens for layer {layer!r} (cached: {have})")
        return table[layer]

    # ---- synthetic data for tests and benchmarks -------------------------------------------------

    @classmethod
    def synthetic(
        cls,
        n: int = 64,
        *,
        windows: int = 4,
        video_len: int = 8,
        audio_len: tuple[int, int] = (4, 16),
        text_len: tuple[int, int] = (3, 12),
        dims: tuple[int, int, int] = (16, 16, 16),
        signal: str = "conflict",
        strength: float = 1.5,
        seed: int = 0,
        split: str = "train",
        dtype: torch.dtype = torch.float16,
        text_window: bool = True,
        layers: Sequence[str] = (LAST,),
    ) -> "SplitData":
        """Random tokens with a planted label.

        signal='conflict': a sign s_v in {-1, 1} is planted along a fixed direction in every video token
        and a sign s_t along another direction in every text token; label = 1 when they disagree. Each
        modality alone carries no information about the label (it is an XOR), the pair carries all of it.
        Audio is pure noise. signal='none': labels are random coin flips.
        The planted directions depend only on `dims` (not `seed`), so splits drawn with different seeds
        share them (train on seed 0, validate on seed 1).
        """
        g = torch.Generator().manual_seed(seed)
        dg = torch.Generator().manual_seed(12345)
        dv, da, dt = dims
        dir_v = torch.nn.functional.normalize(torch.randn(dv, generator=dg), dim=0)
        dir_t = torch.nn.functional.normalize(torch.randn(dt, generator=dg), dim=0)
        s_v = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        s_t = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        if signal == "conflict":
            labels = (s_v != s_t).float()
        elif signal == "none":
            labels = torch.randint(0, 2, (n,), generator=g).float()
        else:
            raise ValueError(f"unknown signal {signal!r}")

        def lens(lo_hi: tuple[int, int], count: int) -> Tensor:
            return torch.randint(lo_hi[0], lo_hi[1] + 1, (count,), generator=g)

        video = {}
        audio = {}
        text = {}
        text_win = {}
        for layer in layers:
            v = torch.randn(n, windows, video_len, dv, generator=g) + strength * s_v[:, None, None, None] * dir_v
            video[layer] = v.to(dtype)
            la = lens(audio_len, n)
            audio[layer] = _ragged_random(la, da, g, dtype)
            lt = lens(text_len, n)
            r = _ragged_random(lt, dt, g, torch.float32)
            seg = torch.repeat_interleave(torch.arange(n), lt)
            text[layer] = Ragged((r.values + strength * s_t[seg, None] * dir_t).to(dtype), r.offsets)
            if text_window:
                lw = lens((max(text_len[0] // 2, 0), max(text_len[1] // 2, 1)), n * windows)
                rw = _ragged_random(lw, dt, g, torch.float32)
                segw = torch.repeat_interleave(torch.arange(n * windows), lw) // windows
                text_win[layer] = Ragged((rw.values + strength * s_t[segw, None] * dir_t).to(dtype), rw.offsets)
        ids = [f"Videos/{10000 + i:05d}/Visite_1/synthetic_{split}_{seed}_{i}.mp4" for i in range(n)]
        return cls(split, ids, labels, torch.full((n,), windows, dtype=torch.long), video, audio, text, text_win)


def _ragged_random(lengths: Tensor, dim: int, g: torch.Generator, dtype: torch.dtype) -> Ragged:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    return Ragged(torch.randn(int(offsets[-1]), dim, generator=g).to(dtype), offsets)
