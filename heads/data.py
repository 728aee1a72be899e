"""One split of the cache held in memory as tensors; a batch is a handful of index operations.

Layout of a `SplitData` (N videos, W = the split's most windows per video):
- video:       layer -> (N, W, Lv, Dv) tokens (fixed length per window; fp16 as cached)
- audio, text: layer -> `Ragged`: one flat (T, D) tensor + (N+1,) offsets, no padding to the split max
- text_window: layer -> `Ragged` over N*W rows (row n*W + w: the transcript spoken during window w)
- n_windows:   (N,) windows actually cached per video (rows past it are zeros and are never drawn)
- labels:      (N,) float32, NaN for an unlabelled video (the private split)

A batch gathers the chosen rows (and one window per row) without any per-sample Python loop: fixed-length
video tokens by advanced indexing, ragged tokens by `repeat_interleave` position arithmetic (heads/tokens.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from extract.devices import resolve_device
from extract.errors import AHError
from extract.vocab import LAST, MODALITIES, PREFIX, SEGMENTS
from heads.host_memory import available_bytes
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


# ---- loading from the cache ------------------------------------------------------------------------


def placement(nbytes: int, compute: torch.device, headroom: float = 0.6) -> torch.device:
    """Where a split should live: on the compute device when it fits in `headroom` of its free memory."""
    if compute.type != "cuda":
        return compute
    free, _ = torch.cuda.mem_get_info(compute)
    return compute if nbytes <= headroom * free else torch.device("cpu")


def load_split(
    reader,
    split: str,
    layers: Sequence[str] = (LAST,),
    device: str | torch.device = "auto",
    *,
    modalities: Sequence[str] = MODALITIES,
    text_window: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    verify: bool = True,
) -> SplitData:
    """Read one split of a `CacheReader` into tensors, once. Every array read is checked for NaN/Inf and,
    with `verify`, against the checksum stored at extraction (a failure names the video and the repair).

    `text_window`: None loads the window-aligned transcript tokens when the cache holds them, True
    requires them, False skips them. The tensors go to `device` ('auto': the GPU when there is one and
    the split fits in its free memory, else the CPU; batches are then moved per step).
    With 'prefix' in `layers`, audio and text also get their encoder-segment `parts` (the cache's
    audio_segments / text_segments). `layers=()` loads only the metadata (labels, window counts and starts),
    e.g. to run encoders on the raw media at the cache's windows.
    """
    problem = reader.soundness_problem(split)
    if problem is not None:
        raise DataError(problem)
    ids = reader.video_ids(split)
    if not ids:
        raise DataError(f"{_where(reader)}: split {split!r} has no complete videos in the cache")
    layers = tuple(layers)
    _check_layers(reader, layers)
    want_window = _want_text_window(reader, text_window) and "text" in modalities
    keys = [f"{m}/{layer}" for m in modalities for layer in layers]
    if want_window and layers:
        keys += [f"text_window/{layer}" for layer in layers] + ["text_window_lengths"]
    seg_keys = {m: SEGMENTS[m] for m in SEGMENTS if m in modalities and PREFIX in layers}
    keys += list(seg_keys.values())

    _check_memory(reader, split, sum(reader.array_nbytes(vid, keys) for vid in ids))

    labels = np.full(len(ids), np.nan, dtype=np.float32)
    n_windows = np.zeros(len(ids), dtype=np.int64)
    video: dict[str, Tensor] = {}
    ragged: dict[str, list] = {k: [] for k in keys if "/" in k and not k.startswith("video/")}
    win_lengths: list[np.ndarray] = []
    seg_lengths: dict[str, list[np.ndarray]] = {m: [] for m in seg_keys}
    starts: list[list[int]] = []
    for i, vid in enumerate(ids):
        rec = _checked_record(reader, vid, keys, verify)
        if rec.label is not None:
            labels[i] = float(rec.label)
        for layer in layers:
            if "video" in modalities:
                _put_video(video, layer, rec.arrays[f"video/{layer}"], i, len(ids), vid, reader)
        n_windows[i] = _count_windows(rec, layers, modalities)
        for k in ragged:
            arr = rec.arrays[k]
            if arr.ndim != 2:
                raise DataError(f"{_where(reader)}: video {vid!r}: {k} has shape {arr.shape}, expected (L, D)")
            ragged[k].append(arr)
        if want_window and layers:
            win_lengths.append(np.asarray(rec.arrays["text_window_lengths"], dtype=np.int64))
        for m, key in seg_keys.items():
            seg_lengths[m].append(_segment_lengths(rec, m, key, vid, reader))
        starts.append(list(rec.window_starts))
        if progress is not None:
            progress(i + 1, len(ids))

    data = SplitData(split, ids, torch.from_numpy(labels), torch.from_numpy(n_windows), video,
                     starts=_starts_tensor(starts))
    for k, arrays in ragged.items():
        kind, layer = k.split("/", 1)
        dims = {int(a.shape[1]) for a in arrays}
        if len(dims) != 1:
            raise DataError(f"{_where(reader)}: {k} has differing widths across videos: {sorted(dims)}")
        dtype = _torch_dtype(arrays[0].dtype)
        if kind == "text_window":
            arrays = _split_windows(arrays, win_lengths, data.max_windows, reader)
        getattr(data, kind)[layer] = Ragged.from_arrays(arrays, dims.pop(), dtype)
        if kind in seg_lengths:
            getattr(data, kind)[layer].parts = _parts(seg_lengths[kind])
    target = placement(data.nbytes(), resolve_device(device))
    return data.to(target) if target.type != "cpu" else data


REPAIR = "repair it with `ahcli extract DATA CACHE --spec SPEC --repair` (re-extracts only the bad videos)"


def _checked_record(reader, vid: str, keys: Sequence[str], verify: bool):
    """A video's record with every requested array present, finite and (with `verify`) matching its checksum."""
    try:
        rec = reader.record(vid, keys, check=verify)
    except AHError as exc:
        raise DataError(f"{exc}; {REPAIR}") from exc
    missing = [k for k in keys if k not in rec.arrays]
    if missing:
        raise DataError(f"{_where(reader)}: video {vid!r} lacks cached array(s) {', '.join(missing)}")
    for k, arr in rec.arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError(f"{_where(reader)}: video {vid!r}: {k} contains NaN or Inf; {REPAIR}")
    return rec


def _check_memory(reader, split: str, need: int) -> None:
    """Refuse, before reading, a split that cannot fit in the host's available memory: the alternative is
    the kernel killing the process minutes into the load, without a word. (A split bound for the GPU is
    built on the host first.)"""
    have = available_bytes()
    if have is not None and need > have:
        raise DataError(f"{_where(reader)}: the {split} split needs {need / 1e9:.1f} GB of memory and "
                        f"{have / 1e9:.1f} GB is available; free memory, use a machine with more, or extract "
                        f"a cache with fewer windows per video (`windows:` in the spec)")


def _check_layers(reader, layers: Sequence[str]) -> None:
    """One clear line when the cache's spec does not store a requested layer."""
    cached = ((getattr(reader, "spec", None) or {}).get("layers"))
    if cached is None:
        return
    missing = [x for x in layers if x not in cached]
    if missing:
        hint = (" (fine-tuned runs read 'prefix': re-extract with it in the spec's layers, or evaluate them with "
                "--data ROOT on the raw media)" if PREFIX in missing else "")
        raise DataError(f"{_where(reader)}: the cache holds no {', '.join(map(repr, missing))} layer "
                        f"(cached: {', '.join(cached)}){hint}")


def _want_text_window(reader, requested: bool | None) -> bool:
    spec = getattr(reader, "spec", {}) or {}
    cached = bool((spec.get("text") or {}).get("window_aligned", False))
    if requested and not cached:
        raise DataError(f"{_where(reader)}: the cache holds no window-aligned transcripts "
                        "(re-extract with text.window_aligned: true)")
    return cached if requested is None else bool(requested)


def _count_windows(rec, layers: Sequence[str], modalities: Sequence[str]) -> int:
    if "video" in modalities and layers:
        return int(rec.arrays[f"video/{layers[0]}"].shape[0])
    return max(len(rec.window_starts), 1)


def _segment_lengths(rec, modality: str, key: str, vid: str, reader) -> np.ndarray:
    """Tokens per encoder segment of one video, checked against its cached token count."""
    lengths = np.asarray(rec.arrays[key], dtype=np.int64).reshape(-1)
    tokens = rec.arrays.get(f"{modality}/prefix")
    if tokens is not None and int(lengths.sum()) != tokens.shape[0]:
        raise DataError(f"{_where(reader)}: video {vid!r}: {key} sum to {int(lengths.sum())} but "
                        f"{modality}/prefix has {tokens.shape[0]} tokens")
    return lengths


def _parts(lengths: list[np.ndarray]) -> Tensor:
    """Flat (T,) encoder-segment id of every token, restarting at 0 for each video."""
    flat = [np.repeat(np.arange(len(x), dtype=np.int64), x) for x in lengths]
    return torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64))


def _starts_tensor(starts: list[list[int]]) -> Tensor:
    w = max((len(s) for s in starts), default=0)
    out = torch.full((len(starts), max(w, 1)), -1, dtype=torch.long)
    for i, s in enumerate(starts):   # loading only
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _put_video(video: dict[str, Tensor], layer: str, arr: np.ndarray, i: int, n: int, vid: str, reader) -> None:
    if arr.ndim != 3:
        raise DataError(f"{_where(reader)}: video {vid!r}: video/{layer} has shape {arr.shape}, expected (W, L, D)")
    if layer not in video:
        # Preallocated once; later videos with more windows than the first are refused below.
        video[layer] = torch.zeros((n, *arr.shape), dtype=_torch_dtype(arr.dtype))
    have = video[layer]
    if tuple(arr.shape[1:]) != tuple(have.shape[2:]) or arr.shape[0] > have.shape[1]:
        if tuple(arr.shape[1:]) == tuple(have.shape[2:]):
            grown = torch.zeros((n, arr.shape[0], *have.shape[2:]), dtype=have.dtype)
            grown[:, : have.shape[1]] = have
            video[layer] = have = grown
        else:
            raise DataError(f"{_where(reader)}: video {vid!r}: video/{layer} tokens have shape "
                            f"{tuple(arr.shape[1:])}, other videos {tuple(have.shape[2:])}")
    have[i, : arr.shape[0]] = torch.from_numpy(np.ascontiguousarray(arr))


def _split_windows(flat: list[np.ndarray], lengths: list[np.ndarray], w: int, reader) -> list[np.ndarray]:
    """Per-video flat window text -> one array per (video, window) row, W rows per video (empty pads)."""
    out: list[np.ndarray] = []
    for arr, lens in zip(flat, lengths):
        if int(lens.sum()) != arr.shape[0]:
            raise DataError(f"{_where(reader)}: text_window_lengths sum {int(lens.sum())} != "
                            f"{arr.shape[0]} window-aligned text tokens")
        parts = np.split(arr, np.cumsum(lens)[:-1]) if len(lens) else []
        parts += [arr[:0]] * (w - len(parts))
        out += parts[:w]
    return out


def _torch_dtype(np_dtype) -> torch.dtype:
    return {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}.get(
        np.dtype(np_dtype), torch.float32)


def _where(reader) -> str:
    return str(reader.path)
