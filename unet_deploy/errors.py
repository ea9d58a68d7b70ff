"""User-facing errors: one line that names the file or flag and says how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["UserError", "InputError", "OptionError", "ModelFileError", "ParityError", "MissingDependencyError",
           "first_line", "closest"]


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


class InputError(UserError):
    """An input file the user gave cannot be used: an image that does not decode or is too large, a mask that
    does not match its image, a data folder without pairs."""


class OptionError(UserError):
    """A flag or option value that is not valid (an unknown ``--backend``, ``--format`` or ``--precision`` names
    the closest valid one)."""


class ModelFileError(UserError):
    """A model file that is missing, unreadable, or not one the chosen backend runs."""


class ParityError(UserError):
    """An exported file failed its check against eager PyTorch (so it was not written). Exit code 1, as a failed
    check (not bad input, exit code 2)."""

    exit_code = 1


class MissingDependencyError(UserError):
    """An optional package the command needs is not installed; the message says how to install it."""


def closest(word: str, choices: Sequence[str]) -> str:
    """ " (did you mean X?)" for the nearest of ``choices``, or "" when none is near."""
    near = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {near[0]}?)" if near else ""


def first_line(error: BaseException) -> str:
    """The most telling line of an exception for a one-line message: the first non-empty line of
    ``str(error)`` (stripped), or the class name when the message is empty."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
