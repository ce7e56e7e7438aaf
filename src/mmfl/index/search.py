"""Query side of visual search: embed a photo (a box of it) and return the best *items*.

Which box: the user's when given (it always wins); else, when the model has a box head
(:mod:`mmfl.localise`) and the caller did not ask for the whole image, the best predicted
garment box; else the whole photo. Every answer says which (``bbox``, ``box_source`` user,
predicted or whole, ``box_reason``) and lists the detections, so a page can offer the others.

A gallery holds several images per item; the customer wants products, not five photos of the
same dress. The store is asked for more rows than ``k`` (over-fetch), rows are grouped by item
keeping each item's best image, and the fetch grows until ``k`` items are found or the index
is exhausted. The same loop serves FAISS (which filters after fetching) and Milvus (which
filters inside the search).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from mmfl.data.images import check_box
from mmfl.data.records import Box
from mmfl.errors import DataError, GalleryIndexError, MMFLError
from mmfl.index.backends import open_store
from mmfl.index.build import check_compatible
from mmfl.labels import AttributeDecoder, predicted_category
from mmfl.index.store import Filter, GalleryStore, Hit
from mmfl.model_input import decoded_input, model_input, model_input_size, open_photo

if TYPE_CHECKING:
    import torch

    from mmfl.localise import Detection

#: Rows fetched per wanted item on the first try (items usually have a few gallery images).
OVERFETCH = 4
MAX_K = 1000
#: Photos per forward pass when embedding several (batch search, live adds).
EMBED_BATCH = 32
#: A photo whose garment box the detector chooses is decoded once, for the detector and the crop, at
#: the coarsest JPEG scale keeping its shorter side this many times the model input: a box of a
#: quarter of that side or more then reaches the model as sharp as a given box would. (A 12 MP JPEG
#: at 256 px input: one 2000x1500 decode, 37 ms, where the two decodes before took 49 ms for a box
#: of 40 % of the photo; 2-core machine.)
DETECT_DECODE_FACTOR = 4


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


def embed_query(model: Any, image: Image.Image | str | Path | bytes, bbox: Box | None = None,
                device: str = "cpu") -> Query:
    """Embed one photo (cropped to ``bbox``, clamped) as the gallery was, with the heads' predictions."""
    return embed_inputs(model, [model_input(image, bbox, model_input_size(model), "query image")[0]], device)[0]


def embed_inputs(model: Any, inputs: Sequence["torch.Tensor"], device: str = "cpu") -> list[Query]:
    """Embed :func:`mmfl.model_input.model_input` tensors with :func:`mmfl.extract.forward`, in batches of
    :data:`EMBED_BATCH`, and decide the attributes as the gallery's predicted ones are (the checkpoint's
    thresholds and groups). One forward pass for many photos is what makes a batch search cheaper than
    as many single ones.
    """
    import torch

    from mmfl.extract import forward

    decoder = AttributeDecoder.from_meta(model.meta)
    queries = []
    for first in range(0, len(inputs), EMBED_BATCH):
        x = torch.stack(list(inputs[first:first + EMBED_BATCH])).to(device)
        with torch.inference_mode():
            emb, attr, cat = (None if t is None else t.float().cpu().numpy() for t in forward(model, x, True))
        for i, vector in enumerate(emb):
            queries.append(Query(
                np.ascontiguousarray(vector, dtype=np.float32),
                predicted_category(None if cat is None else cat[i], model.meta["category_names"]),
                decoder.attributes(None if attr is None else attr[i]),
            ))
    return queries


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


#: ``box_source`` values: the user's box, a predicted garment box, or the whole photo.
USER, PREDICTED, WHOLE = "user", "predicted", "whole"
#: ``box_reason`` when the caller asked for the whole photo.
WHOLE_ASKED = "whole image asked for"


@dataclass(frozen=True)
class BoxChoice:
    """Which part of a photo a search embeds, and why.

    ``box`` is in the photo's upright pixels, clamped to it (None: the whole photo); ``detections``
    are the predicted garments scoring at least the catalogue's ``min_score``, best first (empty
    when none were looked for: a user box, the whole image asked for, no box head).
    """

    box: Box | None
    source: str
    reason: str
    detections: tuple["Detection", ...] = ()

    def describe(self) -> dict[str, Any]:
        """The answer's ``query`` fields about the box."""
        return {"bbox": list(self.box) if self.box else None, "box_source": self.source, "box_reason": self.reason,
                "detections": [d.to_dict() for d in self.detections]}


class Searcher:
    """A model and an open index, loaded once and shared by the CLI and every HTTP request.

    ``store`` is one committed state of the index; :class:`mmfl.catalog.Catalog` replaces it
    after each live update. Every search reads it once and uses that state throughout, so it
    answers from the old catalogue or the new one, never a mix.
    """

    def __init__(self, index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 onnx: str | Path | None = None, with_model: bool = True, min_score: float | None = None):
        """``onnx``: an exported graph (``mmfl export --onnx``) to run with ONNX Runtime instead of the checkpoint.
        ``with_model=False`` opens the index alone (searches and adds by vector, removals). ``min_score``:
        the least score of a predicted garment box (default: the checkpoint's ``box.min_score``)."""
        from mmfl.localise import NO_BOX_HEAD, box_settings, check_min_score, load_box_detector

        if onnx and checkpoint:
            raise MMFLError(f"--checkpoint {checkpoint} and --onnx {onnx}: give one of them")
        self.index_dir = Path(index_dir)
        self.device = device
        self.onnx = onnx
        self.store = open_store(self.index_dir)
        self.model: Any = None
        self.detector: Any = None
        self.no_box_reason = NO_BOX_HEAD
        try:
            if onnx:
                self.model = load_index_onnx(self.index_dir, self.store.manifest, onnx, device)
            elif with_model:
                self.model = load_index_model(self.index_dir, self.store.manifest, checkpoint, device)
            if self.model is not None:
                self.detector, self.no_box_reason = load_box_detector(self.model, onnx)
            self.min_score = check_min_score(
                box_settings(self.detector or self.model)["min_score"] if min_score is None else min_score)
        except BaseException:
            self.store.close()
            raise

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    def require_model(self) -> Any:
        """The model, or a one-line error when the index was opened without one."""
        if self.model is None:
            raise MMFLError(f"{self.index_dir}: opened without a model; photos need one (open it with the checkpoint)")
        return self.model

    def search(self, image: Image.Image, k: int = 20, bbox: Box | None = None, flt: Filter = Filter(),
               whole_image: bool = False) -> dict[str, Any]:
        """``{"results": [...], "query": {...}}`` for one decoded photo: the service's and ``mmfl search --json``'s answer."""
        return self.search_photos([image], None, k, [bbox], flt, whole_image)[0]

    def search_vector(self, vector: np.ndarray, k: int = 20, flt: Filter = Filter()) -> dict[str, Any]:
        """The answer for an embedding (D,) computed elsewhere, scaled to unit length as the gallery's are
        (so scores stay cosines); it says nothing about a photo."""
        check_k(k)
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.manifest["embed_dim"],):
            raise DataError(f"query vector has shape {vector.shape}; the index holds {self.manifest['embed_dim']}-d vectors")
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise DataError("query vector must be finite and non-zero")
        vector = vector / norm
        start = time.perf_counter()
        answer = self._answer(self.store, Query(vector, None, ()), k, flt, None, None)
        answer["query"]["took_ms"] = round((time.perf_counter() - start) * 1000, 1)
        return answer

    @staticmethod
    def _answer(store: GalleryStore, query: Query, k: int, flt: Filter, size: tuple[int, int] | None,
                choice: BoxChoice | None) -> dict[str, Any]:
        hits = search_items(store, query.vector, k, flt)
        return {
            "results": [hit_json(h) for h in hits],
            "query": {
                "width": size[0] if size else None, "height": size[1] if size else None,
                **(choice.describe() if choice else {"bbox": None}),
                "k": k, "filters": flt.describe(), "category": query.category,
                "attributes": list(query.attributes), "took_ms": None,
            },
        }

    def search_photo(self, source: str | Path | bytes | Image.Image, name: str | None = None, k: int = 20,
                     bbox: Box | None = None, flt: Filter = Filter(), whole_image: bool = False) -> dict[str, Any]:
        """:meth:`search` for an encoded photo (a path or uploaded bytes), decoded no larger than the model needs.

        A phone photo is shrunk to the model's input anyway, so it is decoded at a reduced JPEG
        scale (:func:`mmfl.data.images.open_crop`); the answer still reports the photo's full
        size and the box in its pixels.
        """
        return self.search_photos([source], [name], k, [bbox], flt, whole_image)[0]

    def search_photos(self, sources: Sequence[str | Path | bytes | Image.Image], names: Sequence[str | None] | None = None,
                      k: int = 20, boxes: Sequence[Box | None] | None = None, flt: Filter = Filter(),
                      whole_image: bool = False) -> list[dict[str, Any]]:
        """:meth:`search_photo` for several photos (encoded, or decoded PIL images), embedded in one batched pass.

        Each photo is searched inside its box when given; without one, inside the best predicted
        garment box (unless ``whole_image``); see :meth:`choose_box`. ``took_ms`` is the whole call's.
        """
        check_k(k)
        start = time.perf_counter()
        model = self.require_model()
        size = model_input_size(model)
        names = list(names) if names is not None else [None] * len(sources)
        boxes = list(boxes) if boxes is not None else [None] * len(sources)
        inputs, sizes, choices = [], [], []
        for source, name, box in zip(sources, names, boxes):
            label = photo_label(source, name)
            if self.detects(box, whole_image):  # one decode for the detector and the crop
                image, full = open_photo(source, None, label, min_size=self._decode_size(size, True))
                choice = self.choose_box(box, whole_image, (image, full))
                tensor = decoded_input(image, full, choice.box, size, label)
            else:
                choice = self.choose_box(box, whole_image)
                tensor, full = model_input(source, choice.box, size, label)
                if choice.source == USER:  # report the box as searched: clamped to the photo
                    choice = replace(choice, box=check_box(choice.box, *full, label))
            inputs.append(tensor)
            sizes.append(full)
            choices.append(choice)
        queries = embed_inputs(model, inputs, self.device)
        store = self.store
        answers = [self._answer(store, q, k, flt, full, c) for q, full, c in zip(queries, sizes, choices)]
        took = round((time.perf_counter() - start) * 1000, 1)
        for answer in answers:
            answer["query"]["took_ms"] = took
        return answers

    def search_garments(self, source: str | Path | bytes | Image.Image, name: str | None = None, k: int = 20,
                        flt: Filter = Filter()) -> dict[str, Any]:
        """One search per detected garment (a photo of a whole outfit: the top, the trousers, ...), embedded
        in one batched pass.

        The answer is :meth:`search_photo`'s for the best garment plus ``garments``: per detection, its
        ``box``, ``category``, ``score``, what the model reads in it (``query_category``,
        ``query_attributes``) and its ``results``. With no garment found (or no box head) there is one
        entry, for the whole photo, and ``box_reason`` says why.
        """
        check_k(k)
        start = time.perf_counter()
        model = self.require_model()
        label = photo_label(source, name)
        size = model_input_size(model)
        # the one decode of the photo
        image, full = open_photo(source, None, label, min_size=self._decode_size(size, self.detects(None, False)))
        best = self.choose_box(None, False, (image, full))
        crops = [d.box for d in best.detections] if best.box is not None else [None]
        queries = embed_inputs(model, [decoded_input(image, full, box, size, label) for box in crops], self.device)
        store = self.store
        answer = self._answer(store, queries[0], k, flt, full, best)  # the best garment is the first
        answer["garments"] = []
        for i, (query, box) in enumerate(zip(queries, crops)):
            detection = best.detections[i] if box is not None else None
            answer["garments"].append({
                "box": list(box) if box is not None else None,
                "box_source": PREDICTED if box is not None else WHOLE,
                "category": detection.category if detection else None,
                "score": round(detection.score, 4) if detection else None,
                "query_category": query.category, "query_attributes": list(query.attributes),
                "results": answer["results"] if i == 0 else [hit_json(h) for h in search_items(store, query.vector, k, flt)],
            })
        answer["query"]["took_ms"] = round((time.perf_counter() - start) * 1000, 1)
        return answer

    def _decode_size(self, size: int, detects: bool) -> int:
        """``min_size`` of a query photo's one decode for model input ``size``: larger when the detector
        chooses the box, which is then cropped from it (:data:`DETECT_DECODE_FACTOR`)."""
        from mmfl.localise import box_settings

        return max(DETECT_DECODE_FACTOR * size, box_settings(self.detector)["size"]) if detects else size

    def detects(self, box: Box | None, whole_image: bool) -> bool:
        """Whether :meth:`choose_box` asks the garment detector (no box given, whole image not asked, a box head)."""
        return box is None and not whole_image and self.detector is not None

    def choose_box(self, box: Box | None, whole_image: bool,
                   decoded: tuple[Image.Image, tuple[int, int]] | None = None) -> BoxChoice:
        """The part of the photo to search (see :class:`BoxChoice`): a given ``box`` always wins (clamped by the
        decode; one with no area in the photo is a DataError), else the best predicted garment at or above
        ``min_score``, else the whole photo, with the reason. ``decoded`` is what the detector reads when
        :meth:`detects`: the photo as :func:`open_photo` decoded it whole (maybe at a reduced JPEG scale) and
        its upright size, so the caller crops the chosen box from that same decode."""
        if box is not None:
            return BoxChoice(box, USER, "box given by the user")
        if whole_image:
            return BoxChoice(None, WHOLE, WHOLE_ASKED)
        if self.detector is None:
            return BoxChoice(None, WHOLE, self.no_box_reason)
        if decoded is None:
            raise MMFLError("choose_box: the garment detector needs the decoded photo")
        from mmfl.localise import choose_box, detect_in_photo

        image, full = decoded
        found = detect_in_photo(self.detector, image, full)  # every peak: the reason names the best score
        chosen, reason = choose_box(found, full, min_score=self.min_score)
        passing = tuple(d for d in found if d.score >= self.min_score)
        return BoxChoice(chosen, PREDICTED if chosen is not None else WHOLE, reason, passing)

    def detect(self, source: str | Path | bytes | Image.Image, name: str | None = None,
               min_score: float | None = None) -> list["Detection"]:
        """The garments the box head finds in a photo, best first, in the photo's full upright pixels
        (clamped to it), scoring at least ``min_score`` (default: :attr:`min_score`)."""
        from mmfl.localise import box_settings, check_min_score, detect_in_photo

        if self.detector is None:
            raise MMFLError(f"{self.index_dir}: cannot detect garments: {self.no_box_reason}")
        # decoded no larger than the detector's input needs
        image, full = open_photo(source, None, photo_label(source, name), min_size=box_settings(self.detector)["size"])
        return detect_in_photo(self.detector, image, full,
                               self.min_score if min_score is None else check_min_score(min_score))

    def close(self) -> None:
        self.store.close()


def photo_label(source: str | Path | bytes | Image.Image, name: str | None) -> str:
    """What errors call a query photo: ``name``, else its path, else "uploaded image" or "query image"."""
    if name:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    return "uploaded image" if isinstance(source, bytes) else "query image"


def check_k(k: int) -> None:
    """Refuse a result count outside 1..MAX_K with a one-line error."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise DataError(f"k={k!r}: must be an integer between 1 and {MAX_K}")
