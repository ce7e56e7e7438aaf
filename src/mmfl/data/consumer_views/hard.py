"""The ``hard`` consumer view: the real-photo benchmark's hard protocol and the default training views.

The ``standard`` views (:mod:`.standard`) left too little room: at the
GPU size every variant scored 99 % top-1, and at the CPU budget the presets differed by less
than their seed spread. :func:`hard_view` imitates more of what separates a street photo from a
shop photo. Per view, in this order (ranges at a 256 px canvas; lengths scale with the size):

1. **partial view**: keep a window holding 40-70 % of the photo's area (width fraction drawn
   from [area, 1], height = area / width) at a random offset, so only part of the garment is in
   frame, as in a close-up or a photo cut by the frame;
2. **non-rigid deformation**: a smooth displacement field, the sum of 3 sinusoids (0.5-2 cycles
   across the garment, random directions, amplitude 2-6 % of the side each), resampled bicubically
   at every pixel (folds, drape, a garment not lying flat); the field's divergence also shades the
   garment by up to about +/-20 %, darker where the cloth is compressed (the valley of a fold);
3. **perspective**: corners move by up to 15 % of the side; **rotation**: -25..25 degrees;
4. **background composite**: scaled to 55-90 % of the canvas on the same procedural clutter as
   ``standard``, edges feathered;
5. **heavier occlusion** (85 % of views): 1-3 opaque ellipses or rectangles, each covering 8-20 %
   of the garment's box and centred inside it;
6. **strong lighting**: a cast shadow (60 % of views; a soft-edged quadrilateral over part of the
   garment, darkening to 40-70 %), a shading gradient over the whole canvas (from 1.0 down to
   40-80 % in a random direction), a white-balance shift (colour temperature: red and blue gains
   1 +/- 0.25 in opposite directions, green 0.9-1.1), brightness 0.6-1.35, contrast 0.6-1.25,
   gamma 0.75-1.35;
7. **motion blur** (50 % of views): a straight streak of 3-12 px at a random angle;
8. **low resolution** (70 % of views): the view has 64-96 px of detail, scaled up to the canvas
   (drawn at that size and scaled up once; see :func:`hard_view`);
9. sensor noise (sigma 2-8), then JPEG quality 40-85.

The box is the deformed garment's extent on the canvas (where its mask is solid), clipped to
the canvas: it covers the visible garment, occluders and shadow included, as a detector's box
would. Like every renderer it draws only from the stream it is given, so a seed always gives the
same view. The strengths were set once, before comparing any variants, so that the pretrained features alone and the best trained variant both leave room
above and below (the calibration is in docs/RESULTS.md); they were not tuned per variant.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from mmfl.data.consumer_views.canvas import (
    add_noise, clutter_background, gradient, occlude, paste_garment, tilt, tone,
)
from mmfl.data.records import Box

#: The warp's field is computed every this many pixels and interpolated in between: a fold spans
#: at least half the garment, so the field is smooth at that scale and the per-pixel sines cost 1/16.
FIELD_STEP = 4


def hard_view(photo: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, Box, int]:
    """One hard ``size`` x ``size`` consumer view of ``photo``: (image, garment box, JPEG quality).

    A view that ends at low resolution (step 8) is drawn at that resolution from the start and
    scaled up once: what it shows is the same (the photo and the clutter are shrunk with
    antialiasing either way), and drawing 64-96 px instead of the full canvas makes the 70 % of
    views that take this step 3x cheaper, which keeps on-the-fly training fed (docs/RESULTS.md).
    """
    low = int(rng.integers(64, 97)) if rng.random() < 0.7 else size
    work = min(size, low)  # the side everything up to the noise is drawn at
    unit = work / 256
    canvas = clutter_background(rng, size)
    if work < size:
        canvas = canvas.resize((work, work), Image.BILINEAR, reducing_gap=2.0)

    # Partial view: 40-70 % of the photo's area in frame.
    area = rng.uniform(0.4, 0.7)
    fw = rng.uniform(area, 1.0)
    fh = area / fw
    cw, ch = max(8, round(photo.width * fw)), max(8, round(photo.height * fh))
    x0, y0 = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    garment = photo.crop((int(x0), int(y0), int(x0) + cw, int(y0) + ch))
    scale = work * rng.uniform(0.55, 0.9) / max(garment.size)
    garment = garment.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BICUBIC)

    garment = _drape(garment, rng)
    garment = tilt(garment, rng, 0.15, 25)
    box = paste_garment(canvas, garment, rng)

    if rng.random() < 0.85:
        for _ in range(int(rng.integers(1, 4))):
            occlude(canvas, box, rng, (0.08, 0.2), (0.4, 2.5))
    if rng.random() < 0.6:
        canvas = _shadow(canvas, box, rng)
    canvas = _lighting(canvas, rng)
    if rng.random() < 0.5:
        canvas = _motion_blur(canvas, rng, float(rng.uniform(3.0, 12.0)) * unit)
    if work < size:
        canvas = canvas.resize((size, size), Image.BICUBIC)
        box = _scale_box(box, size / work, size)
    canvas = add_noise(canvas, rng, float(rng.uniform(2.0, 8.0)))
    return canvas, box, int(rng.integers(40, 86))


def _scale_box(box: Box, factor: float, size: int) -> Box:
    """``box`` drawn on a smaller canvas, on the ``size`` canvas: widened to whole pixels, clipped."""
    x1, y1, x2, y2 = box
    return (int(x1 * factor), int(y1 * factor), min(size, int(np.ceil(x2 * factor))),
            min(size, int(np.ceil(y2 * factor))))


def _drape(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A smooth non-rigid warp (sum of sinusoidal displacements) with fold shading, on RGBA.

    Returns an RGBA image of the same size, transparent where the warp pulls in from outside
    the photo, so the silhouette follows the deformation and the box can be read from alpha.
    """
    w, h = img.size
    dx, dy, div = np.zeros((3, max(2, -(-h // FIELD_STEP)), max(2, -(-w // FIELD_STEP))), np.float32)
    # the field on a coarse grid of pixel centres (normalised coordinates), then interpolated to every pixel
    u = (np.arange(dx.shape[1], dtype=np.float32) + 0.5) / dx.shape[1]
    v = (np.arange(dx.shape[0], dtype=np.float32) + 0.5) / dx.shape[0]
    for _ in range(3):
        theta, psi = rng.uniform(0, 2 * np.pi, size=2)
        amp, freq, phase = rng.uniform(0.02, 0.06), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        arg = 2 * np.pi * freq * (u[None, :] * np.cos(theta) + v[:, None] * np.sin(theta)) + phase
        wave = np.sin(arg)
        dx += amp * w * np.cos(psi) * wave
        dy += amp * h * np.sin(psi) * wave
        div += amp * 2 * np.pi * freq * np.cos(theta - psi) * np.cos(arg)

    # Interpolated to every pixel (one call for the three maps), then output pixel p shows the photo at
    # p + d(p) (grid_sample's normalised coordinates; outside the photo reads transparent).
    dx, dy, div = F.interpolate(torch.from_numpy(np.stack([dx, dy, div]))[None], size=(h, w), mode="bilinear",
                                align_corners=False)[0]
    ramp_x = (2 * torch.arange(w, dtype=torch.float32) + 1) / w - 1
    ramp_y = (2 * torch.arange(h, dtype=torch.float32) + 1) / h - 1
    grid = torch.stack([ramp_x[None, :] + dx * (2 / w), ramp_y[:, None] + dy * (2 / h)], dim=-1)[None]
    rgba = torch.from_numpy(np.array(img.convert("RGBA"), dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(rgba, grid, mode="bicubic", padding_mode="zeros", align_corners=False)[0]
    # Fold shading: darker where the warp compresses the cloth, lighter where it stretches.
    out[:3] *= (1.0 + 0.5 * div).clamp_(0.6, 1.3)
    out = out.add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(out, "RGBA")


def _shadow(canvas: Image.Image, box: Box, rng: np.random.Generator) -> Image.Image:
    """A soft-edged quadrilateral shadow over part of the box, darkening to 40-70 %."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    corners = [(float(rng.uniform(x1 - 0.3 * bw, x2 + 0.3 * bw)), float(rng.uniform(y1 - 0.3 * bh, y2 + 0.3 * bh)))
               for _ in range(4)]
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon(corners, fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.0, 8.0)) * canvas.width / 256))
    light = rng.uniform(0.4, 0.7)  # the share of light the shadow leaves
    dark = canvas.point([int(v * light + 0.5) for v in range(256)] * 3)
    return Image.composite(dark, canvas, mask)


def _lighting(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shading gradient, white-balance shift, brightness, contrast and gamma."""
    ramp = gradient(img.width, rng.uniform(0, 2 * np.pi))
    low = rng.uniform(0.4, 0.8)
    shade = Image.fromarray((ramp * np.float32(255 * (1.0 - low)) + np.float32(255 * low + 0.5)).astype(np.uint8), "L")
    shaded = Image.merge("RGB", [ImageChops.multiply(band, shade) for band in img.split()])
    warm = rng.uniform(-0.25, 0.25)
    gains = np.array([1.0 + warm, rng.uniform(0.9, 1.1), 1.0 - warm]) * rng.uniform(0.6, 1.35)
    return tone(shaded, gains, rng.uniform(0.6, 1.25), rng.uniform(0.75, 1.35))


def _motion_blur(img: Image.Image, rng: np.random.Generator, length: float) -> Image.Image:
    """Average of the image shifted along a straight streak of ``length`` pixels (edges repeated)."""
    steps = max(2, int(round(length)))
    angle = rng.uniform(0, np.pi)
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    pad = steps
    padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    acc = np.zeros(arr.shape, np.uint16)  # 255 x at most a few dozen steps fits
    for k in range(steps):
        offset = k - (steps - 1) / 2
        sx, sy = int(round(offset * np.cos(angle))), int(round(offset * np.sin(angle)))
        acc += padded[pad + sy:pad + sy + h, pad + sx:pad + sx + w]
    return Image.fromarray((acc * np.float32(1.0 / steps) + np.float32(0.5)).astype(np.uint8), "RGB")
