"""Shared fixtures: an isolated key folder and host-probe cache, and one real quick build per session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys and caches of the tests never touch the user's real ones."""
    home = tmp_path_factory.mktemp("home")
    os.environ["EDGE_TOOLCHAIN_KEYS"] = str(home / "keys")
    os.environ["EDGE_TOOLCHAIN_CACHE"] = str(home / "cache")
    return home


def run_cli(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (`toolchain ...` or `edge-agent ...`) as a user would."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Build:
    out: Path
    bundle: Path
    pubkey: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory, isolated_home: Path) -> Build:
    """`toolchain build --target jetson --budget quick` on the embedded example, exactly as the README runs it."""
    out = tmp_path_factory.mktemp("dist")
    result = run_cli("toolchain", "build", "--target", "jetson", "--budget", "quick", "--out", str(out), check=True)
    bundle = Path(result.stdout.strip().splitlines()[-1])
    return Build(out=out, bundle=bundle, pubkey=isolated_home / "keys" / "signing.pub",
                 stdout=result.stdout, stderr=result.stderr)
