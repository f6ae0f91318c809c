"""Options shared by the commands that talk to the broker as the fleet operator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from toolchain.errors import ToolchainError


def read_password(password_file: Optional[Path], username: Optional[str]) -> Optional[str]:
    """The operator's password from a file (never on the command line, where `ps` shows it)."""
    if password_file is None:
        return None
    if not username:
        raise ToolchainError("--password-file needs --username (the fleet operator account of the broker)")
    try:
        return password_file.read_text().strip()
    except OSError as exc:
        raise ToolchainError(f"cannot read --password-file {password_file}: {exc.strerror}") from None
