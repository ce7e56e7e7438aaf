"""Small real inputs for the index, service and page tests: a CSV gallery, an untrained checkpoint, a server.

Images are 48 px, one distinct colour and stripe pattern per item (two shop photos and one
consumer photo each), so even an untrained network tells the items apart. The checkpoint is
a resnet18 at 64 px saved without training, as ``interfaces.md`` describes.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from mmfl.serve.process import start_server, stop_server  # noqa: F401  (re-exported for the tests)

ITEMS = [f"id_{i:02d}" for i in range(8)]
CATEGORIES = ["dress", "top"]
ATTRIBUTES = ["floral", "striped", "denim"]
_COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (230, 200, 40), (150, 40, 170), (20, 180, 190),
            (240, 130, 20), (90, 90, 90)]


def item_category(item: str) -> str:
    return CATEGORIES[ITEMS.index(item) % 2]


def draw_item(item: str, variant: int, size: int = 48) -> Image.Image:
    """A photo of ``item``: its colour, stripes every (index+3) px, a variant-dependent offset."""
    idx = ITEMS.index(item)
    img = Image.new("RGB", (size, size), _COLOURS[idx])
    draw = ImageDraw.Draw(img)
    step = idx + 3
    for x in range(variant, size, step):
        draw.line([(x, 0), (x, size)] if idx % 2 else [(0, x), (size, x)], fill=(255, 255, 255), width=1)
    draw.ellipse([8 + variant, 8, 30 + variant, 30], outline=(0, 0, 0), width=2)
    return img


def make_gallery(root: Path, items: list[str] = ITEMS) -> Path:
    """``root/dataset.csv`` + images: per item two shop and one consumer image in split test."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,item_id,domain,split,category"]
    for item in items:
        for variant, domain in ((0, "shop"), (1, "shop"), (2, "consumer")):
            name = f"{item}_{domain}_{variant}.png"
            draw_item(item, variant).save(root / name)
            lines.append(f"{name},{item},{domain},test,{item_category(item)}")
    (root / "dataset.csv").write_text("\n".join(lines) + "\n")
    return root


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained resnet18 checkpoint at 64 px with an attribute head (``seed`` changes the weights)."""
    import torch

    from mmfl.checkpoint import atomic_save, model_payload
    from mmfl.config import config_to_dict, load_config
    from mmfl.models import build_model

    torch.manual_seed(seed)
    cfg = load_config("global", ["model.backbone=resnet18", "model.pretrained=none", "input.size=64"])
    model = build_model(cfg, len(ITEMS), len(ATTRIBUTES), 0)
    atomic_save(model_payload(model, {
        "config": config_to_dict(cfg), "num_items": len(ITEMS), "num_attributes": len(ATTRIBUTES),
        "num_categories": 0, "attribute_names": ATTRIBUTES, "category_names": [],
    }), path)
    return path


def make_served_index(root: Path) -> Path:
    """``root/gallery`` (CSV), ``root/model.pt`` and a flat FAISS ``root/index`` built from them."""
    from mmfl.checkpoint import load_model
    from mmfl.data.formats import read_dataset
    from mmfl.index import build_index

    gallery = make_gallery(root / "gallery")
    model = load_model(make_checkpoint(root / "model.pt"))
    shop = read_dataset(gallery, "csv").split("test", domain="shop")
    build_index(model, shop, root / "index", progress=False)
    return root / "index"
