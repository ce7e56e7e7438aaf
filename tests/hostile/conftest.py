"""Fixtures shared by the hostile-input tests: one tiny checkpoint, one tiny index, broken checkpoints.

Everything is made here in code (nothing downloaded, nothing trained): an untrained resnet18 at
32 px, a CSV gallery of three items under a folder whose name has a space and non-ASCII letters,
and checkpoints broken the ways users break them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .factory import tiny_checkpoint, write_dataset

BAD_CHECKPOINTS = {
    # name: words the one-line error must contain
    "missing": "not found",
    "zero-byte": "not a readable checkpoint",
    "text-file": "not an mmfl checkpoint",
    "truncated": "not a readable checkpoint",
    "flipped-byte": "checkpoint is corrupt (CRC mismatch",
    "torchvision-resnet18": "not an mmfl checkpoint",
    "altered-weights": "checkpoint does not fit its own model",
    "altered-config": "checkpoint does not fit its own model",
}


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "shared données"


@pytest.fixture(scope="session")
def checkpoint(hostile_root: Path) -> Path:
    return tiny_checkpoint(hostile_root / "model ü.pt")


@pytest.fixture(scope="session")
def gallery(hostile_root: Path):
    """The logical dataset as CSV (three items, a consumer and a shop photo each)."""
    return write_dataset("csv", hostile_root / "gallery ß")


@pytest.fixture(scope="session")
def index(hostile_root: Path, checkpoint: Path, gallery) -> Path:
    """A flat FAISS index of the gallery's three shop photos, built once."""
    from mmfl.checkpoint import load_model
    from mmfl.data.formats import read_dataset
    from mmfl.index import build_index

    shop = read_dataset(gallery.data, "csv").split("test", domain="shop")
    out = hostile_root / "index ü"
    build_index(load_model(checkpoint), shop, out, progress=False)
    return out


@pytest.fixture(scope="session")
def bad_checkpoints(hostile_root: Path, checkpoint: Path) -> dict[str, Path]:
    """Each key of :data:`BAD_CHECKPOINTS` -> a file broken that way."""
    import torchvision

    from mmfl.checkpoint import atomic_save

    folder = hostile_root / "bad checkpoints"
    folder.mkdir()
    good = checkpoint.read_bytes()
    paths = {name: folder / f"{name}.pt" for name in BAD_CHECKPOINTS}
    paths["zero-byte"].write_bytes(b"")
    paths["text-file"].write_text("these are not the weights you are looking for\n")
    paths["truncated"].write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10  # inside the weights: torch.load alone would accept it
    paths["flipped-byte"].write_bytes(bytes(flipped))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), paths["torchvision-resnet18"])
    payload = torch.load(checkpoint, weights_only=True)
    weights = dict(payload["model"])
    first = next(iter(weights))
    weights[first] = torch.zeros(3, 3)  # wrong shape for that layer
    atomic_save({**payload, "model": weights}, paths["altered-weights"])
    config = {**payload["config"], "model": {**payload["config"]["model"], "backbone": "resnet9"}}
    atomic_save({**payload, "config": config}, paths["altered-config"])
    return paths
