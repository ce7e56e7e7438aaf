"""Finding the garment in a customer's whole photo: the one module search, serve and the web page call.

Consumer-to-shop retrieval is scored with the garment's box given, but a shopper uploads a whole
photo, and searching the whole photo (background, the wearer, other garments) ranks worse
(docs/RESULTS.md, "Finding the garment"). A model trained with ``model.box_head=true`` predicts
garment boxes (:mod:`mmfl.models.box_head`); this module turns them into boxes in the photo's
own pixels and decides which box a search uses.

``mmfl search``, the HTTP service and the web page get this through :class:`mmfl.Catalog`
(:meth:`mmfl.index.search.Searcher.choose_box`), and :meth:`mmfl.Retriever.detect` directly;
:func:`detect_in_photo` scales boxes from a reduced JPEG decode to the full photo, and
:func:`load_box_detector` finds what predicts boxes (the model, or an ONNX export's box graph).
The calls underneath::

    from mmfl.localise import box_settings, choose_box, detect, has_box_head

    detections = detect(model, image) if has_box_head(model) and bbox is None else []  # upright RGB PIL image
    box, reason = choose_box(detections, image.size, user_box=bbox,    # bbox: the user's box or None
                             min_score=box_settings(model)["min_score"])
    query = embed_query(model, image, box)                              # box None: the whole photo
    # show ``reason`` (one line) with the results, and the detections if the page draws them

Rules of :func:`choose_box`: a box the user gave always wins (clamped to the photo); otherwise the
highest-scoring detection at or above ``min_score`` (pass the checkpoint's ``box.min_score``, from
:func:`box_settings`), clamped; when nothing qualifies the box is None (search the whole photo) and ``reason`` says so.
``model`` is a checkpoint's model (``mmfl.checkpoint.load_model``) or an
:class:`mmfl.export.OnnxBoxDetector`; both carry ``meta`` with the config and the box categories.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmfl.config import BoxConfig
from mmfl.data.box_dataset import photo_tensor
from mmfl.data.images import check_box
from mmfl.data.records import Box
from mmfl.errors import MMFLError

#: Used when a checkpoint's config predates the ``box`` section.
DEFAULT_SIZE = BoxConfig.size
DEFAULT_MIN_SCORE = BoxConfig.min_score
DEFAULT_MAX_BOXES = BoxConfig.max_boxes
#: Category name of boxes from a head trained without categories.
NO_CATEGORY = "garment"
#: Why a search uses the whole photo when nothing predicts boxes.
NO_BOX_HEAD = "model has no box head"


@dataclass(frozen=True)
class Detection:
    """One garment box in the original photo's pixels (clamped, never empty), best-first order."""

    box: Box
    category: str
    score: float  # objectness of the box's centre, 0..1
    category_score: float  # probability of ``category`` among the head's categories (1.0 without any)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["box"] = list(self.box)
        return out


def has_box_head(model: Any) -> bool:
    """Whether ``model`` predicts boxes (a PyTorch model built with ``model.box_head`` or an ONNX box graph)."""
    return getattr(model, "box_head", None) is not None


def load_box_detector(model: Any, onnx: str | Path | None) -> tuple[Any, str]:
    """What predicts garment boxes for ``model`` (None if nothing does) and the reason given when nothing does.

    A PyTorch model with a box head detects itself. An ONNX embedding graph uses the box graph
    ``mmfl export`` wrote beside it (``NAME.boxes.onnx``) when there is one, refused unless exported
    from the same checkpoint (its boxes would belong to other weights).
    """
    if onnx is None:
        return (model, "") if has_box_head(model) else (None, NO_BOX_HEAD)
    from mmfl.export import OnnxBoxDetector, box_graph_path

    path = box_graph_path(onnx)
    if not path.is_file():
        return None, f"{NO_BOX_HEAD} (no box graph {path.name} beside the ONNX file)"
    detector = OnnxBoxDetector(path)
    if detector.meta["checkpoint_sha256"] != model.meta["checkpoint_sha256"]:
        raise MMFLError(f"{path}: exported from another checkpoint than {onnx} (checkpoint sha256 "
                        f"{detector.meta['checkpoint_sha256'][:12]} vs {model.meta['checkpoint_sha256'][:12]}); "
                        "export both again with 'mmfl export'")
    return detector, ""


def box_settings(model: Any) -> dict[str, Any]:
    """The checkpoint's ``box`` settings (input size, max boxes, min score), with defaults for old configs."""
    box = ((getattr(model, "meta", None) or {}).get("config") or {}).get("box") or {}
    return {"size": int(box.get("size", DEFAULT_SIZE)), "max_boxes": int(box.get("max_boxes", DEFAULT_MAX_BOXES)),
            "min_score": float(box.get("min_score", DEFAULT_MIN_SCORE))}


def check_min_score(min_score: float) -> float:
    """A least detection score in [0, 1], or a one-line error."""
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0.0 <= min_score <= 1.0:
        raise MMFLError(f"min_score={min_score!r}: must be a number in [0, 1]")
    return float(min_score)


def detect(model: Any, image: Image.Image, max_boxes: int | None = None,
           min_score: float = 0.0) -> list[Detection]:
    """Garment boxes of ``image`` (upright RGB), best first, with score >= ``min_score``.

    The photo is stretched to the detector's square input (``box.size`` of the checkpoint), as
    in training; boxes are mapped back to the photo's pixels, rounded outwards and clamped to it.
    """
    if not has_box_head(model):
        raise MMFLError(f"{_name(model)}: this model has no box head (train it with model.box_head=true)")
    settings = box_settings(model)
    size = settings["size"]
    k = settings["max_boxes"] if max_boxes is None else max_boxes
    if k < 1:
        raise MMFLError(f"max_boxes must be at least 1, got {k}")
    x = photo_tensor(image, size)[None]
    device = _device(model)
    with torch.inference_mode():
        found = model.detect(x.to(device), max_boxes=k)
    names = list((getattr(model, "meta", None) or {}).get("box_category_names") or [])
    width, height = image.size
    sx, sy = width / size, height / size
    out = []
    for box, score, cat, cat_score in zip(found.boxes[0].tolist(), found.scores[0].tolist(),
                                          found.categories[0].tolist(), found.category_scores[0].tolist()):
        if score <= 0.0 or score < min_score:  # 0: a cell that is no peak (mmfl.models.box_head.decode_boxes)
            continue
        mapped = clamp_box((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), width, height)
        if mapped is None:
            continue
        name = names[cat] if 0 <= cat < len(names) else NO_CATEGORY
        out.append(Detection(mapped, name, float(score), float(cat_score if names else 1.0)))
    return out


def detect_in_photo(model: Any, image: Image.Image, full: tuple[int, int], min_score: float = 0.0) -> list[Detection]:
    """:func:`detect` on a photo decoded whole at a reduced scale (``image``, from
    :func:`mmfl.model_input.open_photo` with ``min_size``), boxes in the full photo's ``full`` upright pixels."""
    found = detect(model, image, min_score=min_score)
    if image.size == full:
        return found
    sx, sy = full[0] / image.width, full[1] / image.height
    out = []
    for d in found:
        box = clamp_box((d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy), *full)
        if box is not None:
            out.append(Detection(box, d.category, d.score, d.category_score))
    return out


def clamp_box(box: tuple[float, float, float, float], width: int, height: int) -> Box | None:
    """``box`` rounded outwards to whole pixels and clamped to a ``width`` x ``height`` photo; None when
    nothing of it is left inside."""
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return x1, y1, x2, y2


def choose_box(detections: list[Detection], image_size: tuple[int, int], user_box: Box | None = None,
               min_score: float = DEFAULT_MIN_SCORE) -> tuple[Box | None, str]:
    """The box to search with and a one-line reason; None means "search the whole photo".

    A ``user_box`` always wins (clamped; a box with no area inside the photo is a DataError, as
    for ``mmfl search --bbox``). Otherwise the best detection scoring at least ``min_score``.
    """
    width, height = image_size
    if user_box is not None:
        return check_box(user_box, width, height, "given box"), "box given by the user"
    passing = [d for d in detections if d.score >= min_score]
    if not passing:
        best = max((d.score for d in detections), default=None)
        found = f"best score {best:.2f}" if best is not None else "no candidate box"
        return None, f"no garment found ({found}, below {min_score:.2f}): searched the whole photo"
    top = max(passing, key=lambda d: d.score)
    box = clamp_box(top.box, width, height)
    if box is None:
        return None, "the predicted box lies outside the photo: searched the whole photo"
    return box, f"predicted {top.category} box (score {top.score:.2f})"


def _device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is None:
        return torch.device("cpu")
    return next(params()).device


def _name(model: Any) -> str:
    meta = getattr(model, "meta", None) or {}
    return str(meta.get("onnx") or meta.get("checkpoint") or "model")
