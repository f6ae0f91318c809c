"""This process's memory: its resident size, read by telemetry (`runtime_agent.agent`) and benchmark jobs
alike, and the allocator setting that keeps it flat over months of serving (`limit_malloc_arenas`)."""

from __future__ import annotations

import ctypes
import os
import platform

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
ARENAS = 2


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


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (before its threads start); True when applied.

    Why: glibc gives threads up to 8 arenas per core, and memory freed in one arena is never reused by
    another. The agent starts a thread for every REST connection and every install, and each install
    builds an onnxruntime session in whichever arena that thread got, so the resident size climbed with
    every push and rollback (about 2 MB per push in `benchmarks/soak.py`, 40-80 MB/h at its default
    schedule) while Python's own heap (tracemalloc) and the live sessions stayed flat. With two arenas
    the freed space is reused and the resident size levels off. `MALLOC_ARENA_MAX` in the environment
    (read by glibc itself) wins; other C libraries are left alone."""
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
