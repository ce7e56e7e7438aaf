"""The step every reader ends with: de-duplicate, look at each image once, validate boxes.

Three depths of checking, because the real Consumer-to-shop set has ~240k images:

* ``"none"``: the file exists (a ``stat``);
* ``"header"``: PIL reads the header only, which gives the size (EXIF orientation applied, as
  :func:`~mmfl.data.images.open_image` does) so boxes can be clamped, without decoding pixels;
* ``"decode"``: every image is decoded, which also catches truncated files.

Images are probed on a small thread pool: the work is file I/O, which releases the GIL, and on
network storage it is latency-bound.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Sequence

from PIL import Image

from mmfl.data.formats.annotations import Problems
from mmfl.data.images import MAX_PIXELS, check_box, open_image
from mmfl.data.records import Record, dedupe
from mmfl.errors import DataError

CHECK_MODES = ("none", "header", "decode")

#: what probing an image found: its (width, height), None (exists, size unknown) or a reason it is unusable
Probe = tuple[int, int] | None | str

_WORKERS = 8
_CHUNK = 256
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


def finish_records(records: Sequence[Record], problems: Problems, check_images: str) -> list[Record]:
    """De-duplicate, drop (via ``problems``) records whose image is unusable, clamp boxes.

    A box is clamped to the image when it sticks out and reported when nothing of it is inside.
    Problems name the record's annotation line (``Record.source``) and the image.
    """
    unique = dedupe(records)
    found = probe_images(list(dict.fromkeys(r.path for r in unique)), check_images)
    out = []
    for rec in unique:
        probe = found[rec.path]
        if isinstance(probe, str):
            problems.bad(rec.source, f"{rec.path}: {probe}")
            continue
        if rec.box is not None and probe is not None:
            width, height = probe
            try:
                box = check_box(rec.box, width, height, rec.path)
            except DataError:
                problems.bad(rec.source, f"{rec.path}: box {rec.box} lies outside the {width}x{height} image")
                continue
            if box != rec.box:
                rec = replace(rec, box=box)
        out.append(rec)
    return out


def probe_images(paths: list[str], mode: str) -> dict[str, Probe]:
    """Probe each path once with the given depth; returns path -> :data:`Probe`."""
    if mode not in CHECK_MODES:
        raise DataError(f"check_images must be one of {', '.join(CHECK_MODES)}, got {mode!r}")
    probe: Callable[[str], Probe] = {"none": _exists, "header": _header_size, "decode": _decoded_size}[mode]
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    if len(chunks) <= 1:
        results = [probe(p) for p in paths]
    else:
        with ThreadPoolExecutor(_WORKERS) as pool:
            results = [r for chunk in pool.map(lambda c: [probe(p) for p in c], chunks) for r in chunk]
    return dict(zip(paths, results))


def _exists(path: str) -> Probe:
    return None if os.path.isfile(path) else "file not found"


def _header_size(path: str) -> Probe:
    """Upright (width, height) from the header alone; pixels are never decoded."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        return "file not found"
    except Image.DecompressionBombError:
        return "image too large (decompression bomb refused)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read image header ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if width * height > MAX_PIXELS:
        return f"image is {width}x{height}, over the {MAX_PIXELS} pixel limit"
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def _decoded_size(path: str) -> Probe:
    """Size after a full decode through the same function training uses."""
    try:
        img = open_image(path, name=path)
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return img.width, img.height
