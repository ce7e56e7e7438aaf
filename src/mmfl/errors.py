"""User-facing errors: each carries one line that names the file, line or key at fault.

The CLI prints ``error: <message>`` and exits non-zero for these (a traceback only with
``--debug``); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class MMFLError(Exception):
    """Base class for errors whose message is meant for the user."""


class DataError(MMFLError):
    """A dataset annotation, image or box is missing, malformed or impossible."""


class CheckpointError(MMFLError):
    """A checkpoint is missing, truncated, corrupt or from another model."""


class GalleryIndexError(MMFLError):
    """A gallery index is missing, corrupt or does not match the checkpoint."""


def one_line(exc: MMFLError) -> str:
    """The error's own message. A DataLoader re-raises a worker's error with the worker's
    traceback appended ("Caught DataError in DataLoader worker ..."); its last line holds the
    original ``module.Class: message``."""
    text = str(exc)
    if text.startswith("Caught ") and "\n" in text:
        last = text.rstrip().rsplit("\n", 1)[-1]
        text = last.partition(": ")[2] or last
    return text
