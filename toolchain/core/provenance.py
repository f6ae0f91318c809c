"""Where a bundle came from: enough to rebuild it or to tell two builds apart."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("edge-toolchain", "torch", "onnx", "onnxruntime", "numpy", "scikit-learn", "cryptography")


def git_commit(directory: Path) -> str | None:
    """HEAD of the git work tree holding `directory` (with '+dirty' when it has changes), or None."""
    try:
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(config_path: Path, config_sha256: str, data_source: str, data_sha256: str, seed: int, budget: str) -> dict[str, Any]:
    toolchain_dir = Path(__file__).resolve().parents[1]
    return {
        "config": str(config_path), "config_sha256": config_sha256,
        "data_source": data_source, "data_sha256": data_sha256,
        "git_commit": git_commit(toolchain_dir), "project_git_commit": git_commit(config_path.parent),
        "packages": package_versions(), "python": platform.python_version(), "host": platform.platform(),
        "seed": seed, "budget": budget,
    }
