"""Torch Datasets over :class:`~mmfl.data.records.Record` lists: decode, crop by box, transform on the
CPU workers, or (``data.decode=gpu``) only read the bytes for the device to decode. A record that
stands for a generated consumer view is rendered by the worker (:class:`~mmfl.data.generated_views.ViewMaker`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch.utils.data import Dataset

from mmfl.data.gpu_decode import ImageMeta, read_encoded
from mmfl.data.images import load_crop
from mmfl.data.records import Record
from mmfl.data.transforms import ImageTransform

if TYPE_CHECKING:
    from mmfl.data.generated_views import ViewMaker


class RecordDataset(Dataset):
    """Yields ``(image, label, index)``; ``label`` is the item's class index (-1 when unlabelled).

    Decoding errors propagate as :class:`~mmfl.errors.DataError` naming the image and the
    annotation line it came from; readers validate images up front, so these are rare.
    """

    def __init__(self, records: Sequence[Record], transform: ImageTransform, labels: dict[str, int] | None = None,
                 min_size: int = 0, views: ViewMaker | None = None):
        """``min_size``: the size below which ``transform`` never needs a crop; larger JPEGs decode
        at a reduced scale (:func:`mmfl.data.images.open_crop`). 0 decodes at full size. ``views``
        renders the records that are (or are replaced by) generated views."""
        self.records = list(records)
        self.transform = transform
        self.labels = labels or {}
        self.min_size = min_size
        self.views = views

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Generated views are drawn per epoch; call before building the epoch's loader."""
        if self.views is not None:
            self.views.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rec = self.records[index]
        img = self.views.image(rec) if self.views is not None else None
        if img is None:
            img = load_crop(rec.path, rec.box, f"{rec.path} ({rec.source})" if rec.source else rec.path, self.min_size)
        return self.transform(img), self.labels.get(rec.item_id, -1), index


class EncodedRecordDataset(Dataset):
    """Yields ``(data, meta, label, index)`` for :mod:`mmfl.data.gpu_decode`: a JPEG's file bytes and where
    to crop it once the device has decoded it (other formats arrive decoded, as RGB pixels).

    Batch it with :func:`mmfl.data.gpu_decode.collate_encoded`. ``min_size`` is
    :class:`RecordDataset`'s, for the files the worker still decodes.
    """

    def __init__(self, records: Sequence[Record], labels: dict[str, int] | None = None, min_size: int = 0,
                 views: ViewMaker | None = None):
        self.records = list(records)
        self.labels = labels or {}
        self.min_size = min_size
        self.views = views

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        if self.views is not None:
            self.views.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[bytes, ImageMeta, int, int]:
        rec = self.records[index]
        name = f"{rec.path} ({rec.source})" if rec.source else rec.path
        rendered = self.views.render(rec) if self.views is not None else None
        if rendered is not None:  # a generated view is a JPEG already: the device decodes it like a file
            jpeg, box = rendered
            data, meta = jpeg, ImageMeta(f"generated view of {name}", box)
        else:
            data, meta = read_encoded(rec.path, rec.box, name, self.min_size)
        return data, meta, self.labels.get(rec.item_id, -1), index
