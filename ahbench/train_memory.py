"""Peak memory and epoch time of `train-heads` over a cache, in memory or streamed, in a process of its own
(so the peak RSS is this training's alone). Prints one JSON line.

    python -m ahbench.train_memory CACHE [--stream] [--epochs 3] [--train-videos N] [--val-videos M]
    python -m ahbench.train_memory CACHE --compare 3 [--train-videos N] [--val-videos M]

--train-videos / --val-videos take the first N / M videos of each split (0: all), e.g. to compare the two
paths on a subset whose in-memory run fits the machine. The model and protocol are the paper defaults.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import typer

from extract.store import CacheReader
from heads.config import ModelConfig, TrainConfig
from heads.load import read_plan, read_rows, split_ids
from heads.stream import scan_split
from heads.train import train_heads


def rss_gb() -> float:
    """Resident memory of this process now, from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9     # Linux: KiB


def epoch_seconds(train, val, epochs: int, device: str) -> tuple[list[float], list[dict]]:
    """Seconds of each epoch (train + val + threshold sweep) of a fresh paper-default run, and its history."""
    ends: list[float] = []
    t0 = time.perf_counter()
    result = train_heads(train, val, ModelConfig(input_dims=train.dims()),
                         TrainConfig(epochs=epochs, patience=epochs, device=device),
                         on_epoch=lambda rec, prog: ends.append(time.perf_counter()))
    return [b - a for a, b in zip([t0, *ends[:-1]], ends)], [h.__dict__ for h in result.history]


def main(
    cache: Path = typer.Argument(..., help="Cache folder."),
    stream: bool = typer.Option(False, "--stream/--in-memory", help="Stream the splits instead of loading them."),
    compare: int = typer.Option(0, help="Instead: load both ways and alternate this many 2-epoch runs of each "
                                "(timing side by side on a busy machine); reports the least 2nd-epoch time of each."),
    epochs: int = typer.Option(3, help="Epochs to train (no early stop)."),
    train_videos: int = typer.Option(0, help="First N train videos only (0: all)."),
    val_videos: int = typer.Option(0, help="First M val videos only (0: all)."),
    device: str = typer.Option("cpu", help="Training device."),
) -> None:
    """Train over CACHE and print {peak RSS, load seconds, epoch seconds, history} as one JSON line."""
    reader = CacheReader(cache)
    plan = read_plan(reader, text_window=False)       # what train-heads reads (text_source 'full')
    t = time.perf_counter()
    loaded: dict[bool, list] = {}
    for streamed in ((False, True) if compare else (stream,)):
        loaded[streamed] = []
        for split, n in (("train", train_videos), ("val", val_videos)):
            ids = split_ids(reader, split)
            ids = ids[:n] if n else ids
            loaded[streamed].append(scan_split(reader, split, ids=ids, text_window=False) if streamed
                                    else read_rows(reader, split, ids, plan))
    load_s = time.perf_counter() - t
    rss_loaded = rss_gb()
    train, val = loaded[stream]
    out = {"train_videos": len(train), "val_videos": len(val), "train_windows": int(train.n_windows.max()),
           "val_windows": int(val.n_windows.max()), "load_s": load_s, "rss_after_load_gb": rss_loaded}
    if compare:
        best = {False: float("inf"), True: float("inf")}
        histories = {}
        for _ in range(compare):
            for streamed in (False, True):
                times, histories[streamed] = epoch_seconds(*loaded[streamed], 2, device)
                best[streamed] = min(best[streamed], times[1])
        out |= {"compare_runs": compare, "memory_epoch_s": best[False], "stream_epoch_s": best[True],
                "stream_epoch_vs_memory": best[True] / best[False],
                "identical_history": histories[False] == histories[True]}
    else:
        epoch_s, history = epoch_seconds(train, val, epochs, device)
        out |= {"stream": stream, "epoch_s": epoch_s, "history": history}
    print(json.dumps(out | {"peak_rss_gb": peak_rss_gb()}))


if __name__ == "__main__":
    typer.run(main)
