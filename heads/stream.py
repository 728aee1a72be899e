"""Training over a split that is not held in memory: what an epoch needs is read from the cache as it goes.

A `StreamSplit` keeps only a split's metadata (ids, labels, window counts). Each epoch's accumulation group
(its videos, one drawn window each) is read as the step needs it (heads/load.py read_rows: one chunk of each
video array, the audio and transcript tokens), by a background thread a few groups ahead when training runs
on an accelerator (`_depth`), and validation reads whole videos in chunks of a bounded size. Memory is then
a few groups plus one validation chunk, whatever the split's size. The batches are built by the same code
from the same arrays as the in-memory path's (`SplitData.batches`), so a run gives the same numbers either
way for the same seed.

Checks: `scan_split` reads every video once before training, each array checked against its stored checksum
and for NaN/Inf (as load_split does); every later read is checked for NaN/Inf again.
"""
from __future__ import annotations

import functools
import itertools
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from extract.host_memory import available_bytes
from extract.vocab import LAST, MODALITIES
from heads.infer import WindowLogits, window_logits
from heads.load import ReadPlan, load_split, read_plan, read_rows, split_ids, split_nbytes, where
from heads.split_data import DataError, SplitData
from heads.tokens import Batch

T = TypeVar("T")
U = TypeVar("U")

PREFETCH_GROUPS = 4              # accumulation groups read ahead of the training step (on an accelerator)
READ_AHEAD_ON_CPU = False        # see `_depth`
VAL_CHUNK_BYTES = 256 * 2**20    # validation videos held at once (rounded to whole inference batches)
STREAM_HEADROOM = 0.7            # stream when the splits need more than this share of the available memory


@dataclass
class StreamSplit:
    """A split of the cache read as it is used (see the module doc); the parts of `SplitData`'s interface
    that training uses: labels, window counts, widths, `batches` and `window_logits`."""

    reader: Any
    split: str
    video_ids: list[str]
    labels: Tensor                                  # (N,) float32, NaN = unlabelled
    n_windows: Tensor                               # (N,) int64
    plan: ReadPlan
    widths: dict[str, dict[str, int]]               # layer -> modality -> token width
    video_bytes: int                                # most bytes one video's arrays take in memory
    _ahead: "_Ahead | None" = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def max_windows(self) -> int:
        return int(self.n_windows.max().item()) if len(self) else 0

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.plan.modalities

    def dims(self, layer: str = LAST) -> dict[str, int]:
        return dict(self.widths.get(layer, {}))

    def labelled(self) -> Tensor:
        return torch.nonzero(~torch.isnan(self.labels)).flatten()

    def has_window_text(self, layer: str) -> bool:
        return self.plan.want_window and layer in self.plan.layers

    def has_layer(self, modality: str, layer: str, text_source: str = "full") -> bool:
        """Whether batches of `modality` can be read at `layer` (the window-aligned text for 'window')."""
        if modality == "text" and text_source == "window":
            return self.has_window_text(layer)
        return modality in self.plan.modalities and layer in self.plan.layers

    def batches(self, rows: Tensor, windows: Tensor, size: int, **batch: Any) -> Iterator[Batch]:
        """The batches `SplitData.batches` would give, each read from the cache (a few ahead, in a thread)."""
        rows, windows = rows.cpu().tolist(), windows.cpu().tolist()
        spans = [(rows[s : s + size], windows[s : s + size]) for s in range(0, len(rows), size)]

        def read(span: tuple[list[int], list[int]]) -> SplitData:
            r, w = span
            return read_rows(self.reader, self.split, [self.video_ids[i] for i in r], self.plan, w, verify=False)

        for data in prefetched(spans, read, _depth(batch.get("device"), PREFETCH_GROUPS)):
            idx = torch.arange(len(data))
            yield data.batch(idx, torch.zeros_like(idx), **batch)

    def window_logits(self, model: torch.nn.Module, *, windows: int | None = None, batch_size: int = 64,
                      **kw: Any) -> WindowLogits:
        """heads.infer.window_logits over the split, read in chunks of whole inference batches (so every
        batch holds the same videos as over the split in memory)."""
        w = self.max_windows if not windows else min(int(windows), self.max_windows)
        per_batch = max(1, batch_size // max(w, 1))
        chunk = per_batch * max(1, VAL_CHUNK_BYTES // max(per_batch * self.video_bytes, 1))
        chunks = [self.video_ids[s : s + chunk] for s in range(0, len(self), chunk)]

        def read(ids: list[str]) -> SplitData:
            return read_rows(self.reader, self.split, ids, self.plan, verify=False)

        depth = _depth(next(model.parameters()).device, 1)
        ahead, self._ahead = self._ahead, None
        first = ahead.result() if ahead is not None and ahead.ids == chunks[0] else None
        datas = prefetched(chunks[1:] if first is not None else chunks, read, depth)
        parts = [window_logits(model, data, windows=w, span=w, batch_size=batch_size, **kw)
                 for data in itertools.chain([first] if first is not None else [], datas)]
        if depth:
            # The same first chunk is read again at the next epoch's validation: read it now, in the
            # background, while that epoch trains (memory: still one validation chunk).
            self._ahead = _Ahead(chunks[0], _reader_pool().submit(read, chunks[0]))
        text = None if parts[0].text is None else torch.cat([p.text for p in parts])
        return WindowLogits(torch.cat([p.full for p in parts]), text, torch.cat([p.valid for p in parts]))


def scan_split(reader, split: str, layers: Sequence[str] = (LAST,), *, modalities: Sequence[str] = MODALITIES,
               text_window: bool | None = None, progress: Callable[[int, int], None] | None = None,
               verify: bool = True, ids: Sequence[str] | None = None) -> StreamSplit:
    """A StreamSplit of `split` (or of its videos `ids`), after reading every video once (one or two at a
    time) with load_split's checks: checksums (with `verify`), NaN/Inf, shapes, equal widths across videos."""
    ids = split_ids(reader, split) if ids is None else list(ids)
    plan = read_plan(reader, layers, modalities, text_window)
    labels = torch.full((len(ids),), float("nan"))
    n_windows = torch.zeros(len(ids), dtype=torch.long)
    widths: dict[str, dict[str, int]] = {}

    def read(vid: str) -> SplitData:
        return read_rows(reader, split, [vid], plan, verify=verify)

    with ThreadPoolExecutor(2) as pool:       # file reads and decompression release the GIL (CRC32C does not)
        for i, one in enumerate(prefetched_pool(pool, ids, read, 2)):
            labels[i], n_windows[i] = one.labels[0], one.n_windows[0]
            for layer in plan.layers:
                dims = one.dims(layer)
                if widths.setdefault(layer, dims) != dims:
                    raise DataError(f"{where(reader)}: video {ids[i]!r}: token widths {dims} at layer {layer!r}, "
                                    f"other videos {widths[layer]}")
            if progress is not None:
                progress(i + 1, len(ids))
    video_bytes = max(reader.array_nbytes(v, plan.keys) for v in ids)
    return StreamSplit(reader, split, ids, labels, n_windows, plan, widths, video_bytes)


def should_stream(reader, splits: Sequence[str], layers: Sequence[str] = (LAST,), *,
                  modalities: Sequence[str] = MODALITIES, text_window: bool | None = None) -> bool:
    """True when `splits` together would take more than STREAM_HEADROOM of the available memory (from the
    units' declared shapes; nothing is read)."""
    have = available_bytes()
    if have is None:
        return False
    plan = read_plan(reader, layers, modalities, text_window)
    need = sum(split_nbytes(reader, split_ids(reader, s), plan) for s in splits)
    return need > STREAM_HEADROOM * have


def open_split(reader, split: str, layers: Sequence[str] = (LAST,), device: str | torch.device = "auto", *,
               stream: bool, modalities: Sequence[str] = MODALITIES, text_window: bool | None = None,
               progress: Callable[[int, int], None] | None = None) -> SplitData | StreamSplit:
    """`scan_split` when streaming, else `load_split`."""
    if stream:
        return scan_split(reader, split, layers, modalities=modalities, text_window=text_window, progress=progress)
    return load_split(reader, split, layers, device, modalities=modalities, text_window=text_window,
                      progress=progress)


# ---- reading ahead -----------------------------------------------------------------------------------

def _depth(device: torch.device | str | None, depth: int) -> int:
    """How far to read ahead in a background thread: `depth` when training runs on an accelerator (the host
    cores are free), none on the CPU, where the step already uses every core: on 2 cores a reader thread
    beside it made a BAH-shaped epoch 1.2-1.5x the in-memory one, reading in the step's own thread ~1.0x
    (bench-results/stream-bah-scale.md)."""
    on_cpu = torch.device(device if device is not None else "cpu").type == "cpu"
    return 0 if on_cpu and not READ_AHEAD_ON_CPU else depth


@dataclass(frozen=True)
class _Ahead:
    """A validation chunk being read before it is asked for."""
    ids: list[str]
    future: Future

    def result(self) -> SplitData:
        return self.future.result()


@functools.cache
def _reader_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-ahead")


_END = object()


def prefetched(items: Iterable[T], make: Callable[[T], U], depth: int) -> Iterator[U]:
    """make(item) for each item, in order, computed by a background thread at most `depth` results ahead.
    An error in `make` is raised here; leaving the loop early stops the thread. depth 0: no thread."""
    if depth <= 0:
        yield from map(make, items)
        return
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(x: Any) -> None:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                put((True, make(item)))
            put((True, _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, exc))

    thread = threading.Thread(target=run, name="stream-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                raise x
            if x is _END:
                return
            yield x
    finally:
        stop.set()
        thread.join()


def prefetched_pool(pool: ThreadPoolExecutor, items: Sequence[T], make: Callable[[T], U], depth: int) -> Iterator[U]:
    """make(item) for each item, in order, on `pool`, with at most `depth` items in flight."""
    pending = [pool.submit(make, it) for it in items[:depth]]
    for k in range(len(items)):
        result = pending.pop(0).result()
        if k + depth < len(items):
            pending.append(pool.submit(make, items[k + depth]))
        yield result
