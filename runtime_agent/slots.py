"""Installed bundles on the device's disk: one file per version, and two pointers switched atomically.

`DIR/slots/NAME-VERSION.bundle` holds every installed bundle; `DIR/current.bundle` and
`DIR/previous.bundle` are symlinks into it, replaced with `os.replace` (a rename, atomic on POSIX), so
a power cut leaves either the old or the new pointer, never a half-written one. A device provisioned
with a plain `current.bundle` file is adopted into a slot on the first install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SLOTS = "slots"
PREVIOUS = "previous.bundle"


class Slots:
    def __init__(self, device_dir: Path, current: Path) -> None:
        self.dir = Path(device_dir)
        self.current = Path(current)
        self.previous = self.dir / PREVIOUS
        self.slots = self.dir / SLOTS

    def _point(self, link: Path, target: Path) -> None:
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)

    def _adopt_current(self, name: str) -> Path | None:
        """The active bundle as a slot file (moving a plain provisioned file into `slots/`)."""
        if self.current.is_symlink():
            return self.current.resolve()
        if not self.current.exists():
            return None
        self.slots.mkdir(exist_ok=True)
        adopted = self.slots / name
        shutil.copyfile(self.current, adopted)
        self._point(self.current, adopted)
        return adopted

    def store(self, staged: Path, name: str, version: int) -> Path:
        """Copy a verified file into its slot (temp file + rename: a crash leaves no partial slot)."""
        self.slots.mkdir(exist_ok=True)
        slot = self.slots / f"{name}-{version}.bundle"
        tmp = slot.with_name(f".{slot.name}.tmp")
        shutil.copyfile(staged, tmp)
        os.replace(tmp, slot)
        return slot

    def activate(self, slot: Path, current_name: str) -> None:
        """Make `slot` current and the old current previous."""
        old = self._adopt_current(current_name)
        if old is not None and old != slot.resolve():
            self._point(self.previous, old)
        self._point(self.current, slot)

    def roll_back(self) -> None:
        """Swap current and previous."""
        if not self.previous.is_symlink():
            raise FileNotFoundError("no previous bundle to roll back to")
        old_current, old_previous = self.current.resolve(), self.previous.resolve()
        self._point(self.current, old_previous)
        self._point(self.previous, old_current)
