"""Reading ``torch.save`` files without running code: the one loader of checkpoints and weight files.

Both :mod:`mmfl.checkpoint` (training checkpoints) and :mod:`mmfl.models.pretrained` (backbone
weights) read files through :func:`torch_load`; it lives below both so that neither imports the
other. ``weights_only=True`` refuses pickled Python objects (unpickling them can run code), and
every failure is one :class:`~mmfl.errors.CheckpointError` line naming the file.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mmfl.errors import CheckpointError

#: How ``torch.save`` files begin: a zip archive, or (legacy format) a pickle of torch's magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_HEAD_BYTES = 64


def torch_load(path: Path, map_location: str | torch.device, unreadable: str, foreign: str) -> Any:
    """``torch.load(weights_only=True)`` whose failures are one CheckpointError line naming ``path``:
    "not a readable <unreadable>" for a torn file, "not <foreign>" for a file of another kind."""
    _check_torch_file(path, unreadable, foreign)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).split("\n")[0][:160]
        raise CheckpointError(f"{path}: not a readable {unreadable} ({reason})") from None
    except pickle.UnpicklingError:  # a torch.save file of objects other than tensors and plain data
        raise CheckpointError(f"{path}: not {foreign} (it holds Python objects other than tensors and plain data, "
                              "which are not loaded because unpickling them can run code)") from None
    except Exception as exc:  # anything else the restricted unpickler trips on in a foreign file
        reason = str(exc).split("\n")[0][:160]
        raise CheckpointError(f"{path}: not {foreign} ({type(exc).__name__}: {reason})") from None


def _check_torch_file(path: Path, unreadable: str, foreign: str) -> None:
    """Refuse a file ``torch.save`` did not write, by its first bytes, before ``torch.load`` sees it.

    ``torch.load`` reads anything that is not a zip archive as a legacy pickle, so a text file or a
    plain pickle fails deep in its unpickler with messages like ``KeyError: 101`` (a memo lookup of
    the byte ``e``). ``torch.save`` writes a zip archive, or (legacy) a pickle whose first object
    is torch's magic number; anything else is named for what it is.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable {unreadable} ({exc.strerror or exc})") from None
    if not head:
        raise CheckpointError(f"{path}: not a readable {unreadable} (empty file)")
    if head.startswith(_ZIP_MAGIC) or (head.startswith(b"\x80") and _LEGACY_MAGIC in head):
        return
    if head.startswith(b"\x80"):
        kind = "a Python pickle, not a file written by torch.save"
    elif _is_text(head):
        kind = "a text file, not a file written by torch.save"
    else:
        kind = f"unknown binary data starting {head[:8].hex(' ')}, not a file written by torch.save"
    raise CheckpointError(f"{path}: not {foreign} ({kind})")


def _is_text(head: bytes) -> bool:
    """Whether ``head`` reads as UTF-8 text (a multi-byte letter cut at the end still counts)."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3 and b"\x00" not in head
    return b"\x00" not in head
