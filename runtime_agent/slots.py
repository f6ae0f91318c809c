"""Installed bundles on the device's disk: one file per version, and two pointers switched atomically.

`DIR/slots/NAME-VERSION.bundle` holds every installed bundle; `DIR/current.bundle` and
`DIR/previous.bundle` are symlinks into it, replaced with `os.replace` (a rename, atomic on POSIX), so
a power cut leaves either the old or the new pointer, never a half-written one. The two pointers change
together: both targets go into a journal (`DIR/switch.json`, written by rename) before the first link
moves, and `recover()` at start-up finishes a switch a crash cut in half, so current and previous are
never left pointing at the same slot. A device provisioned with a plain `current.bundle` file is adopted
into a slot on the first install.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from runtime_agent.faults import crash_point

SLOTS = "slots"
PREVIOUS = "previous.bundle"
JOURNAL = "switch.json"


class Slots:
    def __init__(self, device_dir: Path, current: Path) -> None:
        self.dir = Path(device_dir)
        self.current = Path(current)
        self.previous = self.dir / PREVIOUS
        self.slots = self.dir / SLOTS
        self.journal = self.dir / JOURNAL

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
        """Copy a verified file into its slot (temp file + rename: a crash leaves no partial slot, a full
        disk no temp file)."""
        self.slots.mkdir(exist_ok=True)
        slot = self.slots / f"{name}-{version}.bundle"
        tmp = slot.with_name(f".{slot.name}.tmp")
        try:
            shutil.copyfile(staged, tmp)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, slot)
        return slot

    def current_sha256(self) -> str:
        with open(self.current, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def _switch(self, current: Path, previous: Path | None, step: str) -> None:
        """Point both links, journaled: a crash between the two renames is finished by `recover()`."""
        targets = {"current": str(current), "previous": str(previous) if previous else None}
        tmp = self.journal.with_name(f".{JOURNAL}.tmp")
        tmp.write_text(json.dumps(targets))
        os.replace(tmp, self.journal)
        if previous is not None:
            self._point(self.previous, previous)
        crash_point(f"{step}:between_switches")
        self._point(self.current, current)
        self.journal.unlink()

    def activate(self, slot: Path, current_name: str) -> None:
        """Make `slot` current and the old current previous."""
        old = self._adopt_current(current_name)
        self._switch(slot, old if old is not None and old != slot.resolve() else None, "install")

    def roll_back(self) -> None:
        """Swap current and previous."""
        if not self.previous.is_symlink():
            raise FileNotFoundError("no previous bundle to roll back to")
        self._switch(self.previous.resolve(), self.current.resolve(), "rollback")

    def recover(self) -> None:
        """At start-up: finish a switch a crash interrupted, and drop temp files a crash left behind."""
        try:
            targets = json.loads(self.journal.read_text())
        except (OSError, ValueError):
            targets = None
        if targets is not None and Path(targets["current"]).is_file():
            previous = targets["previous"]
            self._switch(Path(targets["current"]), Path(previous) if previous and Path(previous).is_file() else None, "recover")
        self.journal.unlink(missing_ok=True)
        for leftover in [*self.slots.glob(".*.tmp"), *self.dir.glob(".*.bundle.tmp")]:
            leftover.unlink()
