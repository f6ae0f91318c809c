"""runtime_agent.durable on real files: the new content appears whole under the name or not at all, no
temp file stays behind, symlinks switch in one rename, and every temp-then-rename of the agent goes
through it (so none skips the fsyncs a power cut needs; the fsyncs themselves are reviewed by reading)."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from runtime_agent import durable
from runtime_agent.slots import Slots
from tests.conftest import REPO


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_replaces_the_file_whole_with_its_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    durable.write_text(target, '{"new": 1}')
    durable.write_bytes(tmp_path / "key.pem", b"secret", mode=0o600)
    assert target.read_text() == '{"new": 1}'
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_midway_keeps_the_old_content_and_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "slot.bundle"
    target.write_bytes(b"old bundle")
    with pytest.raises(OSError, match="disk full"):
        with durable.replace_atomically(target) as handle:
            handle.write(b"half a new bund")
            raise OSError("disk full")
    assert target.read_bytes() == b"old bundle"
    assert _leftovers(tmp_path) == []


def test_copy_and_point_switch_a_symlink_to_a_durable_copy(tmp_path: Path) -> None:
    (tmp_path / "slots").mkdir()
    source = tmp_path / "staged"
    source.write_bytes(os.urandom(3 << 20))
    slot = tmp_path / "slots" / "digits-2.bundle"
    durable.copy(source, slot)
    link = tmp_path / "current.bundle"
    durable.point(link, tmp_path / "slots" / "old.bundle")
    durable.point(link, slot)
    assert os.readlink(link) == "slots/digits-2.bundle"  # relative: the device folder may move
    assert link.read_bytes() == source.read_bytes()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "slots") == []


def test_slots_recover_sweeps_the_temp_files_a_crash_left(tmp_path: Path) -> None:
    (tmp_path / "slots").mkdir()
    for left in (tmp_path / "slots" / ".digits-3.bundle.4242.tmp", tmp_path / ".current.bundle.4242.tmp",
                 tmp_path / ".switch.json.4242.tmp"):
        left.write_bytes(b"partial")
    Slots(tmp_path, tmp_path / "current.bundle").recover()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "slots") == []


def test_every_rename_in_the_agent_goes_through_the_durable_helper() -> None:
    """A new `os.replace`/`os.rename`/`Path.replace` outside runtime_agent/durable.py would be atomic but
    not survive a power cut."""
    offenders = []
    for path in sorted((REPO / "runtime_agent").rglob("*.py")):
        if path.name == "durable.py" or "kserve_grpc" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename"):
                owner = node.func.value
                if (isinstance(owner, ast.Name) and owner.id == "os") or node.func.attr == "rename" or len(node.args) == 1:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
