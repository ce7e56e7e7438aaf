"""The Python API for embedding photos: ``Retriever.load(checkpoint).embed(images, boxes)``.

Engineers putting visual search on a shop want vectors and attribute names from Python without
reading the CLI's source. A :class:`Retriever` holds one loaded model and turns photos (paths,
encoded bytes or PIL images, each optionally with a garment box) into L2-normalised embeddings
and decoded predictions. It adds no preprocessing of its own: every photo is checked and becomes
model input in :mod:`mmfl.model_input` and is embedded by :func:`mmfl.extract.forward`, the path
that ``mmfl index``, ``mmfl search``, the HTTP service and live adds also take, so its vectors
match an index built from the same checkpoint. ``mmfl embed`` is a thin command over this class.

``Retriever.load`` takes a checkpoint (``.pt``, PyTorch) or the graph ``mmfl export`` wrote from
one (``.onnx``, run by ONNX Runtime on CPU, as ``mmfl serve --onnx`` does: a machine without
torch's CUDA stack serves the same vectors). The export's box graph beside it
(``NAME.boxes.onnx``) predicts garment boxes for :meth:`Retriever.detect` when present, as a
checkpoint trained with ``model.box_head=true`` does.

Inputs are checked before any work: a single path where a list is expected, a box list of
another length, or a box with no area is one :class:`~mmfl.errors.MMFLError` line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from mmfl.errors import MMFLError
from mmfl.model_input import (
    BoxInput, ImageInput, InputDataset, check_boxes, check_images, image_name, model_input, model_input_size,
    open_photo,
)

if TYPE_CHECKING:
    import torch

    from mmfl.localise import Detection

# model_input is exported from here too: docs/api.md names the decode path mmfl.retriever.model_input.
__all__ = ["ImagePrediction", "ProgressArg", "Retriever", "model_input"]

#: ``progress`` of :meth:`Retriever.embed`: a bar on stderr (True), none (False), or a callback
#: receiving the number of images finished with each batch.
ProgressArg = Union[bool, Callable[[int], None]]


@dataclass(frozen=True)
class ImagePrediction:
    """What the model says about one photo.

    ``attributes`` are decided as the index decides predicted attributes (the checkpoint's
    per-attribute thresholds and exclusive groups, :class:`mmfl.labels.AttributeDecoder`),
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
    """One loaded checkpoint (or its ONNX export): photos in, embeddings and predictions out. Build it with
    :meth:`load`."""

    def __init__(self, model: Any, device: "torch.device", onnx: str | os.PathLike[str] | None = None) -> None:
        """Wrap a model from :func:`mmfl.checkpoint.load_model` already on ``device``, or an
        :class:`mmfl.export.OnnxEmbedder` of the graph ``onnx`` (on the CPU; its box graph, if any, beside it)."""
        from mmfl.labels import AttributeDecoder
        from mmfl.localise import load_box_detector

        self.model = model.eval()
        self.device = device
        self._decoder = AttributeDecoder.from_meta(model.meta)
        self._detector, self._no_box_reason = load_box_detector(model, onnx)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], device: str = "cpu") -> "Retriever":
        """Load ``checkpoint``: a ``.pt`` from ``mmfl train`` onto ``device`` (cpu, cuda, cuda:N or auto), or a
        ``.onnx`` from ``mmfl export``, run by ONNX Runtime on the CPU (device cpu or auto).

        A missing, corrupt or foreign file is a one-line :class:`~mmfl.errors.CheckpointError` (an
        :class:`~mmfl.errors.MMFLError` for an ONNX file).
        """
        from mmfl.checkpoint import load_model
        from mmfl.devices import resolve_device

        if not isinstance(checkpoint, (str, os.PathLike)):
            raise MMFLError(f"checkpoint: expected a path to a .pt or .onnx file, got {type(checkpoint).__name__}")
        if Path(checkpoint).suffix.lower() == ".onnx":
            import torch

            from mmfl.export import OnnxEmbedder

            if device not in ("cpu", "auto"):
                raise MMFLError(f"{checkpoint}: an ONNX graph runs with ONNX Runtime on the CPU; "
                                f"use device='cpu', not {device!r}")
            return cls(OnnxEmbedder(checkpoint), torch.device("cpu"), checkpoint)
        try:
            dev = resolve_device(device)
        except RuntimeError as exc:
            raise MMFLError(f"device {device!r}: {str(exc).splitlines()[0]}") from None
        return cls(load_model(checkpoint, dev), dev)

    @property
    def runtime(self) -> str:
        """``"pytorch"`` for a checkpoint, ``"onnxruntime"`` for an exported graph."""
        return "onnxruntime" if self.model.meta.get("onnx") else "pytorch"

    @property
    def has_box_head(self) -> bool:
        """Whether :meth:`detect` works: the checkpoint has a box head, or the ONNX export's box graph is beside it."""
        return self._detector is not None

    @property
    def embed_dim(self) -> int:
        """Length of every embedding (the concatenated branch widths)."""
        return int(self.model.embed_dim)

    @property
    def input_size(self) -> int:
        """Side in pixels of the square the model sees (each crop is resized to it, as in training)."""
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
        """The file the weights were loaded from, as given to :meth:`load` (for an ONNX graph: the checkpoint
        it was exported from)."""
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
        from mmfl.labels import predicted_category

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

    def detect(self, images: Sequence[ImageInput], min_score: float | None = None) -> list[list["Detection"]]:
        """Per image, the garments the box head finds, best first: ``box`` in the photo's upright pixels (clamped
        to it), ``category``, ``score``, ``category_score``; those scoring at least ``min_score`` (default: the
        checkpoint's ``box.min_score``). Without a box head (or box graph) a one-line MMFLError.

        The search path's detection (:meth:`mmfl.Catalog.detect`): give a box to :meth:`embed` to embed it.
        """
        from mmfl.localise import box_settings, check_min_score, detect_in_photo

        sources = check_images(images)
        if self._detector is None:
            raise MMFLError(f"{self.model.meta.get('onnx') or self.checkpoint}: cannot detect garments: "
                            f"{self._no_box_reason}")
        settings = box_settings(self._detector)
        threshold = settings["min_score"] if min_score is None else check_min_score(min_score)
        found = []
        for i, source in enumerate(sources):  # decoded no larger than the detector's input needs
            image, full = open_photo(source, None, image_name(source, i), min_size=settings["size"])
            found.append(detect_in_photo(self._detector, image, full, threshold))
        return found

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
            from mmfl.errors import one_line

            raise type(exc)(one_line(exc)) from None
        finally:
            if bar is not None:
                bar.close()
        emb = np.ascontiguousarray(np.concatenate(out[0]), dtype=np.float32)
        attr = np.concatenate(out[1]).astype(np.float32) if out[1] else None
        cat = np.concatenate(out[2]).astype(np.float32) if out[2] else None
        return emb, attr, cat
