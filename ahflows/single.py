"""One video as a one-row `SplitData`, through the same loader the trainer and `evaluate` use.

`heads.data.load_split` reads a split from anything with `video_ids(split)`, `record(video_id, keys)`,
`spec` and `path`. Two such views let `explain` (one cached video) and `predict` (a recording encoded on
the fly) run exactly the inference code of `evaluate`, with the cache's layout rules (window-aligned text
rows, ragged audio/text) and no second implementation of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from extract.errors import AHError
from extract.record import VideoRecord
from extract.store import CacheReader
from heads.data import SplitData, load_split
from heads.infer import data_needs
from heads.runs import Run


class VideoNotFound(AHError):
    """A video id that the cache does not hold (complete)."""


class CachedVideo:
    """A view of a CacheReader that holds only `video_id` (in its own split)."""

    def __init__(self, reader: CacheReader, video_id: str):
        self.reader = reader
        self.video_id = video_id
        if video_id not in set(reader.video_ids()):
            near = [v for v in reader.video_ids() if video_id.rsplit("/", 1)[-1] in v][:3]
            hint = f"; did you mean {', '.join(near)}?" if near else " (ids look like Videos/<pid>/Visite_1/<name>.mp4)"
            raise VideoNotFound(f"{reader.path}: no complete video {video_id!r}{hint}")
        self.split = reader.meta(video_id)["split"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.reader.spec

    @property
    def path(self) -> Path:
        return Path(self.reader.path)

    def array_nbytes(self, video_id: str, names: Sequence[str]) -> int:
        return self.reader.array_nbytes(video_id, names)

    def soundness_problem(self, split: str | None = None) -> str | None:
        return self.reader.soundness_problem(self.split)

    def video_ids(self, split: str | None = None) -> list[str]:
        return [self.video_id] if split in (None, self.split) else []

    def record(self, video_id: str, keys: Sequence[str] | None = None, check: bool = False) -> VideoRecord:
        return self.reader.record(video_id, keys, check)


class MemoryVideo:
    """A reader over one `extract.record.VideoRecord` held in memory (a recording encoded on the fly)."""

    def __init__(self, record: VideoRecord, spec: dict[str, Any], where: str = "recording"):
        self.rec = record
        self.spec = spec
        self.path = Path(where)
        self.split = record.split

    def video_ids(self, split: str | None = None) -> list[str]:
        return [self.rec.video_id] if split in (None, self.split) else []

    def soundness_problem(self, split: str | None = None) -> str | None:
        return None                                    # just encoded, nothing stored to doubt

    def array_nbytes(self, video_id: str, names: Sequence[str]) -> int:
        return sum(int(self.rec.arrays[k].nbytes) for k in names if k in self.rec.arrays)

    def record(self, video_id: str, keys: Sequence[str] | None = None, check: bool = False) -> VideoRecord:
        """The encoded recording's arrays (just computed: there is no stored checksum to check)."""
        names = list(self.rec.arrays) if keys is None else list(keys)
        missing = [k for k in names if k not in self.rec.arrays]
        if missing:
            raise AHError(f"{self.path}: the encoded recording lacks array(s) {', '.join(missing)}")
        return VideoRecord(**self.rec.meta(), arrays={k: self.rec.arrays[k] for k in names})


def load_video(view: CachedVideo | MemoryVideo, runs: Sequence[Run]) -> SplitData:
    """The one-row SplitData of `view` holding every modality, layer and text source the runs read."""

    needs = data_needs(runs)
    return load_split(view, view.split, layers=needs.layers, device="cpu", modalities=needs.modalities,
                      text_window=needs.text_window)


__all__ = ["CachedVideo", "MemoryVideo", "VideoNotFound", "load_video"]
