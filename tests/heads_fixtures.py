"""Shared helpers for the heads tests: small synthetic splits, tiny configs, and a real cache on disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from heads.data import SplitData
from heads.config import ModelConfig
from heads.config import TrainConfig

DIMS = (16, 12, 10)


def splits(n_train: int = 128, n_val: int = 64, dims=DIMS, signal: str = "conflict", **kw):
    train = SplitData.synthetic(n_train, dims=dims, seed=0, split="train", signal=signal, **kw)
    val = SplitData.synthetic(n_val, dims=dims, seed=1, split="val", signal=signal, **kw)
    return train, val


def tiny_model(data: SplitData, modalities: str = "vat", **kw) -> ModelConfig:
    kw = {"dim": 16, "head_hidden": 16, **kw}
    return ModelConfig(input_dims=data.dims(), modalities=modalities, **kw)


def tiny_train(**kw) -> TrainConfig:
    base = dict(epochs=6, patience=6, lr=1e-3, lr_min=1e-5, device="cpu")
    return TrainConfig(**{**base, **kw})


def write_cache(path: Path, sizes: dict[str, int] | None = None, dims=DIMS, windows=(3, 2), signal="conflict") -> Path:
    """A real cache (extract.cache_writer.CacheWriter) holding SplitData.synthetic splits, private unlabelled."""
    from extract.spec import ExtractionSpec, WindowSpec
    from extract.cache_writer import CacheWriter

    sizes = sizes or {"train": 32, "val": 16, "test": 16, "private": 4}
    spec = ExtractionSpec(windows=WindowSpec(frames=16, train=windows[0], eval=windows[1]))
    writer = CacheWriter(path, spec, provenance={"test": True})
    for k, (split, n) in enumerate(sizes.items()):
        w = windows[0] if split == "train" else windows[1]
        data = SplitData.synthetic(n, windows=w, dims=dims, seed=10 + k, split=split, signal=signal)
        for rec in records(data, labelled=split != "private"):
            writer.write(rec)
    writer.seal()
    return path


def records(data: SplitData, labelled: bool = True):
    from extract.record import VideoRecord

    w = data.max_windows
    tw = data.text_window["last"]
    for i, vid in enumerate(data.video_ids):
        a = data.audio["last"]
        t = data.text["last"]
        rows = list(range(i * w, (i + 1) * w))
        win_lengths = np.array([int(tw.lengths[r]) for r in rows], dtype=np.int64)
        win_tokens = tw.values[int(tw.offsets[rows[0]]) : int(tw.offsets[rows[-1] + 1])]
        yield VideoRecord(
            video_id=vid, split=data.split, label=int(data.labels[i]) if labelled else None,
            pid=vid.split("/")[1], question=1 + i % 7, fps=25.0, frame_count=100, duration=4.0,
            window_starts=list(range(0, 10 * w, 10)), padded=False,
            arrays={
                "video/last": data.video["last"][i].numpy(),
                "audio/last": a.values[int(a.offsets[i]) : int(a.offsets[i + 1])].numpy(),
                "text/last": t.values[int(t.offsets[i]) : int(t.offsets[i + 1])].numpy(),
                "text_window/last": win_tokens.numpy(),
                "text_window_lengths": win_lengths,
            },
        )


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
