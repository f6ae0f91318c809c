"""`--out` that cannot take the bundle: refused before any work (not after the whole build, with a
traceback), and a copy that fails while publishing leaves nothing behind in the folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from toolchain.build.workflow import check_out_dir, publish
from toolchain.errors import ToolchainError


@pytest.mark.parametrize("out, message", [
    ("taken", "--out {tmp}/taken: {tmp}/taken is a file, not a folder; pass a folder you can write to for the bundle and the report"),
    ("taken/dist", "--out {tmp}/taken/dist: {tmp}/taken is a file, not a folder;"),
])
def test_an_out_path_that_is_a_file_is_refused_before_the_build(tmp_path: Path, out: str, message: str) -> None:
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ToolchainError) as error:
        check_out_dir(tmp_path / out)
    assert str(error.value).startswith(message.format(tmp=tmp_path))
    check_out_dir(tmp_path / "new" / "dist")  # a folder still to be created under a writable one is fine


def test_the_build_command_refuses_it_in_one_line_before_training(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    result = run_cli("toolchain", "build", "--target", "jetson", "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "train" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: --out {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a "
                                                      "folder; pass a folder you can write to for the bundle and the report")


def test_a_failed_copy_publishes_nothing(tmp_path: Path) -> None:
    staged = tmp_path / "work"
    staged.mkdir()
    outputs = {"bundle": staged / "p-1-t.bundle", "report_json": staged / "p-1-t.report.json"}
    outputs["bundle"].write_text("signed bytes")  # the report is missing: its copy fails after the bundle's
    out = tmp_path / "dist"
    with pytest.raises(ToolchainError, match=f"--out {out}: cannot write the bundle and the report there"):
        publish(outputs, out)
    assert list(out.iterdir()) == []  # neither the bundle nor its temp copy
