"""``generate``: draw every item's shop and consumer photos, then write the annotation files.

Each item is rendered from random streams keyed by ``(seed, item index)`` alone, so the bytes
written do not depend on the number of worker processes or on which worker drew which item.
JPEG quality is fixed per domain for the same reason.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from mmfl.errors import MMFLError
from mmfl.synth.attributes import attribute_labels
from mmfl.synth.garments import draw_garment
from mmfl.synth.layout import (
    CONSUMER, SHOP, ItemImage, SynthItem, assign_splits, prepare_out_dir, write_annotations, write_readme,
)
from mmfl.synth.recipe import STREAM_RENDER, make_recipe, rng_for
from mmfl.synth.views import consumer_view, shop_view

SHOP_QUALITY = 92
CONSUMER_QUALITY = 80
MIN_SIZE, MAX_SIZE = 32, 1024


def render_item(out: Path, seed: int, size: int, index: int) -> SynthItem:
    """Draw item ``index`` (1-2 shop, 2-4 consumer photos), write its JPEGs, return its annotations."""
    recipe = make_recipe(seed, index)
    rng = rng_for(seed, STREAM_RENDER, index)
    garment = draw_garment(recipe, 2 * size)  # drawn at twice the size, downsampled when viewed
    cat = recipe.category
    folder = f"img/{cat.folder}/{cat.sub}/{recipe.item_id}"
    (out / folder).mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(1 + int(rng.random() < 0.5)):
        image, box = shop_view(garment, size, rng, variant=k)
        name = f"{folder}/shop_{k + 1:02d}.jpg"
        image.save(out / name, "JPEG", quality=SHOP_QUALITY)
        images.append(ItemImage(name, SHOP, box))
    for k in range(int(rng.integers(2, 5))):
        image, box = consumer_view(garment, size, rng)
        name = f"{folder}/comsumer_{k + 1:02d}.jpg"
        image.save(out / name, "JPEG", quality=CONSUMER_QUALITY)
        images.append(ItemImage(name, CONSUMER, box))
    images.sort(key=lambda im: im.name)
    return SynthItem(recipe.item_id, cat.clothes_type, tuple(images), tuple(attribute_labels(recipe, seed)))


def _check_args(seed: int, size: int, workers: int) -> None:
    if seed < 0:
        raise MMFLError(f"--seed must be >= 0, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MMFLError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if workers < 1:
        raise MMFLError(f"--workers must be >= 1, got {workers}")


def generate(out: Path, items: int, seed: int = 0, size: int = 128, workers: int = 1) -> dict:
    """Write ``items`` generated items under ``out`` in the DeepFashion Consumer-to-shop layout.

    ``out`` must be new, empty or a previous synth output (then replaced). Returns counts:
    items, shop_images, consumer_images, pairs, train/val/test items, categories, out.
    """
    _check_args(seed, size, workers)
    out = Path(out)
    splits = assign_splits(items, seed)  # also refuses fewer than 3 items
    prepare_out_dir(out)
    write_readme(out, items, seed, size)
    render = partial(render_item, out, seed, size)
    if workers == 1:
        rendered = [render(i) for i in range(items)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rendered = list(pool.map(render, range(items), chunksize=max(1, items // (workers * 16))))
    pairs = write_annotations(out, rendered, splits)
    sources = [im.source_type for item in rendered for im in item.images]
    return {
        "items": items,
        "shop_images": sources.count(SHOP),
        "consumer_images": sources.count(CONSUMER),
        "pairs": pairs,
        "train_items": splits.count("train"),
        "val_items": splits.count("val"),
        "test_items": splits.count("test"),
        "categories": len({tuple(im.name.split("/")[1:3]) for item in rendered for im in item.images}),
        "out": str(out),
    }
