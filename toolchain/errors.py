"""One exception type for every user-facing failure of the host toolchain.

The CLI turns a `ToolchainError` into a single line on stderr and a non-zero exit; anything else is
a bug and keeps its traceback. Keeping the type small means every module can raise a precise,
actionable message without knowing how it will be shown.
"""


class ToolchainError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries raise pages), else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ConfigError(ToolchainError):
    """The build config (TOML) is invalid."""


class TargetError(ToolchainError):
    """The device profile is unknown or invalid."""
