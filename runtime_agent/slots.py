"""Installed bundles on the device's disk: one file per version, and two pointers switched atomically.

`DIR/slots/NAME-VERSION.bundle` holds every installed bundle; `DIR/current.bundle` and
`DIR/previous.bundle` are symlinks into it, each replaced by one durable rename (`runtime_agent.durable`:
slot files and the journal are fsynced before they are renamed into place, the folder after), so a crash
or a power cut leaves either the old or the new pointer, never a half-written one or one to a slot whose
bytes never reached the disk. The two pointers change together: both targets go into a journal
(`DIR/switch.json`) before the first link moves, and `recover()` at start-up finishes a switch a crash cut in half, so current and previous are
never left pointing at the same slot. A device provisioned with a plain `current.bundle` file is adopted
into a slot on the first install.

The disk holds two bundles, not one per push: after each install, and at start-up, the slots neither
pointer names are deleted (a board taking a 40 MB model a week would otherwise fill its storage). Nothing
reads such a slot again: rollback goes to `previous`, and an install cut short before its switch is
pushed again.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from runtime_agent import durable
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

    def _adopt_current(self, name: str) -> Path | None:
        """The active bundle as a slot file (moving a plain provisioned file into `slots/`)."""
        if self.current.is_symlink():
            return self.current.resolve()
        if not self.current.exists():
            return None
        self.slots.mkdir(exist_ok=True)
        adopted = self.slots / name
        durable.copy(self.current, adopted)
        durable.point(self.current, adopted)
        return adopted

    def store(self, staged: Path, name: str, version: int) -> Path:
        """Copy a verified file into its slot (durably: a crash or a power cut leaves no partial slot, a
        full disk no temp file)."""
        self.slots.mkdir(exist_ok=True)
        slot = self.slots / f"{name}-{version}.bundle"
        durable.copy(staged, slot)
        return slot

    @staticmethod
    def slot_version(link: Path) -> int | None:
        """The version a pointer's slot holds, from its file name (`NAME-VERSION.bundle`), for when the bundle
        itself cannot be read; None for a plain provisioned file."""
        match = re.fullmatch(r".+-(\d+)\.bundle", link.resolve().name) if link.is_symlink() else None
        return int(match.group(1)) if match else None

    def current_sha256(self) -> str:
        with open(self.current, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def _switch(self, current: Path, previous: Path | None, step: str) -> None:
        """Point both links, journaled: a crash between the two renames is finished by `recover()`."""
        targets = {"current": str(current), "previous": str(previous) if previous else None}
        durable.write_text(self.journal, json.dumps(targets))
        if previous is not None:
            durable.point(self.previous, previous)
        crash_point(f"{step}:between_switches")
        durable.point(self.current, current)
        self.journal.unlink()  # a power cut may undo this: `recover()` then redoes the same switch

    def activate(self, slot: Path, current_name: str) -> None:
        """Make `slot` current and the old current previous."""
        old = self._adopt_current(current_name)
        self._switch(slot, old if old is not None and old != slot.resolve() else None, "install")
        self._prune()

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
        for leftover in [*self.slots.glob(".*.tmp"), *self.dir.glob(".*.tmp")]:
            leftover.unlink()
        self._prune()

    def _prune(self) -> None:
        """Delete every slot that neither `current` nor `previous` points to (a plain provisioned `current`
        names none: a slot then is an adoption or an install that a crash cut short)."""
        keep = {link.resolve() for link in (self.current, self.previous) if link.is_symlink()}
        for slot in self.slots.glob("*.bundle"):
            if slot.resolve() not in keep:
                slot.unlink(missing_ok=True)
