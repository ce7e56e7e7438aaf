"""The ``hard`` consumer views of the real-photo benchmark (``build_realphoto(protocol="hard")``).

The ``standard`` views (:func:`mmfl.data.realphoto.consumer_view`) left too little room: at the
GPU size every variant scored 99 % top-1, and at the CPU budget the presets differed by less
than their seed spread. :func:`hard_view` imitates more of what separates a street photo from a
shop photo. Per view, in this order (ranges at a 256 px canvas; lengths scale with the size):

1. **partial view**: keep a window holding 40-70 % of the photo's area (width fraction drawn
   from [area, 1], height = area / width) at a random offset, so only part of the garment is in
   frame, as in a close-up or a photo cut by the frame;
2. **non-rigid deformation**: a smooth displacement field, the sum of 3 sinusoids (0.5-2 cycles
   across the garment, random directions, amplitude 2-6 % of the side each), applied as a 10 x 10
   mesh warp (folds, drape, a garment not lying flat); the field's divergence also shades the
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
8. **low resolution** (70 % of views): the canvas is shrunk to 64-96 px and scaled back;
9. sensor noise (sigma 2-8), then JPEG quality 40-85.

The box is the deformed garment's extent on the canvas (where its mask is solid), clipped to
the canvas: it covers the visible garment, occluders and shadow included, as a detector's box
would. The random stream is the item's ``hard`` stream (see :func:`mmfl.data.realphoto.item_rng`),
so a seed always gives the same views. The strengths were set once, before comparing any
variants, so that the pretrained features alone and the best trained variant both leave room
above and below (the calibration is in docs/RESULTS.md); they were not tuned per variant.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmfl.data.realphoto import _add_noise, _occlude, _perspective, clutter_background, paste_garment
from mmfl.data.records import Box

#: Mesh cells per side of the non-rigid warp: enough for 2-cycle folds to look smooth.
MESH_CELLS = 10


def hard_view(photo: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, Box, int]:
    """One hard ``size`` x ``size`` consumer view of ``photo``: (image, garment box, JPEG quality)."""
    unit = size / 256
    canvas = clutter_background(rng, size)

    # Partial view: 40-70 % of the photo's area in frame.
    area = rng.uniform(0.4, 0.7)
    fw = rng.uniform(area, 1.0)
    fh = area / fw
    cw, ch = max(8, round(photo.width * fw)), max(8, round(photo.height * fh))
    x0, y0 = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    garment = photo.crop((int(x0), int(y0), int(x0) + cw, int(y0) + ch))
    scale = size * rng.uniform(0.55, 0.9) / max(garment.size)
    garment = garment.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BICUBIC)

    garment = _drape(garment, rng)
    garment = _perspective(garment, rng, 0.15)
    garment = garment.rotate(float(rng.uniform(-25, 25)), resample=Image.BICUBIC, expand=True)
    box = paste_garment(canvas, garment, rng)

    if rng.random() < 0.85:
        for _ in range(int(rng.integers(1, 4))):
            _occlude(canvas, box, rng, (0.08, 0.2), (0.4, 2.5))
    if rng.random() < 0.6:
        canvas = _shadow(canvas, box, rng)
    canvas = _lighting(canvas, rng)
    if rng.random() < 0.5:
        canvas = _motion_blur(canvas, rng, float(rng.uniform(3.0, 12.0)) * unit)
    if rng.random() < 0.7:
        low = int(rng.integers(64, 97))
        canvas = canvas.resize((low, low), Image.BILINEAR, reducing_gap=2.0).resize((size, size), Image.BICUBIC)
    canvas = _add_noise(canvas, rng, float(rng.uniform(2.0, 8.0)))
    return canvas, box, int(rng.integers(40, 86))


def _drape(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A smooth non-rigid warp (sum of sinusoidal displacements) with fold shading, on RGBA.

    Returns an RGBA image of the same size, transparent where the warp pulls in from outside
    the photo, so the silhouette follows the deformation and the box can be read from alpha.
    """
    w, h = img.size
    waves = []
    for _ in range(3):
        theta, psi = rng.uniform(0, 2 * np.pi, size=2)
        waves.append((rng.uniform(0.02, 0.06), rng.uniform(0.5, 2.0), np.array([np.cos(theta), np.sin(theta)]),
                      np.array([np.cos(psi), np.sin(psi)]), rng.uniform(0, 2 * np.pi)))

    def field(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Displacement (in pixels) and divergence (unitless) at normalised coordinates u, v."""
        dx, dy, div = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
        for amp, freq, direction, shift, phase in waves:
            arg = 2 * np.pi * freq * (u * direction[0] + v * direction[1]) + phase
            dx += amp * np.sin(arg) * shift[0] * w
            dy += amp * np.sin(arg) * shift[1] * h
            div += amp * 2 * np.pi * freq * np.cos(arg) * float(direction @ shift)
        return dx, dy, div

    # Mesh: each output cell samples the quad whose corners the field moved (PIL maps output -> input).
    xs, ys = np.linspace(0, w, MESH_CELLS + 1), np.linspace(0, h, MESH_CELLS + 1)
    gx, gy = np.meshgrid(xs, ys)
    dx, dy, _ = field(gx / w, gy / h)
    sx, sy = gx + dx, gy + dy
    mesh = []
    for i in range(MESH_CELLS):
        for j in range(MESH_CELLS):
            bbox = (int(round(xs[j])), int(round(ys[i])), int(round(xs[j + 1])), int(round(ys[i + 1])))
            quad = (sx[i, j], sy[i, j], sx[i + 1, j], sy[i + 1, j],
                    sx[i + 1, j + 1], sy[i + 1, j + 1], sx[i, j + 1], sy[i, j + 1])
            mesh.append((bbox, tuple(float(c) for c in quad)))
    warped = img.convert("RGBA").transform((w, h), Image.MESH, mesh, Image.BICUBIC)

    # Fold shading: darker where the warp compresses the cloth, lighter where it stretches.
    py, px = np.mgrid[0:h, 0:w]
    _, _, div = field((px + 0.5) / w, (py + 0.5) / h)
    arr = np.asarray(warped, dtype=np.float32).copy()
    arr[..., :3] *= np.clip(1.0 + 0.5 * div, 0.6, 1.3)[..., None]
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGBA")


def _shadow(canvas: Image.Image, box: Box, rng: np.random.Generator) -> Image.Image:
    """A soft-edged quadrilateral shadow over part of the box, darkening to 40-70 %."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    corners = [(float(rng.uniform(x1 - 0.3 * bw, x2 + 0.3 * bw)), float(rng.uniform(y1 - 0.3 * bh, y2 + 0.3 * bh)))
               for _ in range(4)]
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon(corners, fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.0, 8.0)) * canvas.width / 256))
    depth = 1.0 - rng.uniform(0.4, 0.7)  # the share of light the shadow takes away
    arr = np.asarray(canvas, dtype=np.float32)
    arr = arr * (1.0 - depth * np.asarray(mask, dtype=np.float32)[..., None] / 255.0)
    return Image.fromarray((arr + 0.5).astype(np.uint8), "RGB")


def _lighting(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shading gradient, white-balance shift, brightness, contrast and gamma."""
    size = img.width
    arr = np.asarray(img, dtype=np.float32) / 255.0
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:img.height, 0:size] / max(1, size - 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    low = rng.uniform(0.4, 0.8)
    arr = arr * (low + (1.0 - low) * t)
    warm = rng.uniform(-0.25, 0.25)
    arr = arr * np.array([1.0 + warm, rng.uniform(0.9, 1.1), 1.0 - warm]) * rng.uniform(0.6, 1.35)
    arr = (arr - arr.mean()) * rng.uniform(0.6, 1.25) + arr.mean()
    arr = np.clip(arr, 0, 1) ** rng.uniform(0.75, 1.35)
    return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "RGB")


def _motion_blur(img: Image.Image, rng: np.random.Generator, length: float) -> Image.Image:
    """Average of the image shifted along a straight streak of ``length`` pixels (edges repeated)."""
    steps = max(2, int(round(length)))
    angle = rng.uniform(0, np.pi)
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    pad = steps
    padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    acc = np.zeros_like(arr)
    for k in range(steps):
        offset = k - (steps - 1) / 2
        sx, sy = int(round(offset * np.cos(angle))), int(round(offset * np.sin(angle)))
        acc += padded[pad + sy:pad + sy + h, pad + sx:pad + sx + w]
    return Image.fromarray(np.clip(acc / steps + 0.5, 0, 255).astype(np.uint8), "RGB")
