"""Small projects for build tests: the default example's model file beside a config the test writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from toolchain.resources import default_config


def digits_project(folder: Path, toml: str) -> Path:
    """`folder/project/` with the digits example's model.py and `toml` as its toolchain.toml; returns the config."""
    project = folder / "project"
    project.mkdir()
    shutil.copy(default_config().parent / "model.py", project)
    (project / "toolchain.toml").write_text(toml)
    return project / "toolchain.toml"
