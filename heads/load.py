"""Reading a split of the cache into a `SplitData`, every array checked (checksum, NaN/Inf) as it is read.

`load_split` reads a whole split once (the in-memory path). `read_rows` is the same reader for any list of
videos, optionally one chosen window per video: heads/stream.py builds each accumulation group and each
validation chunk with it, so a streamed batch holds exactly the tensors the in-memory batch would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from extract.devices import resolve_device
from extract.errors import AHError
from extract.host_memory import available_bytes
from extract.value_scan import all_finite
from extract.vocab import LAST, MODALITIES, PREFIX, SEGMENTS
from heads.split_data import DataError, SplitData
from heads.tokens import Ragged

REPAIR = "repair it with `ahcli extract DATA CACHE --spec SPEC --repair` (re-extracts only the bad videos)"


@dataclass(frozen=True)
class ReadPlan:
    """Which cached arrays a load reads for each video."""
    layers: tuple[str, ...]
    modalities: tuple[str, ...]
    want_window: bool                                        # window-aligned transcript tokens
    seg_keys: dict[str, str] = field(default_factory=dict)   # modality -> its segment-lengths array

    @property
    def keys(self) -> list[str]:
        keys = [f"{m}/{layer}" for m in self.modalities for layer in self.layers]
        if self.want_window and self.layers:
            keys += [f"text_window/{layer}" for layer in self.layers] + ["text_window_lengths"]
        return keys + list(self.seg_keys.values())

    @property
    def ragged_keys(self) -> list[str]:
        return [k for k in self.keys if "/" in k and not k.startswith("video/")]


def read_plan(reader, layers: Sequence[str] = (LAST,), modalities: Sequence[str] = MODALITIES,
              text_window: bool | None = None) -> ReadPlan:
    """The arrays to read (see load_split for the arguments); refuses layers the cache does not hold."""
    layers = tuple(layers)
    _check_layers(reader, layers)
    want_window = _want_text_window(reader, text_window) and "text" in modalities
    seg_keys = {m: SEGMENTS[m] for m in SEGMENTS if m in modalities and PREFIX in layers}
    return ReadPlan(layers, tuple(modalities), want_window, seg_keys)


def split_ids(reader, split: str) -> list[str]:
    """The split's videos, after refusing a cache stage 2 must not read (unsealed, index mismatch)."""
    problem = reader.soundness_problem(split)
    if problem is not None:
        raise DataError(problem)
    ids = reader.video_ids(split)
    if not ids:
        raise DataError(f"{where(reader)}: split {split!r} has no complete videos in the cache")
    return ids


def split_nbytes(reader, ids: Sequence[str], plan: ReadPlan) -> int:
    """Bytes the videos' arrays take in memory, from the units' declared shapes (nothing is read)."""
    return sum(reader.array_nbytes(vid, plan.keys) for vid in ids)


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
    e.g. to run encoders on the raw media at the cache's windows. A split larger than the available memory
    is refused before reading (heads/stream.py streams one instead).
    """
    ids = split_ids(reader, split)
    plan = read_plan(reader, layers, modalities, text_window)
    check_memory(reader, split, split_nbytes(reader, ids, plan))
    data = read_rows(reader, split, ids, plan, verify=verify, progress=progress)
    target = placement(data.nbytes(), resolve_device(device))
    return data.to(target) if target.type != "cpu" else data


def read_rows(reader, split: str, ids: Sequence[str], plan: ReadPlan, windows: Sequence[int] | None = None, *,
              verify: bool = True, progress: Callable[[int, int], None] | None = None) -> SplitData:
    """A SplitData of the videos `ids` (in that order). With `windows`, only window windows[i] of video i is
    read (one chunk of its video array; its window-aligned transcript): each row then holds one window."""
    n = len(ids)
    labels = np.full(n, np.nan, dtype=np.float32)
    n_windows = np.zeros(n, dtype=np.int64)
    video: dict[str, Tensor] = {}
    ragged: dict[str, list] = {k: [] for k in plan.ragged_keys}
    win_lengths: list[np.ndarray] = []
    seg_lengths: dict[str, list[np.ndarray]] = {m: [] for m in plan.seg_keys}
    starts: list[list[int]] = []
    video_keys = [k for k in plan.keys if k.startswith("video/")] if windows is not None else []
    keys = [k for k in plan.keys if k not in video_keys]
    for i, vid in enumerate(ids):
        rec = checked_record(reader, vid, keys, verify)
        for k in video_keys:                     # one window: read its chunk alone
            rec.arrays[k] = _checked_window(reader, vid, k, int(windows[i]))
        if rec.label is not None:
            labels[i] = float(rec.label)
        if "video" in plan.modalities:
            for layer in plan.layers:
                _put_video(video, layer, rec.arrays[f"video/{layer}"], i, n, vid, reader)
        n_windows[i] = 1 if windows is not None else _count_windows(rec, plan.layers, plan.modalities)
        for k in ragged:
            arr = rec.arrays[k]
            if arr.ndim != 2:
                raise DataError(f"{where(reader)}: video {vid!r}: {k} has shape {arr.shape}, expected (L, D)")
            ragged[k].append(arr)
        if plan.want_window and plan.layers:
            win_lengths.append(np.asarray(rec.arrays["text_window_lengths"], dtype=np.int64))
        for m, key in plan.seg_keys.items():
            seg_lengths[m].append(_segment_lengths(rec, m, key, vid, reader))
        s = list(rec.window_starts)
        starts.append(s if windows is None else s[int(windows[i]) : int(windows[i]) + 1])
        if progress is not None:
            progress(i + 1, n)

    data = SplitData(split, list(ids), torch.from_numpy(labels), torch.from_numpy(n_windows), video,
                     starts=_starts_tensor(starts))
    for k, arrays in ragged.items():
        kind, layer = k.split("/", 1)
        dims = {int(a.shape[1]) for a in arrays}
        if len(dims) != 1:
            raise DataError(f"{where(reader)}: {k} has differing widths across videos: {sorted(dims)}")
        dtype = _torch_dtype(arrays[0].dtype)
        if kind == "text_window":
            if windows is None:
                arrays = _split_windows(arrays, win_lengths, data.max_windows, reader)
            else:
                arrays = [_split_windows([a], [lens], int(w) + 1, reader)[int(w)]
                          for a, lens, w in zip(arrays, win_lengths, windows)]
        getattr(data, kind)[layer] = Ragged.from_arrays(arrays, dims.pop(), dtype)
        if kind in seg_lengths:
            getattr(data, kind)[layer].parts = _parts(seg_lengths[kind])
    return data


def checked_record(reader, vid: str, keys: Sequence[str], verify: bool):
    """A video's record with every requested array present, finite and (with `verify`) matching its checksum."""
    try:
        rec = reader.record(vid, keys, check=verify)
    except AHError as exc:
        raise DataError(f"{exc}; {REPAIR}") from exc
    missing = [k for k in keys if k not in rec.arrays]
    if missing:
        raise DataError(f"{where(reader)}: video {vid!r} lacks cached array(s) {', '.join(missing)}")
    for k, arr in rec.arrays.items():
        _check_finite(reader, vid, k, arr)
    return rec


def _checked_window(reader, vid: str, key: str, index: int) -> np.ndarray:
    """One window of a video array as (1, L, D), finite (its checksum covers the whole array: a streamed
    split verifies every array once before training, heads/stream.py)."""
    try:
        arr = np.asarray(reader.window(vid, key, index))
    except AHError as exc:
        raise DataError(f"{exc}; {REPAIR}") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated chunk, a broken HDF5 file...
        raise DataError(f"{where(reader)}: video {vid!r}: {key} window {index} unreadable "
                        f"({exc.__class__.__name__}: {exc}); {REPAIR}") from exc
    _check_finite(reader, vid, key, arr)
    return arr[None]


def _check_finite(reader, vid: str, key: str, arr: np.ndarray) -> None:
    if not all_finite(arr):
        raise DataError(f"{where(reader)}: video {vid!r}: {key} contains NaN or Inf; {REPAIR}")


def check_memory(reader, split: str, need: int) -> None:
    """Refuse, before reading, a split that cannot fit in the host's available memory: the alternative is
    the kernel killing the process minutes into the load, without a word. (A split bound for the GPU is
    built on the host first.)"""
    have = available_bytes()
    if have is not None and need > have:
        raise DataError(f"{where(reader)}: the {split} split needs {need / 1e9:.1f} GB of memory and "
                        f"{have / 1e9:.1f} GB is available; free memory, use a machine with more, stream it "
                        f"(`ahcli train-heads --stream`), or extract a cache with fewer windows per video "
                        f"(`windows:` in the spec)")


def _check_layers(reader, layers: Sequence[str]) -> None:
    """One clear line when the cache's spec does not store a requested layer."""
    cached = ((getattr(reader, "spec", None) or {}).get("layers"))
    if cached is None:
        return
    missing = [x for x in layers if x not in cached]
    if missing:
        hint = (" (fine-tuned runs read 'prefix': re-extract with it in the spec's layers, or evaluate them with "
                "--data ROOT on the raw media)" if PREFIX in missing else "")
        raise DataError(f"{where(reader)}: the cache holds no {', '.join(map(repr, missing))} layer "
                        f"(cached: {', '.join(cached)}){hint}")


def _want_text_window(reader, requested: bool | None) -> bool:
    spec = getattr(reader, "spec", {}) or {}
    cached = bool((spec.get("text") or {}).get("window_aligned", False))
    if requested and not cached:
        raise DataError(f"{where(reader)}: the cache holds no window-aligned transcripts "
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
        raise DataError(f"{where(reader)}: video {vid!r}: {key} sum to {int(lengths.sum())} but "
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
        raise DataError(f"{where(reader)}: video {vid!r}: video/{layer} has shape {arr.shape}, expected (W, L, D)")
    if layer not in video:
        # Preallocated once, not zeroed: each row is written whole below (its missing windows zeroed).
        video[layer] = torch.empty((n, *arr.shape), dtype=_torch_dtype(arr.dtype))
    have = video[layer]
    if tuple(arr.shape[1:]) != tuple(have.shape[2:]) or arr.shape[0] > have.shape[1]:
        if tuple(arr.shape[1:]) == tuple(have.shape[2:]):
            grown = torch.zeros((n, arr.shape[0], *have.shape[2:]), dtype=have.dtype)
            grown[:, : have.shape[1]] = have
            video[layer] = have = grown
        else:
            raise DataError(f"{where(reader)}: video {vid!r}: video/{layer} tokens have shape "
                            f"{tuple(arr.shape[1:])}, other videos {tuple(have.shape[2:])}")
    rows = have.numpy()                          # numpy copies fp16 ~10x cheaper than torch slice assignment
    rows[i, : arr.shape[0]] = arr
    rows[i, arr.shape[0]:] = 0


def _split_windows(flat: list[np.ndarray], lengths: list[np.ndarray], w: int, reader) -> list[np.ndarray]:
    """Per-video flat window text -> one array per (video, window) row, W rows per video (empty pads)."""
    out: list[np.ndarray] = []
    for arr, lens in zip(flat, lengths):
        if int(lens.sum()) != arr.shape[0]:
            raise DataError(f"{where(reader)}: text_window_lengths sum {int(lens.sum())} != "
                            f"{arr.shape[0]} window-aligned text tokens")
        parts = np.split(arr, np.cumsum(lens)[:-1]) if len(lens) else []
        parts += [arr[:0]] * (w - len(parts))
        out += parts[:w]
    return out


def _torch_dtype(np_dtype) -> torch.dtype:
    return {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}.get(
        np.dtype(np_dtype), torch.float32)


def where(reader) -> str:
    return str(reader.path)
