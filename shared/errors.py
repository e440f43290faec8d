"""The one error type the command-line tools turn into a clean message.

Anything raised as :class:`MedAlignError` is a problem with the user's input or environment
(a bad path, a malformed file, a mismatched cache). The CLIs print its message and exit with
status 2 instead of showing a traceback. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class MedAlignError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""


class BadImageError(MedAlignError):
    """An image file that cannot be used (missing, corrupt, truncated, empty, too large)."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")
