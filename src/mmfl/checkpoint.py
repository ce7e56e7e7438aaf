"""Checkpoints: atomic writes, validated loads, and rebuilding a ready-to-use model from one file.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True`` by
:func:`mmfl.safe_load.torch_load`: ``format``/``version``, the resolved ``config``, the data-derived
sizes (``num_items``, ``num_attributes``, ``num_categories`` and their names; ``box_category_names``
for a model with a box head, one per category channel, and the box stage's ``box_metrics``), the
model ``state_dict`` and, for training checkpoints, ``train_state`` (optimizers, scheduler, scaler,
sampler, RNG, epoch).
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from mmfl.atomic import atomic_write
from mmfl.errors import CheckpointError
from mmfl.hashing import file_sha256
from mmfl.safe_load import torch_load

FORMAT = "mmfl-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` crash-safely: a crash leaves either the old file or the new one, never a torn file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


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
        # how attribute probabilities become names (mmfl.labels); absent in older checkpoints
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
