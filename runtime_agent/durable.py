"""Replacing a file so that neither `kill -9` nor a power cut leaves it torn: the one way the agent (and
the bundle and key writers the toolchain shares with it) writes a file that must stay whole.

A rename over the old name (`os.replace`) is atomic against a crash of the process, but not durable:
until the new file's data and the folder's entry reach the disk, a power cut can leave the new name
pointing at an empty or partial file (the rename's metadata may be committed before the data) or undo
the rename. So: write a temp file beside the target, flush and fsync it, rename it over the target, and
fsync the folder. After `replace_atomically` returns, the new content survives a power cut; before, the
old content does.

Temp files are named `.NAME.PID.tmp` in the target's folder (a rename cannot cross file systems), so a
start-up sweep of `.*.tmp` (`Slots.recover`) removes what a crash left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def sync_folder(folder: Path) -> None:
    """Make the folder's entries (renames, new and removed names) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_atomically(path: Path, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary handle on a temp file that replaces `path` when the block ends without an error (and is
    removed when it raises). `durable=False` keeps the atomicity and skips both fsyncs, for records a
    power cut may lose because they are rebuilt (a push's progress: the sender re-sends what is missing)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)  # exactly `mode` whatever the umask, before any byte (of a key, say) is written
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    with replace_atomically(path, mode, durable) as handle:
        handle.write(data)


def write_text(path: Path, text: str, durable: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def copy(source: Path, path: Path) -> None:
    """`source`'s bytes as `path`, durably (a half-copied file is never visible under `path`)."""
    with open(source, "rb") as src, replace_atomically(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (relative, so the folder can move), replacing the old link in one
    durable rename: a reader sees the old target or the new one, before and after a power cut."""
    link = Path(link)
    tmp = temp_path(link)
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    try:
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(link.parent)
