"""The embedding cache: one folder = one extraction spec; one self-contained unit per video.

Layout of CACHE/:
    manifest.json          format, resolved spec, fingerprint, backend, dtype, provenance, created, sealed
    videos/<key>.zarr      Zarr v3 group (or videos/<key>.h5, one HDF5 file) per complete video
    errors/<key>.json      {video_id, split, message} for a video whose extraction failed
    index.json             written by seal(): the sorted list of complete videos with split and label
    listed.json            every video each split file lists, in file order (extract/listing.py)
    logs/                  one log per extraction run; .lock: the writer's lock while one runs (extract/locks.py)

A unit is written under a temporary dot-name in videos/ and renamed into place; the rename is the
"complete" mark, so a reader never sees a half-written video and a kill -9 at any moment leaves only a
temporary unit that the next writer removes. Each unit's attribute document holds the video's metadata
and a checksum per array (CRC32C; sha256 in units written before it, still read), so `verify` catches a
flipped byte. Several processes may write disjoint videos
concurrently: no shared file is written except the manifest at creation and by seal()/unseal.

    >>> r = CacheReader("cache")
    >>> rec = r.record(r.video_ids("train")[0], keys=["video/last"])
    >>> rec.arrays["video/last"].shape    # (W, 1568, 768) float16
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from extract.errors import AHError
from extract.files import read_json
from extract.record import (VideoRecord, array_sha256, canonical_json, check_declared, check_record, expected_arrays,
                            video_key)
from extract.spec import ExtractionSpec, SpecError, diff_fields, spec_from_dict
from extract.store_backends import Backend, get_backend

FORMAT = 2          # 2: the fingerprint is the resolved spec's (weights by content, preprocessing recorded)
MANIFEST = "manifest.json"
INDEX = "index.json"
VIDEOS = "videos"
ERRORS = "errors"


class CacheError(AHError):
    """A cache folder that is missing, of another spec, corrupt, or a record that cannot be stored."""


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, CacheError, what)


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------------------- manifest

_KINDS = {int: "an integer", dict: "an object", str: "a string", list: "a list"}


def index_problem(index: Any) -> str | None:
    """Why a parsed index.json is not one this tool wrote (None when its shape is sound)."""
    if not isinstance(index, dict) or not isinstance(index.get("videos"), list):
        return "not an index (an object with a 'videos' list)"
    for i, e in enumerate(index["videos"]):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("video_id", "key", "split")):
            return f"entry {i} is not {{video_id, key, split, label}} with string ids"
    return None


def load_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CacheError(f"{path}: not a cache (folder does not exist)")
    try:
        manifest = _read_json(path / MANIFEST, "manifest.json")
    except FileNotFoundError:
        raise CacheError(f"{path}: not a cache (no {MANIFEST})") from None
    if not isinstance(manifest, dict) or not {"format", "spec", "fingerprint", "backend"} <= set(manifest):
        raise CacheError(f"{path / MANIFEST}: not a cache manifest (missing format/spec/fingerprint/backend)")
    for key, kind in (("format", int), ("spec", dict), ("fingerprint", str), ("backend", str)):
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise CacheError(f"{path / MANIFEST}: '{key}' must be {_KINDS[kind]}, not {type(manifest[key]).__name__} "
                             "(edited by hand?); restore it, or re-extract into a new folder")
    if manifest["format"] > FORMAT:
        raise CacheError(f"{path}: cache format {manifest['format']} is newer than this tool's ({FORMAT})")
    try:
        get_backend(manifest["backend"])
    except ValueError as exc:
        raise CacheError(f"{path / MANIFEST}: {exc}") from None
    return manifest


def _numeric(spec_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec_dict.items() if k not in ("backend", "compress")}


def fingerprint_mismatch(path: Path, stored: dict[str, Any], wanted_fp: str, wanted_spec: dict[str, Any] | None) -> str:
    msg = f"{path}: cache fingerprint {stored['fingerprint']} does not match {wanted_fp}"
    if wanted_spec is not None:
        fields = diff_fields(_numeric(stored["spec"]), _numeric(wanted_spec))
        if fields:
            msg += f" (differing fields: {', '.join(fields)})"
    return msg


def unit_problems(backend: Backend, path: Path, fingerprint: str, dtype: str, expected: Sequence[str] | None,
                   video_id: str | None = None) -> list[str]:
    """All problems of one unit (raises when the unit cannot be read at all)."""
    attrs = backend.read_attrs(path)
    problems = []
    if attrs.get("fingerprint") != fingerprint:
        problems.append(f"written for fingerprint {attrs.get('fingerprint')}, cache is {fingerprint}")
    meta = attrs["meta"]
    if video_id is not None and meta.get("video_id") != video_id:
        problems.append(f"unit holds {meta.get('video_id')!r}")
    if path.name != video_key(meta["video_id"]) + backend.suffix:
        problems.append(f"stored under {path.name}, expected {video_key(meta['video_id'])}{backend.suffix}")
    arrays = backend.read_arrays(path, sorted(attrs["arrays"]))
    problems += check_declared(attrs, arrays)
    problems += check_record(meta, arrays, dtype, expected)
    return problems


class CacheReader:
    """Reads a cache, sealed or not. `expect_fingerprint` may be a fingerprint string or an
    ExtractionSpec (then a mismatch names the differing fields)."""

    def __init__(self, path: str | Path, expect_fingerprint: str | ExtractionSpec | None = None):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.spec: dict[str, Any] = self.manifest["spec"]
        self.fingerprint: str = self.manifest["fingerprint"]
        self.backend: Backend = get_backend(self.manifest["backend"])
        self.dtype: str = self.manifest.get("dtype", self.spec.get("dtype", "float16"))
        if expect_fingerprint is not None:
            if isinstance(expect_fingerprint, ExtractionSpec):
                want_fp, want_spec = expect_fingerprint.fingerprint(), expect_fingerprint.to_dict()
            else:
                want_fp, want_spec = str(expect_fingerprint), None
            if want_fp != self.fingerprint:
                raise CacheError(fingerprint_mismatch(self.path, self.manifest, want_fp, want_spec))
        self._meta_cache: dict[str, dict[str, Any]] | None = None
        self._unreadable: dict[str, str] = {}

    @property
    def sealed(self) -> bool:
        return bool(self.manifest.get("sealed"))

    def soundness_problem(self, split: str | None = None) -> str | None:
        """Why stage 2 must not read this cache (or one split of it) as it is, or None: not sealed (an
        extraction is running or was cut), a manifest that does not match its own spec, or units that
        index.json lists but that are gone or unreadable (or the reverse)."""
        if not self.sealed:
            return (f"{self.path}: the cache is not sealed (its extraction is running or was interrupted); finish it "
                    "by running the same `ahcli extract` again (it resumes)")
        if int(self.manifest.get("format", 1)) >= 2:
            try:
                own = spec_from_dict(self.spec).fingerprint()
            except (SpecError, TypeError) as exc:
                return f"{self.path / MANIFEST}: its spec does not read ({exc})"
            if own != self.fingerprint:
                return (f"{self.path / MANIFEST}: fingerprint {self.fingerprint} does not match its own spec ({own}): "
                        "the manifest was edited; re-extract into a new folder")
        index = self._index()
        problem = "missing" if index is None else index_problem(index)
        if problem:
            return f"{self.path / INDEX}: {problem}; run `ahcli cache verify`, then `ahcli extract` to rewrite it"
        indexed = {e.get("video_id"): e.get("split") for e in index["videos"] if isinstance(e, dict)}
        on_disk = set(self.video_ids(split))
        want = {v for v, s in indexed.items() if split is None or s == split}
        repair = "repair it with `ahcli extract DATA CACHE --spec SPEC --repair`"
        if want - on_disk:
            gone = sorted(want - on_disk)
            return (f"{self.path}: {len(gone)} video(s) listed in index.json are missing or unreadable on disk "
                    f"(first: {gone[0]}); {repair}")
        if on_disk - want:
            extra = sorted(on_disk - want)
            return (f"{self.path}: {len(extra)} video(s) on disk are not in index.json (the cache changed after it was "
                    f"sealed; first: {extra[0]}); {repair}")
        return None

    def _units(self) -> dict[str, Path]:
        return self.backend.list_units(self.path / VIDEOS)

    def _metas(self) -> dict[str, dict[str, Any]]:
        """video_id -> unit attributes for every unit on disk whose attributes read (renamed = complete)."""
        if self._meta_cache is None:
            metas, self._unreadable = {}, {}
            for key, p in sorted(self._units().items()):
                try:
                    attrs = self.backend.read_attrs(p)
                    attrs["_path"] = p
                    metas[attrs["meta"]["video_id"]] = attrs
                except Exception as exc:  # noqa: BLE001 - reported by verify(), skipped by listings
                    self._unreadable[key] = f"{exc.__class__.__name__}: {exc}"
            self._meta_cache = metas
        return self._meta_cache

    def meta(self, video_id: str) -> dict[str, Any]:
        return self._attrs(video_id)["meta"]

    def inputs(self, video_id: str) -> dict[str, Any] | None:
        """The input signature the unit was written with (extract/inputs.py); None for older units."""
        return self._attrs(video_id).get("inputs")

    def _attrs(self, video_id: str) -> dict[str, Any]:
        try:
            return self._metas()[video_id]
        except KeyError:
            key = video_key(video_id)
            if key in self._unreadable:
                raise CacheError(f"{self.path}: the unit of {video_id!r} is unreadable ({self._unreadable[key]}); "
                                 f"run `ahcli cache verify` and re-extract with --repair") from None
            raise CacheError(f"{self.path}: no complete video {video_id!r} in the cache") from None

    def video_ids(self, split: str | None = None) -> list[str]:
        return sorted(v for v, a in self._metas().items() if split is None or a["meta"]["split"] == split)

    def array_names(self, video_id: str) -> list[str]:
        return sorted(self._attrs(video_id)["arrays"])

    def array_nbytes(self, video_id: str, names: Sequence[str]) -> int:
        """Bytes the named arrays take in memory, from the unit's declared shapes (nothing is read)."""
        arrays = self._attrs(video_id)["arrays"]
        return sum(int(np.prod(arrays[n]["shape"])) * np.dtype(arrays[n]["dtype"]).itemsize
                   for n in names if n in arrays)

    def record(self, video_id: str, keys: Sequence[str] | None = None, check: bool = False) -> VideoRecord:
        """Metadata plus the requested arrays (all when keys is None); `check` also verifies checksums."""
        attrs = self._attrs(video_id)
        names = sorted(attrs["arrays"]) if keys is None else list(keys)
        missing = [k for k in names if k not in attrs["arrays"]]
        if missing:
            raise CacheError(f"{self.path}: video {video_id!r} has no array(s) {', '.join(missing)} "
                             f"(stored: {', '.join(sorted(attrs['arrays']))})")
        try:
            arrays = self.backend.read_arrays(attrs["_path"], names)
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"{attrs['_path']}: unreadable ({exc.__class__.__name__}: {exc}); "
                             f"run `ahcli cache verify` and re-extract with --repair") from exc
        if check:
            bad = check_declared(attrs, arrays)
            if bad:
                raise CacheError(f"{attrs['_path']}: {bad[0]}")
        return VideoRecord(**attrs["meta"], arrays=arrays)

    def window(self, video_id: str, key: str, index: int) -> np.ndarray:
        """One window of a video array, e.g. window(v, 'video/last', 3) -> (Lv, Dv): reads one chunk."""
        return self.backend.read_window(self._attrs(video_id)["_path"], key, index)

    def errors(self) -> list[dict[str, Any]]:
        out = []
        folder = self.path / ERRORS
        if folder.is_dir():
            for p in sorted(folder.glob("*.json")):
                if not p.name.startswith("."):
                    try:
                        entry = json.loads(p.read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        entry = None
                    if not isinstance(entry, dict) or not isinstance(entry.get("video_id"), str):
                        entry = {"video_id": p.stem, "split": None, "message": f"unreadable error file {p}"}
                    out.append(entry)
        return sorted(out, key=lambda e: str(e.get("video_id")))

    # -- content identity
    def _video_digest(self, video_id: str, deep: bool) -> dict[str, Any]:
        attrs = self._attrs(video_id)
        decl = attrs["arrays"]
        # The digest is sha256 of the content whatever checksum a unit declares (older units declare sha256,
        # newer ones crc32c): `deep=False` can trust only a declared sha256, so crc32c units are read.
        if deep or not all(isinstance(d.get("sha256"), str) for d in decl.values()):
            arrays = self.backend.read_arrays(attrs["_path"], sorted(decl))
            shas = {n: array_sha256(a) for n, a in arrays.items()}
            shapes = {n: [list(a.shape), str(a.dtype)] for n, a in arrays.items()}
        else:
            shas = {n: d["sha256"] for n, d in decl.items()}
            shapes = {n: [d["shape"], d["dtype"]] for n, d in decl.items()}
        return {"meta": attrs["meta"],
                "arrays": [[n, shapes[n][1], shapes[n][0], shas[n]] for n in sorted(decl)]}

    def digest(self, deep: bool = True) -> str:
        """sha256 over every complete video in video_id order: canonical metadata JSON and each array's
        name, dtype, shape and bytes. Content only: zarr and hdf5 caches of one extraction agree.
        `deep=False` trusts the per-array sha256 stored at write time by older units (fast; `verify` checks
        them); units that declare CRC32C are read and hashed either way."""
        h = hashlib.sha256()
        for v in self.video_ids():
            h.update(canonical_json(self._video_digest(v, deep)))
            h.update(b"\n")
        return h.hexdigest()

    def info(self, deep_digest: bool = True) -> dict[str, Any]:
        metas = self._metas()
        splits: dict[str, dict[str, Any]] = {}
        for a in metas.values():
            s = splits.setdefault(a["meta"]["split"], {"videos": 0, "positive": 0, "bytes": 0})
            s["videos"] += 1
            label = a["meta"]["label"]
            s["positive"] = None if label is None or s["positive"] is None else s["positive"] + int(label == 1)
            s["bytes"] += _dir_bytes(a["_path"]) if a["_path"].is_dir() else a["_path"].stat().st_size
        errors = self.errors()
        return {
            "path": str(self.path), "format": self.manifest["format"], "fingerprint": self.fingerprint,
            "backend": self.backend.name, "dtype": self.dtype, "sealed": self.sealed,
            "created": self.manifest.get("created"), "provenance": self.manifest.get("provenance"),
            "spec": self.spec, "splits": dict(sorted(splits.items())), "complete": len(metas),
            "errors": len(errors), "error_videos": [e.get("video_id") for e in errors],
            "unreadable_units": len(self._unreadable), "bytes": _dir_bytes(self.path),
            "digest": self.digest(deep=deep_digest),
        }

    # -- integrity
    def verify(self) -> list[dict[str, str]]:
        """Every problem found, one {"video_id", "problem"} per problem; empty when the cache is sound."""
        self._meta_cache = None
        metas = self._metas()
        index = self._index()
        out = []
        if index is not None and (problem := index_problem(index)):
            out.append({"video_id": INDEX, "problem": f"{problem} (edited by hand?); `ahcli extract` rewrites it"})
            index = None
        by_key = {e["key"]: e["video_id"] for e in (index or {}).get("videos", [])}
        for key, err in sorted(self._unreadable.items()):
            out.append({"video_id": by_key.get(key) or key, "problem": f"unreadable unit ({err})"})
        expected = expected_arrays(self.spec)
        for v, attrs in sorted(metas.items()):
            try:
                problems = unit_problems(self.backend, attrs["_path"], self.fingerprint, self.dtype, expected)
            except Exception as exc:  # noqa: BLE001 - a truncated chunk, a broken HDF5 file...
                problems = [f"unreadable ({exc.__class__.__name__}: {exc})"]
            out += [{"video_id": v, "problem": p} for p in problems]
        if index is not None:
            out += self._verify_index(index, metas)
        return out

    def _index(self) -> dict[str, Any] | None:
        try:
            return _read_json(self.path / INDEX, "index.json")
        except FileNotFoundError:
            return None

    def _verify_index(self, index: dict[str, Any], metas: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
        out = []
        listed = {e["video_id"]: e for e in index.get("videos", [])}
        unreadable_ids = {e.get("video_id") for e in index.get("videos", []) if e.get("key") in self._unreadable}
        for v, e in sorted(listed.items()):
            if v not in metas:
                if v not in unreadable_ids:
                    out.append({"video_id": v, "problem": "listed in index.json but missing on disk"})
                continue
            m = metas[v]["meta"]
            if (e.get("split"), e.get("label")) != (m["split"], m["label"]):
                out.append({"video_id": v, "problem": f"index.json says split={e.get('split')} label={e.get('label')}, "
                                                      f"the unit says split={m['split']} label={m['label']}"})
        for v in sorted(set(metas) - set(listed)):
            out.append({"video_id": v, "problem": "on disk but not in index.json (cache changed after seal)"})
        return out

    def bad_videos(self) -> list[str]:
        """The video_ids `verify` flags (for `extract --repair`: discard these, then re-extract)."""
        return sorted({p["video_id"] for p in self.verify()})


def iter_records(reader: CacheReader, video_ids: Iterable[str], keys: Sequence[str] | None = None):
    """Records one at a time (bounded memory when loading a split)."""
    for v in video_ids:
        yield reader.record(v, keys)
