"""Query side of visual search: embed a photo (optionally a box of it) and return the best *items*.

A gallery holds several images per item; the customer wants products, not five photos of the
same dress. The store is asked for more rows than ``k`` (over-fetch), rows are grouped by item
keeping each item's best image, and the fetch grows until ``k`` items are found or the index
is exhausted. The same loop serves FAISS (which filters after fetching) and Milvus (which
filters inside the search).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmfl.data.images import check_box, open_crop
from mmfl.data.records import Box
from mmfl.errors import DataError, GalleryIndexError, MMFLError
from mmfl.index.build import check_compatible, model_input_size
from mmfl.index.labels import AttributeDecoder, predicted_category
from mmfl.index.store import Filter, GalleryStore, Hit, open_store

#: Rows fetched per wanted item on the first try (items usually have a few gallery images).
OVERFETCH = 4
MAX_K = 1000


@dataclass(frozen=True)
class Query:
    """A query's embedding and what the model predicts about the garment."""

    vector: np.ndarray
    category: str | None
    attributes: tuple[str, ...]


def parse_bbox(text: str) -> Box:
    """``"x1,y1,x2,y2"`` (pixels, x2 > x1, y2 > y1) -> a box; anything else is a one-line DataError."""
    parts = [p.strip() for p in text.split(",")]
    try:
        x1, y1, x2, y2 = (int(round(float(p))) for p in parts)
    except ValueError:
        raise DataError(f"bbox '{text}': expected x1,y1,x2,y2 in pixels") from None
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"bbox '{text}': x2 must exceed x1 and y2 must exceed y1")
    return x1, y1, x2, y2


def embed_query(model: Any, image: Image.Image, bbox: Box | None = None, device: str = "cpu") -> Query:
    """Crop ``image`` to ``bbox`` (clamped), embed it as the gallery was, and read the heads' predictions
    (attributes decided as the gallery's predicted ones are: the checkpoint's thresholds and groups)."""
    import torch
    import torch.nn.functional as F

    from mmfl.data.transforms import eval_transform

    if bbox is not None:
        image = image.crop(check_box(bbox, image.width, image.height, "query image"))
    x = eval_transform(model_input_size(model))(image).unsqueeze(0).to(device)
    # Same precision as the gallery pass in mmfl.extract: bf16 autocast on CUDA, float32 elsewhere.
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        pred = model.predict(x)
    vector = F.normalize(pred.embedding.float(), dim=1)[0].cpu().numpy()
    attr = None if pred.attribute_logits is None else torch.sigmoid(pred.attribute_logits.float())[0].cpu().numpy()
    cat = None if pred.category_logits is None else torch.softmax(pred.category_logits.float(), dim=1)[0].cpu().numpy()
    return Query(
        vector.astype(np.float32),
        predicted_category(cat, model.meta["category_names"]),
        AttributeDecoder.from_meta(model.meta).attributes(attr),
    )


def search_items(store: GalleryStore, vector: np.ndarray, k: int, flt: Filter = Filter()) -> list[Hit]:
    """The ``k`` best items (each represented by its best-scoring image), best first."""
    limit = min(len(store), store.max_fetch)
    n = min(limit, k * OVERFETCH)
    while True:
        best: dict[str, Hit] = {}
        for hit in sorted(store.search(vector, n, flt), key=lambda h: (-h.score, h.row)):
            best.setdefault(hit.entry.item_id, hit)
        if len(best) >= k or n >= limit:
            return list(best.values())[:k]
        n = min(limit, n * 4)


def hit_json(hit: Hit) -> dict[str, Any]:
    """One result row; ``attribute_source`` is "annotated", "predicted" or None (see :class:`Entry`)."""
    return {"item_id": hit.entry.item_id, "image": hit.entry.image, "score": round(hit.score, 6),
            "category": hit.entry.category, "attributes": list(hit.entry.attributes),
            "attribute_source": hit.entry.attribute_source}


def load_index_model(index_dir: Path, manifest: dict[str, Any], checkpoint: str | Path | None = None,
                     device: str = "cpu") -> Any:
    """The model an index was built with: the manifest's checkpoint, or ``checkpoint`` if it has the same content."""
    from mmfl.checkpoint import load_model

    path = Path(checkpoint) if checkpoint else Path(manifest["checkpoint"])
    if not path.is_file():
        raise GalleryIndexError(
            f"{index_dir / 'manifest.json'}: checkpoint {path} not found; pass --checkpoint with the file it was built with"
        )
    model = load_model(path, device)
    check_compatible(manifest, model, index_dir)
    return model


def load_index_onnx(index_dir: Path, manifest: dict[str, Any], onnx: str | Path, device: str = "cpu") -> Any:
    """An exported graph in place of the checkpoint, refused unless exported from the index's checkpoint.

    ONNX Runtime runs it on CPU only, so any other device is refused rather than silently ignored.
    """
    from mmfl.export import OnnxEmbedder

    if device != "cpu":
        raise MMFLError(f"--onnx {onnx}: runs with ONNX Runtime on CPU; drop --device {device}")
    model = OnnxEmbedder(onnx)
    check_compatible(manifest, model, index_dir)
    return model


class Searcher:
    """A model and an open index, loaded once and shared by the CLI and every HTTP request."""

    def __init__(self, index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 onnx: str | Path | None = None):
        """``onnx``: an exported graph (``mmfl export --onnx``) to run with ONNX Runtime instead of the checkpoint."""
        if onnx and checkpoint:
            raise MMFLError(f"--checkpoint {checkpoint} and --onnx {onnx}: give one of them")
        self.index_dir = Path(index_dir)
        self.device = device
        self.store = open_store(self.index_dir)
        try:
            if onnx:
                self.model = load_index_onnx(self.index_dir, self.store.manifest, onnx, device)
            else:
                self.model = load_index_model(self.index_dir, self.store.manifest, checkpoint, device)
        except BaseException:
            self.store.close()
            raise

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    def search(self, image: Image.Image, k: int = 20, bbox: Box | None = None, flt: Filter = Filter()) -> dict[str, Any]:
        """``{"results": [...], "query": {...}}`` for one photo: the service's and ``mmfl search --json``'s answer."""
        if not 1 <= k <= MAX_K:
            raise DataError(f"k={k}: must be between 1 and {MAX_K}")
        start = time.perf_counter()
        query = embed_query(self.model, image, bbox, self.device)
        hits = search_items(self.store, query.vector, k, flt)
        return {
            "results": [hit_json(h) for h in hits],
            "query": {
                "width": image.width, "height": image.height, "bbox": list(bbox) if bbox else None, "k": k,
                "filters": flt.describe(), "category": query.category, "attributes": list(query.attributes),
                "took_ms": round((time.perf_counter() - start) * 1000, 1),
            },
        }

    def search_photo(self, source: str | Path | bytes, name: str | None = None, k: int = 20,
                     bbox: Box | None = None, flt: Filter = Filter()) -> dict[str, Any]:
        """:meth:`search` for an encoded photo (a path or uploaded bytes), decoded no larger than the model needs.

        A phone photo is shrunk to the model's input anyway, so it is decoded at a reduced JPEG
        scale (:func:`mmfl.data.images.open_crop`); the answer still reports the photo's full
        size and the box as given.
        """
        photo, (width, height) = open_crop(source, bbox, name, min_size=model_input_size(self.model))
        answer = self.search(photo, k=k, flt=flt)
        answer["query"].update(width=width, height=height, bbox=list(bbox) if bbox else None)
        return answer

    def close(self) -> None:
        self.store.close()
