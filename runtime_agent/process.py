"""This process's memory: its resident size, read by telemetry (`runtime_agent.agent`) and benchmark jobs
alike, and the allocator settings that keep it flat over months of serving (`tune_malloc`,
`release_free_memory`)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# glibc's mallopt parameters (malloc.h), each with the environment variable glibc reads for it itself.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
SETTINGS = ((M_ARENA_MAX, "MALLOC_ARENA_MAX", 2), (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 128 << 10))


def rss_mb() -> float:
    """Resident memory of this process, from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tune_malloc() -> list[str]:
    """Set glibc's malloc for a long-running server, before its threads start; the settings applied.

    Why: `benchmarks/soak.py` saw the agent's resident size climb by about 2 MB per push and rollback
    (40-80 MB/h at its schedule) while Python's heap (tracemalloc), the number of objects and the live
    onnxruntime sessions (two: serving and previous) stayed flat; the growth was inside glibc's arenas.
    Two defaults cause it. Threads get up to 8 arenas per core, and memory freed in one is never reused
    by another: the agent runs a thread per REST connection and per install, and each install builds a
    session in whichever arena its thread got. And the mmap threshold rises by itself (up to 32 MB) once
    a large block is freed, after which MB-sized blocks (a bundle's bytes, a session's weights) are carved
    out of the arenas and leave holes there instead of going back to the system when freed. So: two
    arenas, and blocks of 128 KiB and more mapped on their own. A variable glibc reads itself
    (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`) wins; other C libraries are left alone."""
    libc = _glibc()
    if libc is None:
        return []
    return [variable for parameter, variable, value in SETTINGS
            if variable not in os.environ and libc.mallopt(parameter, value)]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def release_free_memory() -> bool:
    """Hand the free pages inside glibc's arenas back to the system (`malloc_trim(0)`); True if any went.

    Why: even with `tune_malloc`'s settings, `benchmarks/soak.py` saw the resident size creep by about
    1 MB every ten minutes of pushes, rollbacks and broker restarts (3-6 MB/h) while the Python heap
    stayed flat: chunks freed in the middle of an arena stay resident until something reuses them, and
    glibc returns only the arena's top on its own. `malloc_trim` also releases whole free pages inside
    the arenas (glibc >= 2.8). It walks the free lists under the arena locks, well under a millisecond
    at the agent's size, so the agent calls it once a minute from its telemetry loop, not per request."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
