"""File-system helpers with one policy for every artifact the project writes (cache, run, report).

Atomic write: a temporary sibling named after its owner (`.tmp.<pid>.<host>.<rand>.<name>`), flushed and
fsynced, renamed over the target, then the folder fsynced: a reader sees the old file or the new one,
whole, even after a power cut; and a leftover temporary can be told from a live writer's (`owner_dead`).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import socket
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import yaml

from extract.errors import AHError
from extract.faults import fault_point


@functools.cache
def host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def tmp_name(kind: str, rest: str) -> str:
    """'.<kind>.<pid>.<host>.<rand>.<rest>': the owner is recorded so only dead owners' leftovers are removed."""
    return f".{kind}.{os.getpid()}.{host()}.{uuid.uuid4().hex[:8]}.{rest}"


def owner_dead(name: str) -> bool:
    """True for a temporary name whose writer is gone (same host, pid not running) or is unparseable."""
    parts = name.split(".", 5)
    if len(parts) < 6 or parts[1] not in ("tmp", "trash") or not parts[2].isdigit():
        return True
    if parts[3] != host():
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


def remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary files of dead writers in `folder` (a live writer's are left alone)."""
    for p in Path(folder).glob(".tmp.*"):
        if owner_dead(p.name):
            remove(p)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename inside it is durable across a power loss)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITE_BLOCK = 1 << 18      # bytes per write: a block `feed` just read is still in the CPU cache for the copy
WRITEBACK_EVERY = 1 << 21  # bytes between the starts of writeback


def write_all(fd: int, data: np.ndarray, offset: int | None = None,
              feed: Callable[[memoryview], None] | None = None) -> None:
    """All of a contiguous array's bytes to `fd` (at `offset` with pwrite), without a copy, in blocks; each
    block is first passed to `feed` (e.g. a checksum, extract/value_scan.py). The kernel is asked to start
    writing every few MB to disk as they come (`start_writeback`)."""
    view = memoryview(data.reshape(-1)).cast("B") if data.size else memoryview(b"")
    base = 0 if offset is None else offset
    done = started = 0
    while done < len(view):
        block = view[done:done + WRITE_BLOCK]
        if feed is not None:
            feed(block)
        put = 0
        while put < len(block):  # a write may take less than asked
            rest = block[put:]
            put += os.write(fd, rest) if offset is None else os.pwrite(fd, rest, base + done + put)
        done += put
        if done - started >= WRITEBACK_EVERY or done == len(view):
            start_writeback(fd, base + started, done - started)
            started = done


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these dirty pages to disk now, asynchronously: the fsync that ends a unit then finds
    most of its bytes written, as the disk worked while the rest of the unit was written (median 19 ms
    against 25 for one plain file of the same 22 MB + fsync on the 2-core box). On Linux
    POSIX_FADV_DONTNEED starts writeback of dirty pages (and drops only clean ones); a no-op elsewhere."""
    if length and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


_SYNC_THREADS = 16
_sync_pool: ThreadPoolExecutor | None = None


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a Zarr unit's ~20 files) concurrently: the file system
    commits the concurrent requests together (one journal commit, about one fsync's cost) where one after
    another each pays its own commit. Returns when all are durable; the first failure is raised."""
    global _sync_pool
    paths = []
    for dirpath, _dirs, names in os.walk(root):
        paths += [Path(dirpath) / name for name in names]
        paths.append(Path(dirpath))
    if len(paths) < 3:
        for path in paths:
            fsync_path(path)
        return
    if _sync_pool is None:
        _sync_pool = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="fsync")
    for done in [_sync_pool.submit(fsync_path, path) for path in paths]:
        done.result()


def atomic_write(path: Path, write: Callable[[BinaryIO], None], fault: str | None = None) -> None:
    """Write `path` atomically and durably (see the module doc); makes the folder if needed. `fault` names
    the crash-test point reached just before the rename (extract/faults.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / tmp_name("tmp", path.name)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), fault)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), fault="json_replace")


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN/Inf float (an undefined metric) as None: JSON has no NaN, and a bare `NaN` on stdout
    breaks every strict parser (jq, JavaScript, Python's own with parse_constant)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj: Any, **kw: Any) -> str:
    """Valid JSON for stdout: non-finite floats become null (finite_json); numpy scalars and paths as text."""
    return json.dumps(finite_json(obj), allow_nan=False, default=_plain, **kw)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item"):           # a numpy scalar
        value = obj.item()
        return value if not isinstance(value, float) or math.isfinite(value) else None
    return str(obj)


def read_json(path: Path, error: type[AHError] = AHError, what: str = "file") -> Any:
    """Parsed JSON, or `error` with one line naming the file (FileNotFoundError passes through)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise error(f"{path}: {what} is unreadable or not valid JSON ({exc})") from exc


def read_json_object(path: Path, error: type[AHError] = AHError, what: str = "file") -> dict[str, Any]:
    """read_json that also insists on a JSON object (a hand-edited list or number is one line, not a crash)."""
    obj = read_json(path, error, what)
    if not isinstance(obj, dict):
        raise error(f"{path}: {what} must be a JSON object, not {type(obj).__name__}")
    return obj


def refuse_foreign_folder(out: Path, is_own: Callable[[Path], bool], what: str, ours: tuple[str, ...] = ()) -> None:
    """Refuse (one line, before anything is written) to write into an existing folder that holds files but
    is not a `what` this program wrote (`is_own`); the names in `ours` (its lock, its log) do not count."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise AHError(f"{out}: exists and is not a folder; choose a new or empty folder")
    names = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".tmp."))
    if names and not is_own(out):
        raise AHError(f"{out}: exists and is not {what} (it holds {names[0]}); choose a new or empty folder "
                      "(nothing was changed)")


# ---- YAML -----------------------------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that builds `!!python/tuple` as a tuple (Whisper's transcripts use it) and refuses aliases
    (no alias-expansion bombs)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are refused",
                                              event.start_mark)
        return super().compose_node(parent, index)


_SafeLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                            lambda loader, node: tuple(loader.construct_sequence(node)))


def regular_file(path: Path, error: type[AHError], what: str = "file") -> int:
    """The size of `path`, refusing anything but a regular file (a FIFO or a device would block or never end)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: the {what} is not a regular file")
    return st.st_size


def read_yaml(path: Path, error: type[AHError], what: str = "YAML file", max_bytes: int | None = None) -> Any:
    """Parse a YAML file safely: a regular file of at most `max_bytes`, no aliases, any parser failure
    (deep nesting, a bad tag value) one `error` line naming the file."""
    path = Path(path)
    size = regular_file(path, error, what)
    if max_bytes is not None and size > max_bytes:
        raise error(f"{path}: {size} bytes, over the {max_bytes}-byte limit for this {what}")
    try:
        with open(path, "rb") as fh:
            loader = _SafeLoader(fh)             # what yaml.load does, with the loader above
            try:
                return loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise error(f"{path}: {what} does not parse ({first[:200]})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what} ({exc})") from exc
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError) as exc:   # PyYAML constructors
        raise error(f"{path}: {what} does not parse ({exc.__class__.__name__}: {str(exc)[:200]})") from exc
