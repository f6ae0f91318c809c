"""Every seed and every input that once crashed a parser (`tests/fuzz/regressions/TARGET/`), replayed
through its fuzz target: each must end in the parser's documented error or be accepted, never crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fuzz.targets import TARGETS

REGRESSIONS = Path(__file__).parent / "regressions"
OWN_PROCESS = {"grpc"}
"""Targets replayed in a process of their own: the agent's KServe stubs and Triton's client (imported by
tests/agent/test_kserve_grpc.py) declare the same protobuf names, and one process can hold only one of them."""


def replay(target: str, paths: list[Path] | None = None) -> None:
    """The target's inputs (files, or its seeds when None) through it: here, or in a fresh interpreter for an
    `OWN_PROCESS` target (seeds included: making them needs the stubs too)."""
    if target not in OWN_PROCESS:
        for data in TARGETS[target].seeds() if paths is None else (path.read_bytes() for path in paths):
            TARGETS[target].run(data)
        return
    code = ("import sys; from pathlib import Path; from tests.fuzz.targets import TARGETS\n"
            "target, names = TARGETS[sys.argv[1]], sys.argv[2:]\n"
            "for data in target.seeds() if names == ['--seeds'] else (Path(n).read_bytes() for n in names): target.run(data)")
    names = ["--seeds"] if paths is None else [str(path) for path in paths]
    result = subprocess.run([sys.executable, "-c", code, target, *names], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _inputs() -> list[tuple[str, Path]]:
    return [(target, path) for target in sorted(TARGETS) for path in sorted((REGRESSIONS / target).glob("*"))]


@pytest.mark.parametrize(("target", "path"), _inputs(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_crash_input_is_refused_cleanly(target: str, path: Path) -> None:
    replay(target, [path])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_parse(target: str) -> None:
    replay(target)


def test_every_target_has_a_regression_folder() -> None:
    """A folder per target, so a new crash input has an obvious home (an empty one holds a .gitkeep)."""
    assert {p.name for p in REGRESSIONS.iterdir() if p.is_dir()} == set(TARGETS)
