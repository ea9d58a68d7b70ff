"""User-facing errors: one line that names the file or flag and says how to fix it."""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """A problem with the user's input (file, flag, data), not a bug.

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``, never with a traceback.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        message = str(message)
        # A DataLoader worker re-raises our error with its traceback in the message: keep the message.
        if "Original Traceback" in message and "UserError: " in message:
            message = message.rsplit("UserError: ", 1)[1]
        super().__init__(" ".join(message.split()))
        if exit_code is not None:
            self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """The most telling line of an exception for a one-line message: the first non-empty line of
    ``str(error)`` (stripped), or the class name when the message is empty."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
