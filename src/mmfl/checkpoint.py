"""Checkpoints: atomic writes, safe loads, and rebuilding a ready-to-use model from one file.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``:
``format``/``version``, the resolved ``config``, the data-derived sizes (``num_items``,
``num_attributes``, ``num_categories`` and their names; ``box_category_names`` for a model with a
box head, one per category channel, and the box stage's ``box_metrics``), the model ``state_dict`` and, for
training checkpoints, ``train_state`` (optimizers, scheduler, scaler, sampler, RNG, epoch).
"""
from __future__ import annotations

import hashlib
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from mmfl.atomic import atomic_write
from mmfl.errors import CheckpointError

FORMAT = "mmfl-checkpoint"
VERSION = 1
#: How ``torch.save`` files begin: a zip archive, or (legacy format) a pickle of torch's magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_HEAD_BYTES = 64


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` crash-safely: a crash leaves either the old file or the new one, never a torn file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (identifies the checkpoint an index was built with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    _verify_archive(path)
    ckpt = torch_load(path, map_location, "checkpoint, truncated or corrupt", "an mmfl checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not an mmfl checkpoint (torch.save of a {type(ckpt).__name__}, not of a checkpoint dict)")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mmfl checkpoint (a dict without the '{FORMAT}' header, "
                              "e.g. a plain state dict)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def _verify_archive(path: Path) -> None:
    """Check the CRC-32 that ``torch.save`` stores for every record of its zip archive.

    ``torch.load`` does not check them, so a flipped bit in the weights would otherwise load
    silently as a different model. Files that are not zip archives are left to ``torch.load``.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error) as exc:
        reason = str(exc).split("\n")[0][:160] or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt archive: {reason})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: checkpoint is corrupt (CRC mismatch in {bad}; damaged after it was written)")


def model_payload(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint needed to rebuild the model for inference."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    return {"format": FORMAT, "version": VERSION, **meta, "model": state}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in ``checkpoint``, load its weights and return it in eval mode.

    The returned module carries ``model.meta`` (config dict, names of items' attributes and
    categories, and ``checkpoint_sha256``) for eval, index and export.
    """
    from mmfl.config import config_from_dict
    from mmfl.models import build_model

    ckpt = read_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(ckpt["config"])
        cfg.model.pretrained = "none"  # the checkpoint holds the trained weights
        model = build_model(cfg, ckpt["num_items"], ckpt["num_attributes"], ckpt.get("num_categories", 0),
                            len(ckpt.get("box_category_names", [])))
        model.load_state_dict(ckpt["model"], strict=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:  # ValueError includes a bad stored config
        reason = str(exc).split("\n")[0][:200]
        raise CheckpointError(f"{checkpoint}: checkpoint does not fit its own model ({reason})") from None
    model.meta = {
        "config": ckpt["config"],
        "num_items": ckpt["num_items"],
        "attribute_names": list(ckpt.get("attribute_names", [])),
        "category_names": list(ckpt.get("category_names", [])),
        # how attribute probabilities become names (mmfl.index.labels); absent in older checkpoints
        "attribute_thresholds": ckpt.get("attribute_thresholds"),
        "attribute_calibration": ckpt.get("attribute_calibration"),
        "attribute_groups": dict(ckpt.get("attribute_groups") or {}),
        # the box head's category names (mmfl.localise) and what its stage measured; absent without one
        "box_category_names": list(ckpt.get("box_category_names", [])),
        "box_metrics": ckpt.get("box_metrics"),
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint": str(checkpoint),
    }
    return model.to(device).eval()
