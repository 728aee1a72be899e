"""Host memory: keep freed memory for reuse (CPU training, extraction); how much memory is available.

glibc serves blocks above 32 MB with mmap and unmaps them on free, so every training step page-faults its
large buffers anew: the FFN's weight gradients (170 MB each at the paper's sizes), the batch's fp32 tokens.
Measured on 2 CPU cores: a (9216 x 16) @ (16 x 4608) product costs 39 ms into fresh memory and 7 ms into
reused memory, and a whole BAH-scale step falls from ~460 ms to ~235 ms once freed blocks stay in the
heap (and the host side of extraction, which receives every batch's encoder outputs as fresh blocks, ran
67 -> 74-82 clips/s). PyTorch has no caching allocator on the CPU, so the fix is glibc's own knob (mallopt); elsewhere
(musl, macOS, Windows) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1      # free memory at the heap's top kept before it is returned to the OS
_M_MMAP_MAX = -4            # 0: never serve an allocation with its own mmap
_M_ARENA_MAX = -8           # 1: every thread allocates from the main heap
_KEEP_BYTES = 2**31 - 1     # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (once per process); True where it took effect.

    The process's resident memory then stays near its peak instead of shrinking between steps: right for
    a training process, which reaches that peak every step anyway.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # One arena: a block a reader thread frees is reused by the next read, whichever thread makes it (a
    # thread's own arena holds at most 64 MB; larger blocks fell back to fresh mmaps, page-faulted anew).
    return all(mallopt(opt, value) for opt, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_ARENA_MAX, 1)))


def available_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
