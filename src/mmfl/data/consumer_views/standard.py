"""The ``standard`` consumer view: what separates a street photo from a catalogue photo, moderately.

Per view, in this order (lengths at a 256 px canvas scale with the size):

1. **crop / zoom**: keep 75-100 % of the photo's width and height at a random offset;
2. **perspective**: each corner moves by up to 12 % of the side (a camera not facing the garment);
3. **rotation**: -20..20 degrees (a tilted phone);
4. **background composite**: the warped photo is scaled to 50-85 % of the canvas and pasted at a
   random place on procedural clutter (a two-colour gradient, 6-15 random ellipses, rectangles,
   polygons and lines, sensor noise, defocus blur), edges feathered;
5. **partial occlusion** (60 % of views): an ellipse or rectangle (a hand, a bag, a chair) covering
   8-25 % of the garment's box, placed so that it overlaps the garment;
6. **colour cast**: per-channel gains 0.8-1.2, brightness 0.7-1.25, contrast 0.7-1.2, gamma 0.8-1.25;
7. **blur and noise** (blur in 50 % of views, radius up to 1.5 px at 256 px), then JPEG quality 60-92.

The box is the warped photo's extent on the canvas (clipped to it), as a detector would give
for a street photo.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from mmfl.data.consumer_views.canvas import (
    add_noise, clutter_background, occlude, paste_garment, tilt, tone,
)
from mmfl.data.records import Box


def consumer_view(photo: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, Box, int]:
    """One consumer-style ``size`` x ``size`` view of ``photo``: (image, garment box, JPEG quality).

    The steps and their ranges are listed in the module docstring; the box is the warped
    photo's extent on the canvas, always inside the image and never empty.
    """
    canvas = clutter_background(rng, size)

    # Crop / zoom.
    fw, fh = rng.uniform(0.75, 1.0, size=2)
    cw, ch = max(8, round(photo.width * fw)), max(8, round(photo.height * fh))
    x0, y0 = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    garment = photo.crop((int(x0), int(y0), int(x0) + cw, int(y0) + ch))
    scale = size * rng.uniform(0.5, 0.85) / max(garment.size)
    garment = garment.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BICUBIC).convert("RGBA")

    # Perspective then rotation, carried by the alpha channel (transparent outside the photo).
    garment = tilt(garment, rng, 0.12, 20)
    # Background composite at a random place.
    box = paste_garment(canvas, garment, rng)

    if rng.random() < 0.6:
        occlude(canvas, box, rng)
    canvas = _colour_cast(canvas, rng)
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)) * size / 256))
    canvas = add_noise(canvas, rng, float(rng.uniform(0.0, 6.0)))
    return canvas, box, int(rng.integers(60, 93))


def _colour_cast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting: per-channel gains, brightness, contrast around the mean, and gamma."""
    gains = rng.uniform(0.8, 1.2, size=3) * rng.uniform(0.7, 1.25)
    return tone(img, gains, rng.uniform(0.7, 1.2), rng.uniform(0.8, 1.25))
