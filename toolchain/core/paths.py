"""Whether a folder this command is about to fill can be written, asked before the work (a build, a
calibration's minutes of measuring) rather than found out when the result is saved."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable(folder: Path) -> str | None:
    """Why this user cannot write into `folder` (or create it, looking at its nearest existing parent);
    None when it can."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
