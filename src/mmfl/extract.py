"""Batched feature extraction: records in, L2-normalised embeddings (and head predictions) out.

Memory stays bounded by the batch: images are decoded by a DataLoader, embedded under
``torch.inference_mode`` (bf16 autocast on CUDA) and moved to the CPU batch by batch.

Every embedding of a photo in mmfl goes through :func:`forward` (gallery extraction here,
:class:`mmfl.Retriever`, searches and live adds in :mod:`mmfl.index.search` and :mod:`mmfl.catalog`),
fed by :mod:`mmfl.model_input` on the CPU path, so a photo gets one vector whichever command
embeds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmfl.data.dataset import EncodedRecordDataset
from mmfl.data.gpu_decode import collate_encoded, eval_images
from mmfl.data.records import Record
from mmfl.model_input import InputDataset
from mmfl.progress import progress as make_progress


@dataclass
class Features:
    """Per-record outputs in record order, all float32 on the CPU.

    ``embeddings`` are L2-normalised (cosine similarity = inner product); ``attribute_probs``
    (sigmoid) and ``category_probs`` (softmax) are filled only when predictions were asked for
    and the model has those heads.
    """

    embeddings: torch.Tensor
    attribute_probs: torch.Tensor | None = None
    category_probs: torch.Tensor | None = None


def extract_features(
    model: torch.nn.Module,
    records: Sequence[Record],
    size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    predictions: bool = False,
    desc: str = "embedding",
    decode_device: torch.device | None = None,
) -> Features:
    """Embed ``records`` (cropped to their boxes, resized to ``size``) with ``model`` on ``device``.

    The model must already live on ``device`` (``load_model(path, device)`` puts it there).

    ``flip`` adds horizontal-flip test-time augmentation: the embeddings of the image and its
    mirror are summed and re-normalised (probabilities are averaged). The model is put in eval
    mode for the pass and returned to its previous mode afterwards, so training can call this.
    ``desc`` labels the progress report on stderr (a bar on a terminal, plain lines in a log;
    none when ``progress`` is False).

    ``decode_device`` (from :func:`mmfl.data.gpu_decode.pick_decode_device`, ``data.decode=gpu``)
    decodes the JPEGs there in one call per batch and resizes them there; the workers only read
    the files. None decodes and resizes on the CPU workers.
    """
    device = torch.device(device)
    if decode_device is None:
        dataset: Any = InputDataset([r.path for r in records], [r.box for r in records], size,
                                        [f"{r.path} ({r.source})" if r.source else r.path for r in records])
    else:
        dataset = EncodedRecordDataset(records, min_size=size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda" and decode_device is None,
                        collate_fn=None if decode_device is None else collate_encoded)
    was_training = model.training
    model.eval()
    embeddings, attributes, categories = [], [], []
    bar = make_progress(len(loader), desc, progress, unit="batch")
    try:
        with torch.inference_mode():
            for batch in loader:
                if decode_device is None:
                    images = batch.to(device, non_blocking=True)
                else:
                    images = eval_images(batch, size, decode_device).to(device)
                emb, attr, cat = forward(model, images, predictions)
                if flip:
                    emb_f, attr_f, cat_f = forward(model, images.flip(-1), predictions)
                    emb = emb + emb_f
                    attr = None if attr is None else (attr + attr_f) / 2
                    cat = None if cat is None else (cat + cat_f) / 2
                embeddings.append(F.normalize(emb, dim=1).cpu())
                if attr is not None:
                    attributes.append(attr.cpu())
                if cat is not None:
                    categories.append(cat.cpu())
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    dim = getattr(model, "embed_dim", 0)
    return Features(
        embeddings=torch.cat(embeddings) if embeddings else torch.zeros(0, dim),
        attribute_probs=torch.cat(attributes) if attributes else None,
        category_probs=torch.cat(categories) if categories else None,
    )


def forward(
    model: Any, images: torch.Tensor, predictions: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(L2-normalised float32 embedding, attribute probs | None, category probs | None) of one batch.

    ``model`` is a PyTorch model or an :class:`mmfl.export.OnnxEmbedder` (both have ``__call__`` and
    ``predict``); the caller holds ``torch.inference_mode``. bf16 autocast on CUDA, float32 elsewhere,
    for every caller alike, so a query is embedded at the gallery's precision.
    """
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        if not predictions:
            return F.normalize(model(images).float(), dim=1), None, None
        pred = model.predict(images)
    attr = None if pred.attribute_logits is None else torch.sigmoid(pred.attribute_logits.float())
    cat = None if pred.category_logits is None else torch.softmax(pred.category_logits.float(), dim=1)
    return F.normalize(pred.embedding.float(), dim=1), attr, cat
