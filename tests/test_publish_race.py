"""Two writers publishing one video's unit at the same moment: the second rename meets a non-empty folder
(ENOTEMPTY) and must retry, not crash with an OSError traceback; the cache stays sound."""
from __future__ import annotations

import os
import shutil

import extract.cache_writer as cw
from extract.store import CacheReader
from test_store import fill, make_record, make_spec, records


def test_a_unit_published_by_another_writer_meanwhile_is_replaced_not_a_crash(tmp_path, monkeypatch):
    spec = make_spec("zarr")
    writer = fill(tmp_path / "c", spec, records(), seal=False)
    rival = make_record(records()[0].video_id, seed=7)
    final = writer.unit_path(rival.video_id)
    real_rename = os.rename
    raced = []

    def rename(src, dst):
        # Just before our unit goes into place, the other writer's copy of the same video lands there.
        if str(src).rsplit("/", 1)[-1].startswith(".tmp.") and dst == final and not raced:
            shutil.copytree(src, final)
            raced.append(True)
        return real_rename(src, dst)

    monkeypatch.setattr(cw.os, "rename", rename)
    writer.write(rival)
    monkeypatch.undo()
    assert raced, "the race was not staged"
    writer.seal()
    reader = CacheReader(tmp_path / "c")
    assert not reader.verify()
    assert not [p for p in final.parent.iterdir() if p.name.startswith((".tmp.", ".trash."))]
