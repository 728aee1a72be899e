"""One writer per folder: an OS lock (flock) on a lock file inside the folder a process writes (a cache, a
run folder, an ensemble or ablation folder).

The kernel drops an flock when its process dies, however it dies, so a crash never leaves a stale lock:
the lock file may stay behind, but the next writer simply locks it again. The holder writes its pid, host,
start time and command line into the file so a refused writer can name it. A process may take the same
folder's lock again (nested calls: the CLI before the load, the trainer inside): it is counted, and released
with the outermost holder, which also removes the file. On a shared filesystem flock reaches other machines
where the filesystem supports it (NFSv4, Lustre with `flock` mounted, GPFS).
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from extract.errors import AHError
from extract.files import host

LOCK_FILE = ".lock"


class FolderBusy(AHError):
    """Another process is writing this folder."""

    exit_code = 3


_held: dict[str, list] = {}            # real folder path -> [fd, count]
_guard = threading.Lock()


def _forget_in_child() -> None:
    """A forked child (a decoding worker, say) shares its parent's lock but does not hold it: it must neither
    count it as its own nor unlock it (that would unlock the parent's)."""
    global _guard
    _held.clear()
    _guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    return (f"pid {info['pid']} on {info.get('host', '?')} (since {info.get('started', '?')}: "
            f"{info.get('command', '?')})")


def _acquire(folder: Path, what: str) -> int:
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusy(f"{folder}: this {what} is being written by {holder}; wait for it to end "
                             "(or stop it) before writing here") from None
        try:   # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": host(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join(["ahcli", *sys.argv[1:]]) if sys.argv else "?"}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return fd


def acquire(folder: str | Path, what: str = "folder") -> Path:
    """Lock `folder` (created if needed) for writing, or raise FolderBusy naming the process that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(folder, what), 1]
    return folder


def release(folder: str | Path) -> None:
    key = os.path.realpath(folder)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
        try:
            (Path(folder) / LOCK_FILE).unlink(missing_ok=True)   # before unlocking: see _acquire's inode check
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds(folder: str | Path) -> bool:
    """Whether this process holds the folder's lock."""
    return os.path.realpath(folder) in _held


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """`with folder_lock(run, "run folder"):` ... the folder is ours; released (and the file removed) after."""
    acquire(folder, what)
    try:
        yield Path(folder)
    finally:
        release(folder)
