"""Streamed training (heads/stream.py): the same numbers as the in-memory path, bounded reads, checks kept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import heads.stream
from extract.store import CacheReader
from heads.data import DataError, load_split
from heads.stream import StreamSplit, prefetched, scan_split, should_stream
from heads.train import train_heads
from heads_fixtures import state_equal, tiny_model, tiny_train, write_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("stream") / "cache", sizes={"train": 24, "val": 14})


def _pair(cache, split: str, **kw):
    reader = CacheReader(cache)
    return load_split(reader, split, device="cpu", **kw), scan_split(reader, split, **kw)


@pytest.mark.parametrize("text_source,read_ahead", [("full", False), ("window", True)])
def test_streamed_training_gives_the_in_memory_numbers(cache, text_source, read_ahead, monkeypatch):
    """Read in the step's thread (the CPU default) or ahead in a background thread (as on an accelerator)."""
    monkeypatch.setattr(heads.stream, "READ_AHEAD_ON_CPU", read_ahead)
    (train, s_train), (val, s_val) = _pair(cache, "train"), _pair(cache, "val")
    assert isinstance(s_train, StreamSplit) and s_train.video_ids == train.video_ids
    assert torch.equal(s_train.n_windows, train.n_windows) and s_train.dims() == train.dims()
    assert torch.equal(s_val.labels, val.labels)
    # Small validation chunks, so the val split is read in several pieces.
    monkeypatch.setattr(heads.stream, "VAL_CHUNK_BYTES", 1)
    rows_read: list[int] = []
    read_rows = heads.stream.read_rows
    monkeypatch.setattr(heads.stream, "read_rows", lambda r, s, ids, *a, **k: rows_read.append(len(ids))
                        or read_rows(r, s, ids, *a, **k))
    cfg = tiny_train(epochs=2, patience=2, text_source=text_source, batch_size=2, accum=3, eval_batch_size=4)
    model_cfg = tiny_model(train, ffn_hidden=32)
    mem = train_heads(train, val, model_cfg, cfg)
    streamed = train_heads(s_train, s_val, model_cfg, cfg)
    assert [h.__dict__ for h in streamed.history] == [h.__dict__ for h in mem.history]
    assert streamed.val_metrics == mem.val_metrics and streamed.threshold == mem.threshold
    assert state_equal(streamed.model.state_dict(), mem.model.state_dict())
    # What was held at once: one accumulation group (6 videos) or one chunk of whole inference batches. Per
    # epoch 4 groups and 7 val chunks; reading ahead, the first val chunk is read once more after each
    # validation (for the next epoch, taken by the second; the last one's is never used).
    assert rows_read and max(rows_read) <= 6 and len(rows_read) == 2 * (4 + 7) + read_ahead


def test_streaming_verifies_every_array_once_and_checks_each_read(cache, tmp_path, monkeypatch):
    reader = CacheReader(cache)
    checked: list[bool] = []
    record = CacheReader.record
    monkeypatch.setattr(CacheReader, "record", lambda self, v, keys=None, check=False: checked.append(check)
                        or record(self, v, keys, check))
    s_train = scan_split(reader, "train")
    assert len(checked) == len(s_train) and all(checked)       # every video verified against its checksums

    # A streamed window that turns out NaN (the disk changed after the check) stops training in one line.
    def nan_window(self, vid, key, index):
        return np.full((8, 16), np.nan, dtype=np.float16)

    s_val = scan_split(reader, "val")
    monkeypatch.setattr(CacheReader, "window", nan_window)
    with pytest.raises(DataError, match=r"video/last contains NaN or Inf; repair it"):
        train_heads(s_train, s_val, tiny_model(s_train, ffn_hidden=32), tiny_train(epochs=1, patience=1))


def test_scan_refuses_a_corrupted_video_before_training(cache, tmp_path):
    import shutil

    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    reader = CacheReader(bad)
    vid = reader.video_ids("train")[3]
    unit = reader._attrs(vid)["_path"]                           # noqa: SLF001 - test reaches into the unit
    chunk = max((p for p in unit.rglob("*") if p.is_file() and "audio" in p.parts), key=lambda p: p.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="--repair"):
        scan_split(CacheReader(bad), "train")


def test_prefetched_keeps_order_raises_errors_and_stops_early():
    assert list(prefetched(range(7), lambda x: x * x, 2)) == [x * x for x in range(7)]

    def boom(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for x in prefetched(range(10), boom, 2):
            got.append(x)
    assert got == [0, 1, 2]
    made: list[int] = []
    for x in prefetched(range(1000), lambda x: made.append(x) or x, 2):
        if x == 1:
            break
    assert len(made) <= 5                                     # the thread stopped a few items ahead


def test_cli_streams_when_the_splits_do_not_fit(cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ahcli.app import app

    reader = CacheReader(cache)
    assert not should_stream(reader, ("train", "val"))
    monkeypatch.setattr(heads.stream, "available_bytes", lambda: 1000)
    assert should_stream(reader, ("train", "val"))
    args = ["--epochs", "2", "--patience", "2", "--dim", "16", "--head-hidden", "16", "--ffn-hidden", "32",
            "--device", "cpu", "--json"]
    streamed = CliRunner().invoke(app, ["train-heads", str(cache), str(tmp_path / "auto"), *args])
    assert streamed.exit_code == 0, streamed.output
    assert "streamed from the cache" in (tmp_path / "auto" / "train.log").read_text()
    mem = CliRunner().invoke(app, ["train-heads", str(cache), str(tmp_path / "mem"), "--in-memory", *args])
    assert mem.exit_code == 0, mem.output
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("auto", "mem"))
    assert a["val"] == b["val"] and a["best_epoch"] == b["best_epoch"]


def test_stream_goal_row_needs_the_ratio_and_the_same_history():
    from ahbench.heads import stream_goal_rows

    h = {"stream_epoch_vs_memory": 1.1, "stream_peak_rss_gb": 3.2, "identical_history": True, "stream_epoch_s": 1.1,
         "memory_epoch_s": 1.0, "stream_train_videos": 48, "stream_train_windows": 2, "stream_val_videos": 10,
         "stream_val_windows": 5, "stream_cache_gb": 0.5}
    assert stream_goal_rows({"heads": h})[0][2] == "yes"
    assert stream_goal_rows({"heads": h | {"stream_epoch_vs_memory": 1.3}})[0][2] == "no"
    row = stream_goal_rows({"heads": h | {"identical_history": False}})[0]
    assert row[2] == "no" and "DIFFERENT" in row[1]
    assert stream_goal_rows({"heads": None}) == []
