"""Writing the cache: one spec per folder, one atomic unit per video (see extract/store.py for the layout)."""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from extract.faults import fault_point
from extract.files import atomic_write_json, fsync_path, owner_dead, remove, tmp_name
from extract.locks import LOCK_FILE
from extract.record import LENGTHS, VideoRecord, check_record, expected_arrays, nonfinite_problem, video_key
from extract.spec import ExtractionSpec
from extract.store import (ERRORS, FORMAT, INDEX, MANIFEST, VIDEOS, CacheError, CacheReader, fingerprint_mismatch,
                           load_manifest, unit_problems)
from extract.store_backends import Backend, get_backend
from extract.value_scan import ValueScan
from extract.vocab import SEGMENTS

PUBLISH_TRIES = 5


class CacheWriter:
    """Writes videos into a cache for one spec. Safe for several processes writing disjoint videos.

    `force=True` wipes an existing cache of another spec: call it in one process (rank 0) before others
    open the folder.
    """

    def __init__(self, path: str | Path, spec: ExtractionSpec, provenance: dict[str, Any], force: bool = False):
        self.path = Path(path)
        self.spec = spec
        self.fingerprint = spec.fingerprint()
        self.backend: Backend = get_backend(spec.backend)
        self.provenance = dict(provenance)
        self._expected = expected_arrays(spec.to_dict())
        self._open(force)
        (self.path / VIDEOS).mkdir(exist_ok=True)
        (self.path / ERRORS).mkdir(exist_ok=True)
        self._clean_leftovers()
        self._unsealed = False

    # -- opening
    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "spec": self.spec.to_dict(), "fingerprint": self.fingerprint,
            "backend": self.spec.backend, "dtype": self.spec.dtype, "compress": self.spec.compress,
            "provenance": self.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sealed": False,
        }

    def _open(self, force: bool) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise CacheError(f"{p}: exists and is not a folder")
        if p.is_dir() and not (p / MANIFEST).exists() and any(x for x in p.iterdir() if not x.name.startswith(".")):
            raise CacheError(f"{p}: folder is not empty and is not a cache (no {MANIFEST}); refusing to write into it")
        if (p / MANIFEST).exists():
            stored = load_manifest(p)
            problem = self._conflict(stored)
            if problem is None:
                return
            if not force:
                raise CacheError(f"{problem}; pass --force to wipe it and start over")
            for child in p.iterdir():
                if child.name != LOCK_FILE:          # our own writer lock (extract/locks.py) stays held
                    remove(child)
        p.mkdir(parents=True, exist_ok=True)
        self._create_manifest()

    def _conflict(self, stored: dict[str, Any]) -> str | None:
        if stored["fingerprint"] != self.fingerprint:
            return fingerprint_mismatch(self.path, stored, self.fingerprint, self.spec.to_dict())
        if stored["backend"] != self.spec.backend:
            return (f"{self.path}: cache backend is {stored['backend']}, the spec asks for {self.spec.backend} "
                    f"(differing fields: backend)")
        return None

    def _create_manifest(self) -> None:
        """Exclusive create through a hard link, so concurrent ranks agree on one manifest."""
        tmp = self.path / tmp_name("tmp", MANIFEST)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._manifest(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fault_point("create_manifest")
        try:
            os.link(tmp, self.path / MANIFEST)
        except FileExistsError:
            problem = self._conflict(load_manifest(self.path))
            if problem:
                raise CacheError(problem) from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(self.path)

    def _clean_leftovers(self) -> None:
        """Remove temporary units/files of writers that died (kill -9) before renaming them into place."""
        for folder in (self.path, self.path / VIDEOS, self.path / ERRORS):
            for entry in folder.iterdir():
                if entry.name.startswith((".tmp.", ".trash.")) and owner_dead(entry.name):
                    remove(entry)

    # -- units
    def unit_path(self, video_id: str) -> Path:
        return self.path / VIDEOS / (video_key(video_id) + self.backend.suffix)

    def is_complete(self, video_id: str, deep: bool = True) -> bool:
        """The unit exists, loads, matches its checksums and is consistent (what a resume may skip).
        `deep=False` only checks that it was renamed into place and its metadata reads (no array reads)."""
        path = self.unit_path(video_id)
        try:
            if not deep:
                return path.exists() and self.backend.read_attrs(path)["meta"]["video_id"] == video_id
            return not unit_problems(self.backend, path, self.fingerprint, self.spec.dtype, self._expected, video_id)
        except Exception:  # noqa: BLE001 - any failure to load means "not complete"
            return False

    def recorded_inputs(self, video_id: str) -> dict[str, Any] | None:
        """The input signature a complete unit was written with (None: none recorded)."""
        return self.backend.read_attrs(self.unit_path(video_id)).get("inputs")

    def write(self, record: VideoRecord) -> None:
        """Store one video atomically (temporary unit renamed into place); replaces an older unit."""
        meta = record.meta()
        arrays = {name: self._cast(name, a) for name, a in sorted(record.arrays.items())}
        problems = check_record(meta, arrays, self.spec.dtype, self._expected, values=False)
        if problems:
            raise CacheError(f"{record.video_id}: cannot cache this video: {'; '.join(problems)}")

        # NaN/Inf and checksums come from the backend's scans of the bytes it wrote (extract/value_scan.py).
        def attrs(scans: dict[str, ValueScan]) -> dict[str, Any]:
            bad = [nonfinite_problem(n) for n, scan in sorted(scans.items()) if not scan.finite]
            if bad:
                raise CacheError(f"{record.video_id}: cannot cache this video: {'; '.join(bad)}")
            return {
                "format": FORMAT, "fingerprint": self.fingerprint, "meta": meta,
                "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape), "crc32c": scans[n].crc32c}
                           for n, a in arrays.items()},
                "written_by": self.provenance, "inputs": dict(record.inputs),
            }

        final = self.unit_path(record.video_id)
        tmp = final.parent / tmp_name("tmp", final.name)
        try:
            self.backend.write_unit(tmp, attrs, arrays, self.spec.compress)
        except BaseException:
            remove(tmp)
            raise
        fault_point("unit_written")
        self._unseal()
        self._publish(tmp, final)
        self.clear_error(record.video_id)

    def _cast(self, name: str, arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        if name == LENGTHS or name in SEGMENTS.values():
            return np.ascontiguousarray(arr, dtype=np.int64)
        if arr.dtype.kind != "f":
            raise CacheError(f"{name}: expected a float array, got {arr.dtype}")
        with np.errstate(over="ignore"):  # fp16 overflow becomes Inf, refused by check_record
            return np.ascontiguousarray(arr, dtype=self.spec.dtype)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename `tmp` into place, moving an older unit aside first. Another writer of the same video (two jobs
        on one cache despite the lock, e.g. on a file system without working locks) may publish in between:
        then a folder unit cannot be renamed over a non-empty one (ENOTEMPTY), so move theirs aside and retry;
        both hold the same spec's output for the same video, and the last one wins."""
        trashed = []
        for attempt in range(PUBLISH_TRIES):
            if final.exists():
                trashed.append(final.parent / tmp_name("trash", final.name))
                os.rename(final, trashed[-1])
            try:
                os.rename(tmp, final)  # the complete mark
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == PUBLISH_TRIES - 1:
                    raise
        fault_point("unit_renamed")
        fsync_path(final.parent)
        for trash in trashed:
            remove(trash)

    def relabel(self, video_id: str, split: str, label: int | None) -> bool:
        """Give a complete unit the split and label its split file now says, without re-encoding: a copy of the
        unit with the new metadata is published in its place (atomic, like a write). True when it changed."""
        final = self.unit_path(video_id)
        attrs = self.backend.read_attrs(final)
        meta = attrs["meta"]
        if (meta["split"], meta["label"]) == (split, None if label is None else int(label)):
            return False
        attrs["meta"] = {**meta, "split": split, "label": None if label is None else int(label)}
        tmp = final.parent / tmp_name("tmp", final.name)
        try:
            self.backend.copy_unit(final, tmp, attrs)
        except BaseException:
            remove(tmp)
            raise
        self._unseal()
        self._publish(tmp, final)
        return True

    def discard(self, video_id: str) -> bool:
        """Delete a video's unit (e.g. one `verify` flagged) so the next run re-extracts it."""
        final = self.unit_path(video_id)
        if not final.exists():
            return False
        self._unseal()
        trash = final.parent / tmp_name("trash", final.name)
        os.rename(final, trash)
        fsync_path(final.parent)
        remove(trash)
        return True

    # -- errors
    def _error_path(self, video_id: str) -> Path:
        return self.path / ERRORS / (video_key(video_id) + ".json")

    def record_error(self, video_id: str, split: str, message: str) -> None:
        atomic_write_json(self._error_path(video_id), {"video_id": video_id, "split": split, "message": message},
                          indent=1, sort_keys=True)

    def clear_error(self, video_id: str) -> None:
        p = self._error_path(video_id)
        if p.exists():
            p.unlink(missing_ok=True)
            fsync_path(p.parent)

    # -- sealing
    def _unseal(self) -> None:
        """A write after seal() makes index.json stale: drop it and mark the manifest unsealed (once)."""
        if self._unsealed:
            return
        manifest = load_manifest(self.path)
        if manifest.get("sealed") or (self.path / INDEX).exists():
            # Manifest first: a kill in between leaves "unsealed + old index", which the next call removes.
            if manifest.get("sealed"):
                manifest["sealed"] = False
                manifest.pop("sealed_at", None)
                atomic_write_json(self.path / MANIFEST, manifest, indent=1, sort_keys=True)
            (self.path / INDEX).unlink(missing_ok=True)
        self._unsealed = True

    def seal(self) -> None:
        """Write index.json (every complete video, sorted) and mark the manifest sealed. Run once, at the end."""
        reader = CacheReader(self.path, self.fingerprint)
        videos = [{"video_id": v, "key": video_key(v), "split": a["meta"]["split"], "label": a["meta"]["label"]}
                  for v, a in sorted(reader._metas().items())]
        errors = sorted(reader.errors(), key=lambda e: e["video_id"])
        atomic_write_json(self.path / INDEX, {"fingerprint": self.fingerprint, "videos": videos, "errors": errors},
                          indent=1, sort_keys=True)
        fault_point("seal_index")
        manifest = load_manifest(self.path)
        manifest["sealed"] = True
        manifest["sealed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.path / MANIFEST, manifest, indent=1, sort_keys=True)
        self._unsealed = False
