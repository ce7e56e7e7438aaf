"""What every consumer-view renderer draws on: the cluttered canvas, the pasted garment, occluders, noise.

A view is a shop photo put back into the world: warped, pasted onto procedural clutter, partly
hidden, relit and degraded. The renderers (:mod:`.standard`, :mod:`.hard`) differ in how hard
each step is; the steps they share live here. Every function draws from the ``rng`` it is given
and from nothing else, so a view is a function of the photo and the stream.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageStat

from mmfl.data.records import Box

#: Smallest side of the fixed noise field a view's sensor noise is cut from (see :func:`add_noise`).
NOISE_FIELD_SIDE = 512


def paste_garment(canvas: Image.Image, garment: Image.Image, rng: np.random.Generator) -> Box:
    """Paste the RGBA ``garment`` (shrunk to fit the square ``canvas``, edges feathered) at a random place;
    returns the box of its opaque part, clipped to the canvas: the garment's box a detector would give."""
    size = canvas.width
    if max(garment.size) > size:
        fit = size / max(garment.size)
        garment = garment.resize((max(8, int(garment.width * fit)), max(8, int(garment.height * fit))), Image.BICUBIC)
    alpha = garment.getchannel("A")
    solid = alpha.point(lambda a: 255 if a > 127 else 0)
    garment.putalpha(alpha.filter(ImageFilter.GaussianBlur(0.8)))
    ox = int(rng.integers(0, size - garment.width + 1))
    oy = int(rng.integers(0, size - garment.height + 1))
    canvas.paste(garment, (ox, oy), garment)
    bx1, by1, bx2, by2 = solid.getbbox() or (0, 0, garment.width, garment.height)
    return (ox + bx1, oy + by1, min(size, ox + bx2), min(size, oy + by2))


def clutter_background(rng: np.random.Generator, size: int) -> Image.Image:
    """A cluttered background: one of :data:`BACKGROUNDS` drawn scenes, turned (8 ways) and with its colour
    channels reordered (6 ways), so 6,144 distinct backgrounds cost one copy each.

    Drawing a scene is a quarter of a view's cost and what it shows is random by design (the
    model must learn to ignore it), so a bank drawn once per process serves every view.
    """
    bank = _background_bank(size)
    scene = bank[int(rng.integers(len(bank)))]
    turn, channels = int(rng.integers(8)), _CHANNEL_ORDERS[int(rng.integers(len(_CHANNEL_ORDERS)))]
    scene = np.rot90(scene, turn % 4)
    if turn >= 4:
        scene = scene[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(scene[..., channels]), "RGB")


#: Drawn scenes in the background bank (per canvas size and process: 128 x 196 kB at 256 px).
BACKGROUNDS = 128
_CHANNEL_ORDERS = ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0])


@functools.lru_cache(maxsize=2)
def _background_bank(size: int) -> np.ndarray:
    """:data:`BACKGROUNDS` scenes of :func:`draw_clutter` at ``size``, from a fixed seed (the same in every process)."""
    rng = np.random.default_rng(size * 7919 + 17)
    return np.stack([np.asarray(draw_clutter(rng, size)) for _ in range(BACKGROUNDS)])


def warm_up(size: int) -> None:
    """Draw the background bank and the noise field for ``size`` now: in a training process they are
    then inherited by every data worker it forks, instead of being drawn again by each."""
    _background_bank(size)
    _noise_field(max(NOISE_FIELD_SIDE, 2 * size))


def draw_clutter(rng: np.random.Generator, size: int) -> Image.Image:
    """Procedural clutter: a gradient between two colours, random shapes, noise and defocus."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    t = gradient(size, rng.uniform(0, 2 * np.pi))[..., None]
    base = Image.fromarray((c0 + (c1 - c0) * t).astype(np.uint8), "RGB")

    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (int(rng.integers(120, 256)),)
        x1, y1 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.5, size=2) * size
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse((x1, y1, x1 + w, y1 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x1, y1, x1 + w, y1 + h), fill=colour)
        elif kind == 2:
            points = [tuple(p) for p in (rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2)) * size)]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x1, y1, x1 + w, y1 + h), fill=colour, width=max(1, int(rng.integers(1, 6)) * size // 128))
    base.paste(overlay, (0, 0), overlay)
    base = add_noise(base, rng, float(rng.uniform(2.0, 10.0)))
    return base.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0)) * size / 256))


def tilt(img: Image.Image, rng: np.random.Generator, strength: float, max_degrees: float) -> Image.Image:
    """Perspective (each corner moves by up to ``strength`` of the side) then a rotation of up to
    ``max_degrees`` either way (counter-clockwise for positive), as ONE projective resampling onto
    a canvas that holds the result; transparent outside the photo (``img`` is RGBA).

    The composition of the two is itself projective, so one pass replaces two (and their two
    rounds of interpolation blur).
    """
    w, h = img.size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    dst = src + rng.uniform(-strength, strength, size=(4, 2)) * [w, h]
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    centre = (dst.min(axis=0) + dst.max(axis=0)) / 2
    turn = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])  # y points down
    dst = (dst - centre) @ turn.T
    dst -= dst.min(axis=0)
    out_w, out_h = (max(8, int(np.ceil(v))) for v in dst.max(axis=0))
    # PIL maps output -> input pixels: solve for the homography taking dst corners to src corners.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    coeffs = np.linalg.solve(np.array(rows), np.array(rhs))
    return img.transform((out_w, out_h), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC)


def occlude(canvas: Image.Image, box: Box, rng: np.random.Generator,
             area_share: tuple[float, float] = (0.08, 0.25), aspect_range: tuple[float, float] = (0.5, 2.0)) -> None:
    """Draw an opaque ellipse or rectangle covering ``area_share`` of the box (8-25 % by default), centred inside it."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    area = rng.uniform(*area_share) * bw * bh
    aspect = rng.uniform(*aspect_range)
    ow, oh = np.sqrt(area * aspect), np.sqrt(area / aspect)
    cx, cy = rng.uniform(x1, x2), rng.uniform(y1, y2)
    shape = (cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2)
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        draw.ellipse(shape, fill=colour)
    else:
        draw.rectangle(shape, fill=colour)


def gradient(size: int, angle: float) -> np.ndarray:
    """(size, size) float32 ramp from 0 to 1 across the square in direction ``angle``, 0.5 at its centre."""
    ramp = np.arange(size, dtype=np.float32) / max(1, size - 1) - np.float32(0.5)
    t = np.float32(0.5) + ramp[None, :] * np.float32(np.cos(angle)) + ramp[:, None] * np.float32(np.sin(angle))
    return np.clip(t, 0.0, 1.0, out=t)


@functools.lru_cache(maxsize=2)
def _noise_field(side: int) -> np.ndarray:
    """Standard normal noise, (side, side, 3) float32, from a fixed seed: drawn once per process.

    Drawing fresh Gaussian noise for every pixel of every view was a quarter of a view's cost;
    a random window of one fixed field is as good as sensor noise (it says nothing about the
    garment, so nothing can be learnt from it) and costs one add.
    """
    return np.random.default_rng(0x6E6F697365).standard_normal((side, side, 3), dtype=np.float32)


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Sensor noise of standard deviation ``sigma`` grey levels: a window of :func:`_noise_field` at a random place."""
    h, w = img.height, img.width
    field = _noise_field(max(NOISE_FIELD_SIDE, 2 * max(h, w)))
    oy, ox = int(rng.integers(0, field.shape[0] - h + 1)), int(rng.integers(0, field.shape[1] - w + 1))
    arr = field[oy:oy + h, ox:ox + w] * np.float32(sigma)
    arr += np.asarray(img, dtype=np.float32)
    arr += np.float32(0.5)
    return Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "RGB")


def tone(img: Image.Image, gains: np.ndarray, contrast: float, gamma: float) -> Image.Image:
    """Per-channel ``gains`` (white balance and brightness), ``contrast`` about the image's mean grey after
    the gains, then ``gamma``: one 3 x 256 table applied by ``Image.point`` (a pass in C, where the same
    steps on float arrays cost a tenth of a view)."""
    mean = float(np.mean(np.array(ImageStat.Stat(img).mean) / 255.0 * gains))
    levels = np.arange(256) / 255.0
    light = np.clip((levels[None, :] * np.asarray(gains)[:, None] - mean) * contrast + mean, 0.0, 1.0)
    return img.point((light ** gamma * 255.0 + 0.5).astype(np.uint8).ravel().tolist())
