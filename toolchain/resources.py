"""Files the package ships: the board profiles, the embedded default example, the lock file whose
pins `flash` writes into a device's install script, and the agent sources `flash` copies.

In the repository they live where the design card puts them (`targets/`, `examples/`,
`requirements.lock` at the top level); `toolchain/packaged/` links to them, so a wheel carries real
copies (setuptools follows the links) and an installed toolchain works from any folder. Every reader
goes through here, never through a path relative to the repository.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def packaged(*parts: str) -> Path:
    """A file or folder of `toolchain/packaged/`, links resolved (in a checkout: the top-level file itself)."""
    return Path(str(files("toolchain").joinpath("packaged", *parts))).resolve()


def profiles_dir() -> Path:
    """The shipped board profiles (`targets/*.toml` in the repository)."""
    return packaged("targets")


def default_config() -> Path:
    """The embedded default example's toolchain.toml (scikit-learn digits, a small CNN)."""
    return packaged("examples", "digits", "toolchain.toml")


def lock_file() -> Path:
    """requirements.lock: the exact versions the project is tested with."""
    return packaged("requirements.lock")


def agent_sources() -> Path:
    """The `runtime_agent` package folder, copied as is onto a device by `flash`."""
    return Path(str(files("runtime_agent")))
