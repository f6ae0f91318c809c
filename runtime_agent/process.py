"""This process's resident memory, read by telemetry (`runtime_agent.agent`) and benchmark jobs alike."""

from __future__ import annotations


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
