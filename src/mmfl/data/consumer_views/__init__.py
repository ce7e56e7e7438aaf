"""Consumer-style views of shop photos: the one renderer behind training, validation and the benchmark.

A shop with a catalogue and no customer photos still needs the model to learn what a shopper's
photo of the same garment looks like. A *view* is one such photo generated from a shop photo:
cut, warped, pasted on clutter, occluded, relit, blurred and JPEG-compressed, with the garment's
box known. Two protocols: ``standard`` (:mod:`.standard`) and ``hard`` (:mod:`.hard`, the
default for training). :func:`render_view` is the only entry point: ``mmfl train`` calls it in
its data workers (:mod:`mmfl.data.generated_views`), the validation cache and the real-photo
benchmark (:mod:`mmfl.data.realphoto`) write its bytes to disk, so the same photo and stream give
the same JPEG bytes everywhere.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmfl.data.consumer_views.hard import hard_view
from mmfl.data.consumer_views.standard import consumer_view
from mmfl.data.images import open_crop
from mmfl.data.records import Box
from mmfl.errors import DataError

Renderer = Callable[[Image.Image, np.random.Generator, int], tuple[Image.Image, Box, int]]
#: protocol -> renderer ``(photo, rng, size) -> (view, garment box, JPEG quality)``.
RENDERERS: dict[str, Renderer] = {"standard": consumer_view, "hard": hard_view}
#: Per protocol, bumped whenever its rendering changes, so a cached view is never reused across versions.
RENDER_VERSIONS = {"standard": 2, "hard": 3}
PROTOCOLS = tuple(RENDERERS)
#: A photo's shorter side below this cannot give a view worth learning from (the garment would be
#: blown up from a thumbnail); such photos are refused or skipped before training starts.
MIN_PHOTO_SIDE = 32
#: Largest canvas :func:`view_size` picks by default (the real-photo benchmark's photos are 384 px).
MAX_VIEW_SIZE = 384
#: Default canvas over the model input: the garment's box covers half the canvas side or more, so
#: its crop is never upsampled. Measured against 1.5x on real photos (5 paired seeds): +2.9 top-1,
#: p = 0.016 (docs/RESULTS.md, "Catalogue-only training").
VIEW_SCALE = 2.0


@dataclass(frozen=True)
class RenderedView:
    """One view as it is stored or fed to training: the JPEG file's bytes and the garment's box in it."""

    jpeg: bytes
    box: Box


def check_protocol(protocol: str, key: str = "protocol") -> None:
    if protocol not in RENDERERS:
        raise DataError(f"{key}: unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")


def open_view_source(path: str | Path, size: int, name: str | None = None) -> Image.Image:
    """The shop photo a view of canvas ``size`` is rendered from, refused when too small to give one.

    A JPEG much larger than the canvas decodes at a reduced DCT scale (still at least ``size``
    each way; :func:`mmfl.data.images.open_crop`): a phone-sized catalogue photo would
    otherwise cost more to decode than the whole view costs to render.
    """
    photo, _ = open_crop(path, None, name, min_size=size)
    if min(photo.size) < MIN_PHOTO_SIDE:
        raise DataError(f"{name or path}: photo is {photo.width}x{photo.height}, too small to render a "
                        f"consumer view from (needs {MIN_PHOTO_SIDE} px or more each way)")
    return photo


def render_view(photo: Image.Image, rng: np.random.Generator, size: int, protocol: str) -> RenderedView:
    """A ``size`` x ``size`` view of the RGB ``photo`` drawn from ``rng``, encoded as the JPEG a phone would send.

    The JPEG step is part of the view (its quality is drawn by the renderer), so the bytes
    returned are exactly what the benchmark writes to disk and what training decodes.
    """
    check_protocol(protocol)
    view, box, quality = RENDERERS[protocol](photo, rng, size)
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=quality)
    return RenderedView(buffer.getvalue(), box)


def key_digest(*key: object) -> int:
    """A 64-bit number that is a function of ``key`` alone (its parts joined by ':'), stable across runs."""
    text = ":".join(str(part) for part in key)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def view_rng(*key: object) -> np.random.Generator:
    """A random stream that is a function of ``key`` alone (never of worker count or load order)."""
    return np.random.default_rng(key_digest(*key))


def view_size(input_size: int) -> int:
    """The default canvas: twice the model input, at most 384 px (see VIEW_SCALE)."""
    return min(MAX_VIEW_SIZE, round(VIEW_SCALE * input_size))
