"""A wheel that works outside the repository: built with `pip wheel`, installed (not editable) into a
fresh venv, and run from an empty folder elsewhere. The profiles, the default example and the lock
file must come from the package's own data, not from paths into the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def scratch_of_the_checkout(folder: str, names: list[str]) -> set[str]:
    """What a copy of the checkout leaves out: git, the venv, build outputs at the top level (not the
    `toolchain/build` package!), caches."""
    top = {".git", ".venv", "build", "dist"} if Path(folder) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel of this checkout. Its dependencies (torch, onnxruntime, ... several
    GB) are the test venv's, reached through a .pth line: only the project itself is installed anew."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so the build's own scratch folders stay out of the checkout
    shutil.copytree(REPO, source, symlinks=True, ignore=scratch_of_the_checkout)
    run(BIN / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source, cwd=root)
    wheel = next((root / "dist").glob("edge_toolchain-*.whl"))
    run(sys._base_executable, "-m", "venv", root / "venv", cwd=root)
    site = Path(run(root / "venv" / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=root).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(root / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=root)
    return root / "venv" / "bin"


def test_the_wheel_carries_the_profiles_the_example_and_the_lock_file(installed: Path, tmp_path: Path) -> None:
    code = ("import toolchain, runtime_agent; from toolchain import resources as r; "
            "print(toolchain.__file__); print(runtime_agent.__file__); "
            "print(sorted(p.name for p in r.profiles_dir().glob('*.toml'))); print(r.default_config().is_file()); "
            "print('torch==' in r.lock_file().read_text())")
    lines = run(installed / "python", "-c", code, cwd=tmp_path).stdout.splitlines()
    site = str(installed.parent / "lib")
    assert lines[0].startswith(site) and lines[1].startswith(site), lines  # not the checkout
    assert "jetson-orin-nano.toml" in lines[2] and lines[3] == "True" and lines[4] == "True"


def test_targets_list_and_a_build_work_from_an_empty_folder_elsewhere(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere else"
    elsewhere.mkdir()
    listed = run(installed / "toolchain", "targets", "list", cwd=elsewhere).stdout
    for profile in ("jetson-orin-nano", "raspberry-pi-4", "host"):
        assert profile in listed
    built = run(installed / "toolchain", "build", "--target", "jetson", "--budget", "quick", cwd=elsewhere)
    bundle = elsewhere / built.stdout.strip().splitlines()[-1]  # printed as given: --out defaults to dist/
    assert bundle.is_file() and bundle.parent == elsewhere / "dist" and bundle.name.startswith("digits-")
    assert (elsewhere / "dist" / "report.html").is_file()
    verified = run(installed / "toolchain", "verify", bundle, cwd=elsewhere).stdout
    assert verified.startswith(f"OK {bundle}") and "files verified" in verified
