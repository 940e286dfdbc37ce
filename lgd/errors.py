"""The failures lgd's commands report as one line (lgd.tools.cli turns them into exit statuses).

They live at the bottom of the package so that every layer (config, data, methods, the runner) can raise
them without importing the command layer.
"""
from typing import Optional

__all__ = ["CommandError", "UsageError"]


class CommandError(Exception):
    """A failure a command reports as one line (exit status 1), with an optional hint line."""

    exit_code = 1

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


class UsageError(CommandError):
    """A usage error (exit status 2): the command line itself is wrong."""

    exit_code = 2
