"""The extraction loop: BAH tree -> frozen encoders -> cache.

Decoding runs in DataLoader workers (one video per item: its windows' frames, its audio, its text), the
encoders run in the main process, and finished videos are written by a background thread so the device
never waits on the disk. Each video's windows go through the video encoder together as one batch, so a
video's numbers never depend on which other videos ran beside it: a resumed run, or one sharded across
processes with torchrun, writes the same bytes as a single uninterrupted run.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from extract.bah import Video, read_bah
from extract.cache_writer import CacheWriter
from extract.decode import decode_windows
from extract.devices import resolve_device
from extract.dist import Dist, all_sum, barrier, init_distributed, shard
from extract.encoders import FrozenEncoders, load_encoders
from extract.errors import AHError
from extract.faults import fault_point
from extract.host_memory import keep_freed_memory
from extract.inputs import changed_inputs, describe_change, input_signature
from extract.listing import write_listed
from extract.locks import acquire as acquire_lock
from extract.locks import release as release_lock
from extract.precision import check_precision, resolve_precision
from extract.provenance import provenance
from extract.record import VideoRecord
from extract.spec import ExtractionSpec, load_spec
from extract.stopping import never, quiet_worker
from extract.store import CacheReader
from extract.vocab import SPLITS
from extract.windows import window_starts

# Writes hash, check and fsync each video: parallel threads keep them off the device's critical path.
WRITE_THREADS = max(2, min(8, os.cpu_count() or 2))


@dataclass
class ExtractOptions:
    splits: tuple[str, ...] = SPLITS
    device: str = "auto"
    batch_size: int = 16          # clips per video-encoder forward (a video's windows, split if larger)
    workers: int = 2              # DataLoader decoding processes; 0 decodes in the main process
    force: bool = False           # wipe a cache made with another spec and start over
    repair: bool = False          # verify the cache first and re-extract only the videos it finds bad
    private_root: Path | None = None
    allow_symlinks: bool = False
    progress: bool = True
    precision: str = "auto"       # encoder forwards: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16, fp32

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise AHError(f"--batch-size must be >= 1 and --workers >= 0 (got {self.batch_size} and {self.workers})")
        check_precision(self.precision)


@dataclass
class ExtractSummary:
    cache: Path
    extracted: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (video_id, problem): odd but extracted
    clips: int = 0
    seconds: float = 0.0
    # Where this process's loop time went (PHASES); the rest is bookkeeping (progress bar, error files).
    phases: dict[str, float] = field(default_factory=dict)
    total: int = 0                # videos this run set out to extract (not already complete)
    done: int = 0                 # of those, handled before the end (or the interruption)
    interrupted: bool = False     # stopped early (a signal): the cache is left unsealed, a rerun resumes it

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"cache": str(self.cache), "extracted": self.extracted, "skipped": self.skipped,
                "failed": dict(sorted(self.failed.items())), "notes": [list(n) for n in self.notes],
                "clips": self.clips, "seconds": round(self.seconds, 3), "clips_per_s": round(self.clips_per_s, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()}, "total": self.total,
                "done": self.done, "interrupted": self.interrupted}


@dataclass
class DecodedVideo:
    """Everything the encoders need for one video, decoded in a worker."""

    video: Video
    starts: list[int]
    clips: torch.Tensor | None    # (W, T, S, S, 3) uint8; a tensor travels from workers by shared memory
    wave: np.ndarray | None       # float32 mono
    window_texts: list[str]
    padded: bool
    error: str | None = None


# The main loop's wall time, by what it was doing. The encoders copy their outputs to the host, so on CUDA an
# encoder's time includes the device finishing its work.
PHASES = ("waiting for decoding", "video encoder", "audio encoder", "text encoder", "assembling records",
          "waiting for cache writes")


@contextmanager
def _timed(phases: dict[str, float] | None, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def phase_report(summary: ExtractSummary) -> str:
    """One line: where the loop's time went, with a hint when the device mostly waited on the host."""
    total = summary.seconds
    if total <= 0 or not summary.phases:
        return ""
    parts = [f"{name} {summary.phases[name]:.1f} s ({summary.phases[name] / total:.0%})"
             for name in PHASES if name in summary.phases]
    line = f"time {total:.1f} s: " + ", ".join(parts)
    decoding, writes = (summary.phases.get(p, 0.0) for p in ("waiting for decoding", "waiting for cache writes"))
    if max(decoding, writes) > 0.3 * total:  # the longer wait is the bottleneck
        line += ("; decoding is the bottleneck: raise --workers" if decoding >= writes else
                 "; the cache writes are the bottleneck: a faster disk, or `backend: hdf5` in the spec")
    return line


def window_count(spec: ExtractionSpec, split: str) -> int:
    return spec.windows.train if split == "train" else spec.windows.eval


def decode_video(video: Video, spec: ExtractionSpec) -> DecodedVideo:
    """Decode the face frames of every window, the audio and the window-aligned transcript of one video."""
    length = spec.windows.frames
    n = video.frame_count
    starts = window_starts(video.video_id, n, window_count(spec, video.split), length, spec.seed)
    try:
        got = decode_windows(video, starts, spec, texts=spec.text.window_aligned)
    except AHError as exc:
        return DecodedVideo(video, starts, None, None, [], n < length, error=str(exc))
    except Exception as exc:  # a decoder bug on one file must not stop the others
        return DecodedVideo(video, starts, None, None, [], n < length, error=f"{video.mp4}: {type(exc).__name__}: {exc}")
    return DecodedVideo(video, starts, torch.from_numpy(got.clips), got.wave, got.texts, n < length)


class _DecodeSet(Dataset):
    def __init__(self, videos: Sequence[Video], spec: ExtractionSpec):
        self.videos, self.spec = list(videos), spec

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> DecodedVideo:
        return decode_video(self.videos[i], self.spec)


def _as_array(parts: list[torch.Tensor], dtype: np.dtype) -> np.ndarray:
    """Concatenated host tensors as the cache's dtype, copying only where needed (a video's tokens are ~20 MB)."""
    t = parts[0] if len(parts) == 1 else torch.cat(parts)
    return t.numpy().astype(dtype, copy=False)


def encode_video_record(decoded: DecodedVideo, encoders: FrozenEncoders, spec: ExtractionSpec, batch_size: int,
                        phases: dict[str, float] | None = None) -> VideoRecord:
    """Run the three encoders on one decoded video and assemble its cache record (timing each into `phases`)."""
    v = decoded.video
    dtype = np.dtype(spec.dtype)
    parts: dict[str, list[torch.Tensor]] = {}
    with _timed(phases, "video encoder"):
        for lo in range(0, len(decoded.clips), batch_size):
            for layer, t in encoders.encode_video(decoded.clips[lo:lo + batch_size]).items():
                parts.setdefault(layer, []).append(t)
    with _timed(phases, "audio encoder"):
        audio = encoders.encode_audio(decoded.wave)
    with _timed(phases, "text encoder"):
        text = encoders.encode_text(v.transcript)
        per_window = encoders.encode_texts(decoded.window_texts) if spec.text.window_aligned else []
    with _timed(phases, "assembling records"):
        arrays = {f"video/{layer}": _as_array(ts, dtype) for layer, ts in parts.items()}
        arrays.update({f"audio/{layer}": _as_array([t], dtype) for layer, t in audio.items()})
        arrays.update({f"text/{layer}": _as_array([t], dtype) for layer, t in text.items()})
        if "prefix" in spec.layers:
            arrays["audio_segments"] = np.array(encoders.audio_segment_lengths(len(decoded.wave)), dtype=np.int64)
            arrays["text_segments"] = np.array(encoders.text_segment_lengths(v.transcript), dtype=np.int64)
        if spec.text.window_aligned:
            for layer in per_window[0]:
                arrays[f"text_window/{layer}"] = _as_array([w[layer] for w in per_window], dtype)
            arrays["text_window_lengths"] = np.array([len(w[spec.layers[0]]) for w in per_window], dtype=np.int64)
    return VideoRecord(
        video_id=v.video_id, split=v.split, label=v.label, pid=v.pid, question=v.question,
        fps=float(v.fps), frame_count=int(v.frame_count), duration=float(v.duration),
        window_starts=list(decoded.starts), padded=decoded.padded, arrays=arrays,
    )


@dataclass
class ExtractProgress:
    """What `on_progress` is told after each video of this process's share."""

    video_id: str
    done: int                     # videos handled this run (extracted or failed)
    total: int                    # videos this run has to handle
    clips: int                    # clips encoded this run
    failed: int
    seconds: float                # since the loop started


def extract(data_root: Path, cache_path: Path, spec_path: Path, opts: ExtractOptions,
            on_progress: Callable[[ExtractProgress], None] | None = None,
            encoders: FrozenEncoders | None = None, *, should_stop: Callable[[], bool] = never,
            on_ready: Callable[[Path, Dist], None] | None = None) -> ExtractSummary:
    """Extract every video of the chosen splits that the cache does not already hold complete.

    `encoders` replaces the spec's models (the benchmark's instant encoders time the host side alone).
    `should_stop` is asked after each video: when it says so the loop lets the videos in flight finish, leaves
    the cache unsealed (a rerun resumes it) and returns with `summary.interrupted`. `on_ready(cache, dist)`
    is called once the cache is open and (rank 0) locked, e.g. to start a log file in it."""
    dist = init_distributed()
    keep_freed_memory()                       # every batch's outputs are large blocks: reuse, not page faults
    spec = load_spec(spec_path)
    device = str(resolve_device(opts.device))
    if device == "cuda" and dist.active:
        device = f"cuda:{dist.local_rank}"
    used = resolve_precision(opts.precision, device)        # half precision on the CPU: refused before any work
    dataset = read_bah(data_root, private_root=opts.private_root, splits=opts.splits, allow_symlinks=opts.allow_symlinks)
    encoders = encoders if encoders is not None else load_encoders(spec, device=device, precision=opts.precision)
    spec = encoders.spec                      # resolved: preprocessing from the models, weights by content
    # CPU results depend on the intra-op thread count (HuBERT's convolutions): recorded with the versions.
    prov = {**provenance(), "torch_threads": torch.get_num_threads(), "unused_weights": encoders.loading_report(),
            "precision": getattr(encoders, "precision", used)}       # the manifest records what the forwards used
    # Rank 0 holds the cache's writer lock for the whole job and creates (or wipes) the cache before the
    # others open it; a second extraction on this cache (not one of our ranks) is refused.
    locked = dist.rank == 0
    if locked:
        acquire_lock(cache_path, "cache")
    try:
        writer = CacheWriter(cache_path, spec, prov, force=opts.force) if dist.rank == 0 else None
        if writer is not None:
            write_listed(cache_path, dataset.listed, dataset.sources)
        barrier(dist)
        if writer is None:
            writer = CacheWriter(cache_path, spec, prov, force=False)
        if on_ready is not None:
            on_ready(Path(cache_path), dist)
        return _extract_share(dataset, spec, encoders, writer, opts, dist, on_progress, should_stop)
    finally:
        if locked:
            release_lock(cache_path)


def _extract_share(dataset, spec: ExtractionSpec, encoders: FrozenEncoders, writer: CacheWriter,
                   opts: ExtractOptions, dist: Dist, on_progress, should_stop) -> ExtractSummary:
    cache_path = writer.path
    summary = ExtractSummary(cache=Path(cache_path))
    readable = {v.video_id for v in dataset.videos}
    lost = {p.video_id: p for p in dataset.problems if p.fatal and p.video_id not in readable}
    for video_id, problem in sorted(lost.items())[dist.rank::dist.world]:
        writer.record_error(video_id, problem.split or "unknown", problem.problem)
        summary.failed[video_id] = problem.problem
    summary.notes = sorted((p.video_id, p.problem) for p in dataset.problems if p.video_id not in lost)

    mine = shard(dataset.videos, dist)
    if opts.repair:
        bad = {p["video_id"] for p in CacheReader(cache_path).verify()}
        for v in mine:
            if v.video_id in bad:
                writer.discard(v.video_id)
    signatures = {v.video_id: input_signature(v, spec.text.window_aligned) for v in mine}
    todo = []
    for v in mine:
        if not writer.is_complete(v.video_id):
            todo.append(v)
        elif changed := changed_inputs(writer.recorded_inputs(v.video_id), signatures[v.video_id]):
            todo.append(v)                 # its media or transcript was edited: encode it again
            summary.notes.append((v.video_id, describe_change(changed) + ": extracted again"))
    summary.skipped = len(mine) - len(todo)
    summary.total = len(todo)
    pending_ids = {v.video_id for v in todo}
    for v in mine:
        if v.video_id not in pending_ids:  # complete and sound: an error file left by a killed run is stale
            writer.clear_error(v.video_id)
            if writer.relabel(v.video_id, v.split, v.label):      # a corrected split file: metadata only
                summary.notes.append((v.video_id, f"split/label updated to {v.split}/{v.label} from the split file"))

    start = time.perf_counter()
    _run_loop(todo, spec, encoders, writer, opts, summary, on_progress, should_stop, signatures)
    summary.seconds = time.perf_counter() - start
    if summary.interrupted:
        return summary                     # unsealed: the same command resumes it

    barrier(dist)
    if dist.rank == 0:
        writer.seal()
    if dist.active:
        summary = _gather_summary(summary, Path(cache_path), dist)
    return summary


def _run_loop(todo: list[Video], spec: ExtractionSpec, encoders: FrozenEncoders, writer: CacheWriter,
              opts: ExtractOptions, summary: ExtractSummary,
              on_progress: Callable[[ExtractProgress], None] | None, should_stop: Callable[[], bool],
              signatures: dict[str, dict[str, str]]) -> None:
    loader = DataLoader(
        _DecodeSet(todo, spec), batch_size=None, shuffle=False, num_workers=opts.workers,
        collate_fn=lambda x: x, prefetch_factor=2 if opts.workers > 0 else None,
        persistent_workers=False, worker_init_fn=partial(quiet_worker, os.getpid()),
    )
    pending: list[Future] = []
    phases = summary.phases
    start = time.perf_counter()
    if on_progress is not None:               # a first line at once (the first video also loads the models)
        on_progress(ExtractProgress("", 0, len(todo), 0, 0, 0.0))
    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as io, _progress(opts.progress, len(todo)) as bar:
        items = iter(loader)
        for done in range(1, len(todo) + 1):
            if should_stop():              # the videos in flight are written below; the rest wait for a rerun
                summary.interrupted = True
                break
            with _timed(phases, "waiting for decoding"):
                decoded = next(items)
            vid = decoded.video.video_id
            if decoded.error is not None:
                writer.record_error(vid, decoded.video.split, decoded.error)
                summary.failed[vid] = decoded.error
            else:
                try:
                    record = encode_video_record(decoded, encoders, spec, opts.batch_size, phases)
                    record.inputs = signatures[vid]
                except AHError as exc:
                    writer.record_error(vid, decoded.video.split, str(exc))
                    summary.failed[vid] = str(exc)
                else:
                    fault_point("video_encoded")
                    summary.clips += len(decoded.starts)
                    pending.append(io.submit(_write, writer, record))
                    summary.extracted += 1
            summary.done = done
            # Bounded records in flight: bounded memory, writes still overlap compute.
            with _timed(phases, "waiting for cache writes"):
                while len(pending) > 2 * WRITE_THREADS:
                    _settle(pending.pop(0), writer, summary)
            bar.advance(summary.clips)
            if on_progress is not None:
                on_progress(ExtractProgress(vid, done, len(todo), summary.clips, len(summary.failed),
                                            time.perf_counter() - start))
        with _timed(phases, "waiting for cache writes"):
            for f in pending:
                _settle(f, writer, summary)
        del items                          # shut the decoding workers down before the writes are counted


def _write(writer: CacheWriter, record: VideoRecord) -> tuple[VideoRecord, str | None]:
    try:
        writer.write(record)
    except AHError as exc:  # e.g. NaN/Inf in an encoder output: this video fails, the others go on
        return record, str(exc)
    writer.clear_error(record.video_id)
    return record, None


def _settle(future: Future, writer: CacheWriter, summary: ExtractSummary) -> None:
    record, error = future.result()
    if error is not None:
        writer.record_error(record.video_id, record.split, error)
        summary.failed[record.video_id] = error
        summary.extracted -= 1


class _progress:
    """A rich progress bar with videos/s and clips/s (on a terminal), or nothing when progress is off."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self.start = time.perf_counter()

    def __enter__(self) -> "_progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self.p.__enter__()
            self.task = self.p.add_task("extract", total=self.total, rate="")
        return self

    def advance(self, clips: int) -> None:
        if not self.enabled:
            return
        self.p.advance(self.task)
        el = max(time.perf_counter() - self.start, 1e-9)
        done = self.p.tasks[0].completed
        self.p.update(self.task, rate=f"{done / el:.2f} videos/s  {clips / el:.1f} clips/s")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.p.__exit__(*exc)


def _gather_summary(s: ExtractSummary, cache_path: Path, dist: Dist) -> ExtractSummary:
    """Sum the ranks' counts; the failures are read back from the cache's error files (all ranks wrote there).
    Time and phases stay this rank's own."""
    extracted, skipped, clips, total, done = all_sum(dist, [s.extracted, s.skipped, s.clips, s.total, s.done])
    failed = {e["video_id"]: e["message"] for e in CacheReader(cache_path).errors()}
    return ExtractSummary(cache=s.cache, extracted=extracted, skipped=skipped, failed=failed, notes=s.notes,
                          clips=clips, seconds=s.seconds, phases=s.phases, total=total, done=done)
