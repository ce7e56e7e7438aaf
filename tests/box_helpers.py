"""A tiny checkpoint with a garment box head and a FAISS index built with it, for the search wiring tests.

Built once per test session (``test_localise_search.py`` and ``test_web.py`` share it): 24 generated
items at 96 px, retrieval untrained (``train.epochs=0``, ImageNet MobileNetV2 at 64 px), the box
stage for 2 epochs. The head is far from accurate; these tests check which box a search uses and
what it reports, not how good the box is (``test_localise.py`` does that).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

#: Low enough that the barely trained head finds a garment on the generated photos.
MIN_SCORE = 0.01


class BoxedIndex(NamedTuple):
    root: Path
    data: Path  # the generated dataset (DeepFashion Consumer-to-shop layout)
    checkpoint: Path
    index: Path  # the test split's shop photos, indexed with ``checkpoint``

    def consumer_photos(self) -> list[Path]:
        """Consumer photos of the indexed (test split) items, in the partition file's order."""
        lines = (self.data / "Eval" / "list_eval_partition.txt").read_text().splitlines()[2:]
        return list(dict.fromkeys(self.data / line.split()[0] for line in lines if line.split()[-1] == "test"))


def boxed_index(tmp_path_factory: pytest.TempPathFactory) -> BoxedIndex:
    """The session's :class:`BoxedIndex`, built on first use (about 15 s on 2 cores)."""
    import torch

    from mmfl.cli import main
    from mmfl.config import load_config
    from mmfl.synth import generate
    from mmfl.train import train

    root = tmp_path_factory.getbasetemp() / "boxed-index"
    built = BoxedIndex(root, root / "data", root / "run" / "checkpoints" / "last.pt", root / "index")
    if (built.index / "manifest.json").is_file():
        return built
    generate(built.data, items=24, seed=5, size=96)
    cfg = load_config("global", [
        f"data.root={built.data}", f"output_dir={root / 'run'}", "model.backbone=mobilenet_v2",
        "model.pretrained=imagenet", "input.size=64", "train.epochs=0", "data.num_workers=0",
        "train.tensorboard=false", "model.box_head=true", "box.size=96", "box.epochs=2", "box.batch_size=16",
        "box.lr=3e-3", f"box.min_score={MIN_SCORE}",
    ])
    torch.manual_seed(0)
    assert train(cfg, progress=False).last_checkpoint == built.checkpoint
    assert main(["index", str(built.checkpoint), "--data", str(built.data), "--format", "deepfashion-c2s",
                 "--split", "test", "--out", str(built.index), "--no-progress", "--workers", "0"]) == 0
    return built
