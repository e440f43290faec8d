"""The one error type the command-line tools turn into a clean message.

Anything raised as :class:`MedAlignError` is a problem with the user's input or environment
(a bad path, a malformed file, a mismatched cache). The CLIs print its message and exit with
status 2 instead of showing a traceback. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class MedAlignError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""


#: How torch's DataLoader re-raises a worker's exception: its message becomes the whole traceback.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"


def user_message(error: BaseException) -> str:
    """The message to show for a :class:`MedAlignError`: its text, or, for one re-raised from a
    DataLoader worker (whose message is then the worker's traceback), the original message alone."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        name = f"{type(error).__module__}.{type(error).__qualname__}: "
        at = text.rfind(name)
        if at >= 0:
            text = text[at + len(name):].strip()
    return text


class BadImageError(MedAlignError):
    """An image file that cannot be used (missing, corrupt, truncated, empty, too large)."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")


class CacheDamagedError(MedAlignError):
    """A teacher cache that is not what its manifest says: an edited or damaged manifest, a shard or
    chunk whose checksum fails, a missing or truncated file, values no cosine / attention can have.
    The message names the cache (and the shard, row and image where one is at fault) and says to run
    ``medalign-cache verify``."""
