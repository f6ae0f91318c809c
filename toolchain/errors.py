"""One exception type for every user-facing failure of the host toolchain (and `DatabaseLost`, an outage
the fleet monitor waits out, which the CLI shows as one line too).

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


class DatabaseLost(Exception):
    """The database server dropped the connection (PostgreSQL restarted, the network to it gone) under an
    operation, or cannot be reached again yet: what failed can be tried again once it is back. Neither one
    of the backend's ``errors`` nor a ToolchainError, on purpose: a caller's handler for one failed write
    (the monitor counts the message and moves on) must not take an outage for one; the monitor holds its
    whole batch instead, and the CLI prints it as one line."""


class ConfigError(ToolchainError):
    """The build config (TOML) is invalid."""


class TargetError(ToolchainError):
    """The device profile is unknown or invalid."""
