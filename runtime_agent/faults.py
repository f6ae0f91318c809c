"""Fault injection, for the crash-consistency tests only: `EDGE_AGENT_CRASH_AT=STEP` in the agent's
environment makes the process end itself with `os._exit` (as abruptly as `kill -9` or a power cut: no
cleanup, no flush, no `finally`) when an install or a rollback reaches STEP. Read once, here; unset it
does nothing. The steps, in the order an update passes them, are `STEPS`.
"""

from __future__ import annotations

import os

STEPS = ("install:staged", "install:verified", "install:slot_written", "install:between_switches", "install:switched",
         "rollback:recorded", "rollback:between_switches", "rollback:switched")
CRASH_AT = os.environ.get("EDGE_AGENT_CRASH_AT", "")


def crash_point(step: str) -> None:
    """Die here when this is the configured step (says so on stderr first, for the test's log)."""
    if step == CRASH_AT:
        os.write(2, f"fault injection: crashing at {step}\n".encode())
        os._exit(137)
