"""The Python API for embedding photos: ``Retriever.load(checkpoint).embed(images, boxes)``.

Engineers putting visual search on a shop want vectors and attribute names from Python without
reading the CLI's source. A :class:`Retriever` holds one loaded model and turns photos (paths,
encoded bytes or PIL images, each optionally with a garment box) into L2-normalised embeddings
and decoded predictions. It adds no preprocessing of its own: every photo becomes model input
through :func:`model_input` (decoded by :func:`mmfl.data.images.open_crop`, the decoder of training,
turned upright, cropped, resized by :func:`mmfl.data.transforms.eval_transform`) and is embedded by
:func:`mmfl.extract.forward`: the one path that ``mmfl index`` (:func:`mmfl.extract.extract_features`),
``mmfl search``, the HTTP service and live adds (:mod:`mmfl.index.search`, :mod:`mmfl.catalog`)
also take, so its vectors match an index built from the same checkpoint. ``mmfl embed`` is a thin
command over this class.

Inputs are checked before any work: a single path where a list is expected, a box list of
another length, or a box with no area is one :class:`~mmfl.errors.MMFLError` line.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from mmfl.data.records import Box
from mmfl.errors import DataError, MMFLError

if TYPE_CHECKING:
    import torch

#: What one image may be: a file path, the encoded file's bytes, or a decoded PIL image.
ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image]
#: A garment box ``(x1, y1, x2, y2)`` in the full photo's pixels, or None for the whole photo.
BoxInput = Union[Sequence[float], None]
#: ``progress`` of :meth:`Retriever.embed`: a bar on stderr (True), none (False), or a callback
#: receiving the number of images finished with each batch.
ProgressArg = Union[bool, Callable[[int], None]]


@dataclass(frozen=True)
class ImagePrediction:
    """What the model says about one photo.

    ``attributes`` are decided as the index decides predicted attributes (the checkpoint's
    per-attribute thresholds and exclusive groups, :class:`mmfl.index.labels.AttributeDecoder`),
    most probable first; ``attribute_probs`` has every attribute's probability in the order of
    :attr:`Retriever.attribute_names` (None without an attribute head), likewise
    ``category_probs`` for :attr:`Retriever.category_names`.
    """

    embedding: np.ndarray
    category: str | None
    attributes: tuple[str, ...]
    attribute_probs: np.ndarray | None
    category_probs: np.ndarray | None


class Retriever:
    """One loaded checkpoint: photos in, embeddings and predictions out. Build it with :meth:`load`."""

    def __init__(self, model: "torch.nn.Module", device: "torch.device") -> None:
        """Wrap a model from :func:`mmfl.checkpoint.load_model` already on ``device``."""
        from mmfl.index.labels import AttributeDecoder

        self.model = model.eval()
        self.device = device
        self._decoder = AttributeDecoder.from_meta(model.meta)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], device: str = "cpu") -> "Retriever":
        """Load ``checkpoint`` (a ``.pt`` from ``mmfl train``) onto ``device`` (cpu, cuda, cuda:N or auto).

        A missing, corrupt or foreign file is a one-line :class:`~mmfl.errors.CheckpointError`.
        """
        from mmfl.checkpoint import load_model
        from mmfl.commands.common import resolve_device

        if not isinstance(checkpoint, (str, os.PathLike)):
            raise MMFLError(f"checkpoint: expected a path to a .pt file, got {type(checkpoint).__name__}")
        try:
            dev = resolve_device(device)
        except RuntimeError as exc:
            raise MMFLError(f"device {device!r}: {str(exc).splitlines()[0]}") from None
        return cls(load_model(checkpoint, dev), dev)

    @property
    def embed_dim(self) -> int:
        """Length of every embedding (the concatenated branch widths)."""
        return int(self.model.embed_dim)

    @property
    def input_size(self) -> int:
        """Side in pixels of the square the model sees (each crop is resized to it, as in training)."""
        from mmfl.index.build import model_input_size

        return model_input_size(self.model)

    @property
    def attribute_names(self) -> list[str]:
        """Names of the attribute head's outputs (empty when the checkpoint has none)."""
        return list(self.model.meta["attribute_names"])

    @property
    def category_names(self) -> list[str]:
        """Names of the category head's outputs (empty when the checkpoint has none)."""
        return list(self.model.meta["category_names"])

    @property
    def checkpoint(self) -> str:
        """The file the weights were loaded from, as given to :meth:`load`."""
        return str(self.model.meta["checkpoint"])

    @property
    def checkpoint_sha256(self) -> str:
        """Identifies the weights: vectors are comparable only between equal hashes."""
        return str(self.model.meta["checkpoint_sha256"])

    def embed(self, images: Sequence[ImageInput], boxes: Sequence[BoxInput] | None = None, batch_size: int = 32,
              workers: int = 0, progress: ProgressArg = False) -> np.ndarray:
        """``(len(images), embed_dim)`` float32 embeddings, L2-normalised (cosine similarity = dot product).

        ``boxes``: None, or one box (or None) per image, in the full photo's upright pixels;
        boxes are clamped to the photo, one without area inside it is an error naming the image.
        ``workers`` > 0 decodes in that many processes (worth it for folders of large JPEGs).
        """
        return self._run(images, boxes, batch_size, workers, progress, predictions=False)[0]

    def predict(self, images: Sequence[ImageInput], boxes: Sequence[BoxInput] | None = None,
                batch_size: int = 32) -> list[ImagePrediction]:
        """Per image: the embedding (as :meth:`embed` returns it) plus the decided category and attributes."""
        from mmfl.index.labels import predicted_category

        emb, attr, cat = self._run(images, boxes, batch_size, 0, False, predictions=True)
        return [
            ImagePrediction(
                embedding=emb[i],
                category=predicted_category(None if cat is None else cat[i], self.category_names),
                attributes=self._decoder.attributes(None if attr is None else attr[i]),
                attribute_probs=None if attr is None else attr[i],
                category_probs=None if cat is None else cat[i],
            )
            for i in range(len(emb))
        ]

    def _run(self, images: Sequence[ImageInput], boxes: Sequence[BoxInput] | None, batch_size: int, workers: int,
             progress: ProgressArg, predictions: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One batched pass: (embeddings, attribute probs | None, category probs | None) as float32 arrays."""
        import torch
        from torch.utils.data import DataLoader

        from mmfl.extract import forward
        from mmfl.progress import progress as make_progress

        sources = check_images(images)
        crops = check_boxes(boxes, len(sources))
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise MMFLError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise MMFLError(f"workers: expected 0 or a positive integer, got {workers!r}")
        if not sources:
            return np.zeros((0, self.embed_dim), np.float32), None, None
        loader = DataLoader(InputDataset(sources, crops, self.input_size), batch_size=batch_size, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        bar = make_progress(len(sources), "embedding", progress is True, unit="img")
        report = bar.update if bar is not None else (progress if callable(progress) else None)
        out: list[list[np.ndarray]] = [[], [], []]
        try:
            with torch.inference_mode():
                for batch in loader:
                    results = forward(self.model, batch.to(self.device, non_blocking=True), predictions)
                    for kept, value in zip(out, results):
                        if value is not None:
                            kept.append(value.float().cpu().numpy())
                    if report is not None:
                        report(len(batch))
        except MMFLError as exc:  # from a worker process, the message carries the worker's traceback
            if workers == 0:
                raise
            from mmfl.cli import one_line

            raise type(exc)(one_line(exc)) from None
        finally:
            if bar is not None:
                bar.close()
        emb = np.ascontiguousarray(np.concatenate(out[0]), dtype=np.float32)
        attr = np.concatenate(out[1]).astype(np.float32) if out[1] else None
        cat = np.concatenate(out[2]).astype(np.float32) if out[2] else None
        return emb, attr, cat


def check_images(images: Any) -> list[ImageInput]:
    """``images`` as a list, each a path, bytes or PIL image; anything else is one MMFLError line.

    A lone ``str``/path/bytes/PIL image is refused rather than guessed at: iterating a path
    string would otherwise "embed" one image per character.
    """
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise MMFLError(f"images: expected a list of images, got one {type(images).__name__}; "
                        "pass [image] for a single one")
    if not isinstance(images, Sequence):
        raise MMFLError(f"images: expected a list of paths, bytes or PIL images, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, (str, bytes, os.PathLike, Image.Image)):
            raise MMFLError(f"images[{i}]: expected a path, bytes or a PIL image, got {type(image).__name__}")
    return list(images)


def check_boxes(boxes: Any, count: int) -> list[Box | None]:
    """One integer box or None per image; a wrong container, length or box is one MMFLError line.

    Coordinates are rounded to whole pixels (as ``--bbox`` is); whether the box lies inside the
    photo is checked when the photo is decoded, where its size is known.
    """
    if boxes is None:
        return [None] * count
    if isinstance(boxes, np.ndarray):  # a detector's (N, 4) array
        boxes = boxes.tolist()
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
        raise MMFLError(f"boxes: expected a list with one (x1, y1, x2, y2) or None per image, "
                        f"got {type(boxes).__name__}")
    if len(boxes) != count:
        raise MMFLError(f"boxes: {len(boxes)} boxes for {count} images (give one box or None per image)")
    return [None if box is None else check_box_value(box, f"boxes[{i}]") for i, box in enumerate(boxes)]


def check_box_value(box: Any, label: str) -> Box:
    """``(x1, y1, x2, y2)`` as whole pixels with x2 > x1 and y2 > y1, or one MMFLError line naming ``label``."""
    if isinstance(box, np.ndarray):
        box = box.tolist()
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise MMFLError(f"{label}: expected (x1, y1, x2, y2), got {box!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise MMFLError(f"{label}: expected four numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise MMFLError(f"{label}: {box!r} has a coordinate that is not a finite number")
    x1, y1, x2, y2 = (int(round(v)) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise MMFLError(f"{label}: {box!r} is empty (x2 must exceed x1 and y2 must exceed y1)")
    return x1, y1, x2, y2


def open_photo(source: ImageInput, box: Box | None, name: str, min_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB crop of ``box`` (the whole photo without one) and the whole photo's upright size.

    Paths and bytes go through :func:`~mmfl.data.images.open_crop` exactly as gallery images
    and service uploads do (a JPEG decoded at a reduced scale when ``min_size`` allows). A PIL
    image is already decoded: it gets the same EXIF turn and RGB conversion, so ``Image.open(p)``
    and ``p`` give the same crop. The garment detector reads whole photos through this too.
    """
    from mmfl.data.images import check_box, open_crop, to_rgb

    if not isinstance(source, Image.Image):
        return open_crop(source, box, name, min_size=min_size)
    try:
        image = to_rgb(ImageOps.exif_transpose(source))
    except (OSError, ValueError) as exc:
        raise DataError(f"{name}: cannot use image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    full = image.size
    if box is not None:
        image = image.crop(check_box(box, image.width, image.height, name))
    return image, full


def model_input(source: ImageInput, box: Box | None, size: int, name: str) -> tuple["torch.Tensor", tuple[int, int]]:
    """One photo as the model sees it (upright RGB, cropped to ``box``, resized to ``size``; C, H, W in
    [0, 1]) and the photo's upright (width, height).

    The one way a photo becomes model input, for :class:`Retriever`, :func:`mmfl.extract.extract_features`
    (``mmfl index``, ``mmfl eval``), searches and live adds (:mod:`mmfl.index.search`, :mod:`mmfl.catalog`):
    one decoder means one vector per photo, whichever door it came through.
    """
    from mmfl.data.transforms import eval_transform

    crop, full = open_photo(source, box, name, min_size=size)
    return eval_transform(size)(crop), full


def image_name(source: ImageInput, index: int) -> str:
    """What an error calls an image: its path, or its position for bytes and PIL images."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source))
    return f"images[{index}] ({'bytes' if isinstance(source, bytes) else 'PIL image'})"


class InputDataset:
    """Map-style dataset of :func:`model_input` tensors, so a DataLoader can decode them in worker processes.

    ``names`` are what errors call the photos (default: :func:`image_name`).
    """

    def __init__(self, sources: Sequence[ImageInput], boxes: Sequence[Box | None], size: int,
                 names: Sequence[str] | None = None) -> None:
        self.sources, self.boxes, self.size = list(sources), list(boxes), size
        self.names = list(names) if names is not None else [image_name(s, i) for i, s in enumerate(self.sources)]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> "torch.Tensor":
        return model_input(self.sources[index], self.boxes[index], self.size, self.names[index])[0]
