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
