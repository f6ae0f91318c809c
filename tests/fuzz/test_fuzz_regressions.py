"""Every seed and every input that once crashed a parser (`tests/fuzz/regressions/TARGET/`), replayed
through its fuzz target: each must end in the parser's documented error or be accepted, never crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

REGRESSIONS = Path(__file__).parent / "regressions"


def _inputs() -> list[tuple[str, Path]]:
    return [(target, path) for target in sorted(TARGETS) for path in sorted((REGRESSIONS / target).glob("*"))]


@pytest.mark.parametrize(("target", "path"), _inputs(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_crash_input_is_refused_cleanly(target: str, path: Path) -> None:
    TARGETS[target].run(path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_parse(target: str) -> None:
    for seed in TARGETS[target].seeds():
        TARGETS[target].run(seed)


def test_every_target_has_a_regression_folder() -> None:
    """A folder per target, so a new crash input has an obvious home (an empty one holds a .gitkeep)."""
    assert {p.name for p in REGRESSIONS.iterdir() if p.is_dir()} == set(TARGETS)
