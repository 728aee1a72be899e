"""Fault injection for the crash-safety tests: `AH_FAULT_AT=<point>:<n>` SIGKILLs the process the n-th
time it reaches the named point (n defaults to 1). Unset, a point costs one environment lookup.

Points (all in the process that writes the cache):
    create_manifest   store: a new cache's manifest is written to its temporary file, not yet linked in place
    json_replace      store: any JSON file (error, index, manifest) is written to its temporary file, not replaced
    unit_array        store_backends: one more array of a video's temporary unit is written (others are not)
    unit_written      store: a video's temporary unit is complete, not yet renamed into place
    unit_renamed      store: the unit was just renamed into place (folder not fsynced, error file not cleared)
    video_encoded     run: a video was encoded, not yet handed to a writer thread (earlier writes in flight)
    seal_index        store: seal() wrote index.json, the manifest is not yet marked sealed
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "AH_FAULT_AT"
_counts: dict[str, int] = {}
_lock = threading.Lock()  # writer threads reach the store's points concurrently


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup, no flush) when AH_FAULT_AT names this point and count."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, n = wanted.partition(":")
    if point != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == int(n or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
