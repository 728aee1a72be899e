"""The embedding cache: one folder = one extraction spec; one self-contained unit per video.

Layout of CACHE/:
    manifest.json          format, resolved spec, fingerprint, backend, dtype, provenance, created, sealed
    videos/<key>.zarr      Zarr v3 group (or videos/<key>.h5, one HDF5 file) per complete video
    errors/<key>.json      {video_id, split, message} for a video whose extraction failed
    index.json             written by seal(): the sorted list of complete videos with split and label

A unit is written under a temporary dot-name in videos/ and renamed into place; the rename is the
"complete" mark, so a reader never sees a half-written video and a kill -9 at any moment leaves only a
temporary unit that the next writer removes. Each unit's attribute document holds the video's metadata
and a sha256 per array, so `verify` catches a flipped byte. Several processes may write disjoint videos
concurrently: no shared file is written except the manifest at creation and by seal()/unseal.

    >>> r = CacheReader("cache")
    >>> rec = r.record(r.video_ids("train")[0], keys=["video/last"])
    >>> rec.arrays["video/last"].shape    # (W, 1568, 768) float16
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from extract.errors import AHError
from extract.faults import fault_point
from extract.spec import ExtractionSpec, diff_fields
from extract.store_backends import Backend, fsync_path, get_backend

FORMAT = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
VIDEOS = "videos"
ERRORS = "errors"
META_FIELDS = ("video_id", "split", "label", "pid", "question", "fps", "frame_count", "duration",
               "window_starts", "padded")
LENGTHS = "text_window_lengths"
SEGMENTS = {"audio": "audio_segments", "text": "text_segments"}  # tokens per encoder segment
_PREFIXES = ("video/", "audio/", "text/", "text_window/")


class CacheError(AHError):
    """A cache folder that is missing, of another spec, corrupt, or a record that cannot be stored."""


@dataclass
class VideoRecord:
    video_id: str
    split: str
    label: int | None
    pid: str
    question: int
    fps: float
    frame_count: int
    duration: float
    window_starts: list[int]
    padded: bool
    # 'video/<layer>': (W, Lv, Dv); 'audio/<layer>': (La, Da); 'text/<layer>': (Lt, Dt);
    # 'text_window/<layer>': (sum of per-window lengths, Dt) with 'text_window_lengths': (W,) int64
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The scalar fields as plain JSON types (numpy scalars converted), the canonical metadata."""
        return {
            "video_id": str(self.video_id),
            "split": str(self.split),
            "label": None if self.label is None else int(self.label),
            "pid": str(self.pid),
            "question": int(self.question),
            "fps": float(self.fps),
            "frame_count": int(self.frame_count),
            "duration": float(self.duration),
            "window_starts": [int(s) for s in self.window_starts],
            "padded": bool(self.padded),
        }


# ----------------------------------------------------------------------------------------- helpers

def video_key(video_id: str) -> str:
    """A filesystem-safe, collision-free unit name: readable part of the id plus a short hash."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", video_id.removesuffix(".mp4")).strip("_")[-80:] or "video"
    return f"{safe}-{hashlib.sha256(video_id.encode()).hexdigest()[:12]}"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_name(kind: str, rest: str) -> str:
    """'.tmp.<pid>.<host>.<rand>.<rest>': the owner is recorded so only dead owners' leftovers are removed."""
    return f".{kind}.{os.getpid()}.{_host()}.{uuid.uuid4().hex[:8]}.{rest}"


def _owner_dead(name: str) -> bool:
    """True for a temporary name whose writer is gone (same host, pid not running) or is unparseable."""
    parts = name.split(".", 5)
    if len(parts) < 6 or parts[1] not in ("tmp", "trash") or not parts[2].isdigit():
        return True
    if parts[3] != _host():
        return False  # another machine's writer on a shared filesystem: not ours to judge
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    """tmp file + fsync + os.replace + fsync of the folder: readers see the old or the new file, whole."""
    path = Path(path)
    tmp = path.parent / _tmp_name("tmp", path.name)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fault_point("json_replace")
    os.replace(tmp, path)
    fsync_path(path.parent)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: {what} is unreadable or not valid JSON ({exc.__class__.__name__})") from exc


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def provenance(repo: Path | None = None) -> dict[str, Any]:
    """Library versions and the git commit, recorded by every artifact (cache, run folder, report)."""
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "zarr", "h5py", "numpy"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    out["git_commit"], out["git_dirty"] = "unknown", None
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if head.returncode == 0:
            out["git_commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
            out["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ------------------------------------------------------------------------------- record checking

def expected_arrays(spec: dict[str, Any]) -> list[str]:
    """The array names every video of a cache made with `spec` (a spec dict) must hold."""
    names = []
    for layer in spec.get("layers", ["last"]):
        names += [f"video/{layer}", f"audio/{layer}", f"text/{layer}"]
        if spec.get("text", {}).get("window_aligned"):
            names.append(f"text_window/{layer}")
    if spec.get("text", {}).get("window_aligned"):
        names.append(LENGTHS)
    if "prefix" in spec.get("layers", ["last"]):
        names += list(SEGMENTS.values())  # exact top-block attention over long audio / text
    return sorted(names)


def check_record(meta: dict[str, Any], arrays: dict[str, np.ndarray], dtype: str,
                 expected: Sequence[str] | None) -> list[str]:
    """Every way the metadata and arrays of one video can be inconsistent, as short phrases."""
    problems = []
    n_windows = len(meta.get("window_starts") or [])
    if n_windows < 1:
        problems.append("no window starts")
    if expected is not None:
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing:
            problems.append(f"missing array(s) {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected array(s) {', '.join(extra)}")
    for name, arr in sorted(arrays.items()):
        if name == LENGTHS:
            if arr.ndim != 1 or arr.dtype != np.int64:
                problems.append(f"{LENGTHS}: expected (W,) int64, got {arr.shape} {arr.dtype}")
            elif len(arr) != n_windows:
                problems.append(f"{LENGTHS}: {len(arr)} entries for {n_windows} windows")
            elif (arr < 0).any():
                problems.append(f"{LENGTHS}: negative length")
            continue
        if name in SEGMENTS.values():
            modality = next(m for m, n in SEGMENTS.items() if n == name)
            rows = next((a.shape[0] for k, a in arrays.items() if k.startswith(modality + "/")), None)
            if arr.ndim != 1 or arr.dtype != np.int64:
                problems.append(f"{name}: expected (S,) int64, got {arr.shape} {arr.dtype}")
            elif rows is not None and int(arr.sum()) != rows:
                problems.append(f"{name}: segments sum to {int(arr.sum())} but {modality} has {rows} tokens")
            continue
        if not name.startswith(_PREFIXES) or name.count("/") != 1:
            problems.append(f"{name}: unknown array name")
            continue
        if arr.dtype != np.dtype(dtype):
            problems.append(f"{name}: dtype {arr.dtype}, cache dtype is {dtype}")
        if name.startswith("video/"):
            if arr.ndim != 3:
                problems.append(f"{name}: expected (W, L, D), got shape {arr.shape}")
            elif arr.shape[0] != n_windows:
                problems.append(f"{name}: {arr.shape[0]} windows but {n_windows} window starts")
        elif arr.ndim != 2:
            problems.append(f"{name}: expected (L, D), got shape {arr.shape}")
        if name.startswith("text_window/") and arr.ndim == 2:
            lengths = arrays.get(LENGTHS)
            if lengths is None:
                problems.append(f"{name}: no {LENGTHS}")
            elif lengths.ndim == 1 and int(lengths.sum()) != arr.shape[0]:
                problems.append(f"{name}: {arr.shape[0]} rows but {LENGTHS} sum to {int(lengths.sum())}")
            full = arrays.get("text/" + name.split("/", 1)[1])
            if full is not None and full.ndim == 2 and full.shape[1] != arr.shape[1]:
                problems.append(f"{name}: width {arr.shape[1]} differs from the full text's {full.shape[1]}")
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            problems.append(f"{name}: contains NaN or Inf")
    return problems


def _check_declared(attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[str]:
    """The unit's declared shapes/dtypes/checksums against the bytes actually read."""
    problems = []
    for name, decl in sorted(attrs["arrays"].items()):
        arr = arrays.get(name)
        if arr is None:
            continue
        if list(arr.shape) != list(decl["shape"]) or str(arr.dtype) != decl["dtype"]:
            problems.append(f"{name}: stored as {arr.shape} {arr.dtype}, metadata says "
                            f"{tuple(decl['shape'])} {decl['dtype']}")
        elif array_sha256(arr) != decl["sha256"]:
            problems.append(f"{name}: checksum mismatch (altered or flipped bytes)")
    return problems


# --------------------------------------------------------------------------------------- manifest

def _load_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CacheError(f"{path}: not a cache (folder does not exist)")
    try:
        manifest = _read_json(path / MANIFEST, "manifest.json")
    except FileNotFoundError:
        raise CacheError(f"{path}: not a cache (no {MANIFEST})") from None
    if not isinstance(manifest, dict) or not {"format", "spec", "fingerprint", "backend"} <= set(manifest):
        raise CacheError(f"{path / MANIFEST}: not a cache manifest (missing format/spec/fingerprint/backend)")
    if manifest["format"] > FORMAT:
        raise CacheError(f"{path}: cache format {manifest['format']} is newer than this tool's ({FORMAT})")
    try:
        get_backend(manifest["backend"])
    except ValueError as exc:
        raise CacheError(f"{path / MANIFEST}: {exc}") from None
    return manifest


def _numeric(spec_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec_dict.items() if k not in ("backend", "compress")}


def _mismatch(path: Path, stored: dict[str, Any], wanted_fp: str, wanted_spec: dict[str, Any] | None) -> str:
    msg = f"{path}: cache fingerprint {stored['fingerprint']} does not match {wanted_fp}"
    if wanted_spec is not None:
        fields = diff_fields(_numeric(stored["spec"]), _numeric(wanted_spec))
        if fields:
            msg += f" (differing fields: {', '.join(fields)})"
    return msg


# ------------------------------------------------------------------------------------------ writer

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
            stored = _load_manifest(p)
            problem = self._conflict(stored)
            if problem is None:
                return
            if not force:
                raise CacheError(f"{problem}; pass --force to wipe it and start over")
            for child in p.iterdir():
                _remove(child)
        p.mkdir(parents=True, exist_ok=True)
        self._create_manifest()

    def _conflict(self, stored: dict[str, Any]) -> str | None:
        if stored["fingerprint"] != self.fingerprint:
            return _mismatch(self.path, stored, self.fingerprint, self.spec.to_dict())
        if stored["backend"] != self.spec.backend:
            return (f"{self.path}: cache backend is {stored['backend']}, the spec asks for {self.spec.backend} "
                    f"(differing fields: backend)")
        return None

    def _create_manifest(self) -> None:
        """Exclusive create through a hard link, so concurrent ranks agree on one manifest."""
        tmp = self.path / _tmp_name("tmp", MANIFEST)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._manifest(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fault_point("create_manifest")
        try:
            os.link(tmp, self.path / MANIFEST)
        except FileExistsError:
            problem = self._conflict(_load_manifest(self.path))
            if problem:
                raise CacheError(problem) from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(self.path)

    def _clean_leftovers(self) -> None:
        """Remove temporary units/files of writers that died (kill -9) before renaming them into place."""
        for folder in (self.path, self.path / VIDEOS, self.path / ERRORS):
            for entry in folder.iterdir():
                if entry.name.startswith((".tmp.", ".trash.")) and _owner_dead(entry.name):
                    _remove(entry)

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
            return not _unit_problems(self.backend, path, self.fingerprint, self.spec.dtype, self._expected, video_id)
        except Exception:  # noqa: BLE001 - any failure to load means "not complete"
            return False

    def write(self, record: VideoRecord) -> None:
        """Store one video atomically (temporary unit renamed into place); replaces an older unit."""
        meta = record.meta()
        arrays = {name: self._cast(name, a) for name, a in record.arrays.items()}
        problems = check_record(meta, arrays, self.spec.dtype, self._expected)
        if problems:
            raise CacheError(f"{record.video_id}: cannot cache this video: {'; '.join(problems)}")
        attrs = {
            "format": FORMAT, "fingerprint": self.fingerprint, "meta": meta,
            "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": array_sha256(a)}
                       for n, a in sorted(arrays.items())},
            "written_by": self.provenance,
        }
        final = self.unit_path(record.video_id)
        tmp = final.parent / _tmp_name("tmp", final.name)
        try:
            self.backend.write_unit(tmp, attrs, dict(sorted(arrays.items())), self.spec.compress)
        except BaseException:
            _remove(tmp)
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
        trash = None
        if final.exists():
            trash = final.parent / _tmp_name("trash", final.name)
            os.rename(final, trash)
        os.rename(tmp, final)  # the complete mark
        fault_point("unit_renamed")
        fsync_path(final.parent)
        if trash is not None:
            _remove(trash)

    def discard(self, video_id: str) -> bool:
        """Delete a video's unit (e.g. one `verify` flagged) so the next run re-extracts it."""
        final = self.unit_path(video_id)
        if not final.exists():
            return False
        self._unseal()
        trash = final.parent / _tmp_name("trash", final.name)
        os.rename(final, trash)
        fsync_path(final.parent)
        _remove(trash)
        return True

    # -- errors
    def _error_path(self, video_id: str) -> Path:
        return self.path / ERRORS / (video_key(video_id) + ".json")

    def record_error(self, video_id: str, split: str, message: str) -> None:
        atomic_write_json(self._error_path(video_id), {"video_id": video_id, "split": split, "message": message})

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
        manifest = _load_manifest(self.path)
        if manifest.get("sealed") or (self.path / INDEX).exists():
            # Manifest first: a kill in between leaves "unsealed + old index", which the next call removes.
            if manifest.get("sealed"):
                manifest["sealed"] = False
                manifest.pop("sealed_at", None)
                atomic_write_json(self.path / MANIFEST, manifest)
            (self.path / INDEX).unlink(missing_ok=True)
        self._unsealed = True

    def seal(self) -> None:
        """Write index.json (every complete video, sorted) and mark the manifest sealed. Run once, at the end."""
        reader = CacheReader(self.path, self.fingerprint)
        videos = [{"video_id": v, "key": video_key(v), "split": a["meta"]["split"], "label": a["meta"]["label"]}
                  for v, a in sorted(reader._metas().items())]
        errors = sorted(reader.errors(), key=lambda e: e["video_id"])
        atomic_write_json(self.path / INDEX, {"fingerprint": self.fingerprint, "videos": videos, "errors": errors})
        fault_point("seal_index")
        manifest = _load_manifest(self.path)
        manifest["sealed"] = True
        manifest["sealed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.path / MANIFEST, manifest)
        self._unsealed = False


def _unit_problems(backend: Backend, path: Path, fingerprint: str, dtype: str, expected: Sequence[str] | None,
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
    problems += _check_declared(attrs, arrays)
    problems += check_record(meta, arrays, dtype, expected)
    return problems


# ------------------------------------------------------------------------------------------ reader

class CacheReader:
    """Reads a cache, sealed or not. `expect_fingerprint` may be a fingerprint string or an
    ExtractionSpec (then a mismatch names the differing fields)."""

    def __init__(self, path: str | Path, expect_fingerprint: str | ExtractionSpec | None = None):
        self.path = Path(path)
        self.manifest = _load_manifest(self.path)
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
                raise CacheError(_mismatch(self.path, self.manifest, want_fp, want_spec))
        self._meta_cache: dict[str, dict[str, Any]] | None = None
        self._unreadable: dict[str, str] = {}

    @property
    def sealed(self) -> bool:
        return bool(self.manifest.get("sealed"))

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
            bad = _check_declared(attrs, arrays)
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
                        out.append(json.loads(p.read_text(encoding="utf-8")))
                    except (OSError, ValueError):
                        out.append({"video_id": p.stem, "split": None, "message": f"unreadable error file {p}"})
        return sorted(out, key=lambda e: str(e.get("video_id")))

    # -- content identity
    def _video_digest(self, video_id: str, deep: bool) -> dict[str, Any]:
        attrs = self._attrs(video_id)
        decl = attrs["arrays"]
        if deep:
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
        `deep=False` trusts the per-array checksums stored at write time (fast; `verify` checks them)."""
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
        by_key = {e.get("key"): e.get("video_id") for e in (index or {}).get("videos", [])}
        out = []
        for key, err in sorted(self._unreadable.items()):
            out.append({"video_id": by_key.get(key) or key, "problem": f"unreadable unit ({err})"})
        expected = expected_arrays(self.spec)
        for v, attrs in sorted(metas.items()):
            try:
                problems = _unit_problems(self.backend, attrs["_path"], self.fingerprint, self.dtype, expected)
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
