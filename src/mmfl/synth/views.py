"""Shop and consumer photographs of a drawn garment, each with its exact bounding box.

Shop photos are what a retailer publishes: the garment alone, centred, on a plain light
background. Consumer photos are what a customer takes: the garment worn by someone in a cluttered
room, seen at an angle (rotation, perspective, scale), under coloured light, blurred, partly
hidden by a bag, a hand or furniture. The box is computed from the warped garment coverage, so it
is tight around the garment (including parts an occluder hides, as annotators draw them).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmfl.synth.garments import Garment
from mmfl.synth.wearer import SKIN, dress_figure

Box = tuple[int, int, int, int]

#: alpha above this (of 255) counts as garment when measuring the box
COVERAGE = 64
_THRESHOLD = [0] * (COVERAGE + 1) + [255] * (255 - COVERAGE)


def _box_of(alpha: Image.Image) -> Box:
    """Tight box of the pixels covered by the garment; the whole image if none (never happens in practice)."""
    box = alpha.point(_THRESHOLD).getbbox()
    return box if box is not None else (0, 0, alpha.width, alpha.height)


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))  # type: ignore[return-value]


# --------------------------------------------------------------------------- shop


def shop_view(garment: Garment, size: int, rng: np.random.Generator, variant: int) -> tuple[Image.Image, Box]:
    """A clean catalogue photo; ``variant`` > 0 adds a soft shadow and a slightly different framing."""
    tone = int(rng.integers(232, 253))
    background = tuple(int(v) for v in np.clip(tone + rng.integers(-4, 5, size=3), 0, 255))
    image = Image.new("RGB", (size, size), background)  # type: ignore[arg-type]
    sprite = garment.image.crop(garment.image.getchannel(3).getbbox())
    fill = float(rng.uniform(0.80, 0.90)) if variant == 0 else float(rng.uniform(0.72, 0.84))
    scale = fill * size / max(sprite.width, sprite.height)
    w, h = max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale))
    sprite = sprite.resize((w, h), Image.Resampling.LANCZOS).convert("RGBA")
    jitter = 0 if variant == 0 else int(round(0.03 * size))
    x = (size - w) // 2 + int(rng.integers(-jitter, jitter + 1))
    y = (size - h) // 2 + int(rng.integers(-jitter, jitter + 1))
    alpha = sprite.getchannel("A")
    if variant > 0:
        shadow = alpha.filter(ImageFilter.GaussianBlur(max(1.0, size / 64)))
        dark = Image.new("RGB", (w, h), tuple(int(c * 0.8) for c in background))  # type: ignore[arg-type]
        off = max(1, size // 40)
        image.paste(dark, (x + off, y + off), shadow.point(lambda v: v // 2))
    image.paste(sprite, (x, y), alpha)
    bx1, by1, bx2, by2 = _box_of(alpha)
    return image, (x + bx1, y + by1, x + bx2, y + by2)


# --------------------------------------------------------------------------- consumer


def clutter(size: int, rng: np.random.Generator) -> Image.Image:
    """A busy indoor/outdoor-ish scene: gradient walls, a floor, furniture-like blocks, posters, lines."""
    top, bottom = np.asarray(_colour(rng, 30, 230), np.float32), np.asarray(_colour(rng, 30, 230), np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    grad = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3))
    image = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.6:
        floor = int(size * rng.uniform(0.55, 0.8))
        draw.rectangle((0, floor, size, size), fill=_colour(rng, 40, 200))
        step = max(4, int(size * rng.uniform(0.08, 0.2)))
        line = _colour(rng, 20, 160)
        for x in range(0, size, step):
            draw.line((x, floor, x + (x - size // 2) // 2, size), fill=line, width=1)
    for _ in range(int(rng.integers(8, 16))):
        kind = rng.random()
        x1, y1 = rng.uniform(-0.1, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.45, size=2) * size
        fill, edge = _colour(rng), _colour(rng, 0, 120)
        if kind < 0.4:
            draw.rectangle((x1, y1, x1 + w, y1 + h), fill=fill, outline=edge)
        elif kind < 0.6:
            draw.ellipse((x1, y1, x1 + w, y1 + h), fill=fill)
        elif kind < 0.8:
            width = max(1, int(size * rng.uniform(0.01, 0.04)))
            draw.line((x1, y1, x1 + w * rng.choice([-1, 1]), y1 + h), fill=fill, width=width)
        else:
            pitch = max(2, int(w / rng.integers(3, 8)))
            draw.rectangle((x1, y1, x1 + w, y1 + h), fill=fill)
            for k in range(int(x1), int(x1 + w), 2 * pitch):
                draw.rectangle((k, y1, min(k + pitch, x1 + w), y1 + h), fill=edge)
    return image


def _homography(centre: tuple[float, float], extent: float, scale: float, theta: float,
                keystone: tuple[float, float], shift: tuple[float, float]) -> np.ndarray:
    """Figure -> view: centre on the garment, perspective tilt, scale, rotate, move to ``shift``."""
    cx, cy = centre
    to_unit = np.array([[1 / extent, 0, -cx / extent], [0, 1 / extent, -cy / extent], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, 1, 0], [keystone[0], keystone[1], 1]])
    c, s = math.cos(theta), math.sin(theta)
    place = np.array([[scale * extent * c, -scale * extent * s, shift[0]],
                      [scale * extent * s, scale * extent * c, shift[1]], [0, 0, 1]])
    return place @ tilt @ to_unit


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:3]


def _warp(image: Image.Image, h: np.ndarray, size: int) -> Image.Image:
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return image.transform((size, size), Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.Resampling.BILINEAR)


def _place(mask: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random view homography that keeps the whole garment inside a ``size`` square."""
    x1, y1, x2, y2 = mask.getbbox() or (0, 0, mask.width, mask.height)
    centre = ((x1 + x2) / 2, (y1 + y2) / 2)
    extent = float(max(x2 - x1, y2 - y1))
    scale = float(rng.uniform(0.45, 0.8)) * size / extent
    theta = float(rng.uniform(-0.22, 0.22))
    keystone = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3)))
    corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
    margin = 2.0
    pts = _apply(_homography(centre, extent, scale, theta, keystone, (0.0, 0.0)), corners)
    span = float(max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1])))
    if span > size - 2 * margin:
        scale *= (size - 2 * margin) / span
        pts = _apply(_homography(centre, extent, scale, theta, keystone, (0.0, 0.0)), corners)
    lo, hi = margin - pts.min(axis=0), size - margin - pts.max(axis=0)
    shift = (float(rng.uniform(lo[0], max(lo[0], hi[0]))), float(rng.uniform(lo[1], max(lo[1], hi[1]))))
    return _homography(centre, extent, scale, theta, keystone, shift)


def _occlude(image: Image.Image, box: Box, rng: np.random.Generator) -> None:
    """Hide part of the garment behind a bag, a hand, a pole or a table edge."""
    draw = ImageDraw.Draw(image)
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    w, h = bw * rng.uniform(0.25, 0.45), bh * rng.uniform(0.2, 0.4)
    side = int(rng.integers(4))
    cx = x1 + bw * rng.uniform(0.1, 0.9) if side in (0, 1) else (x1 if side == 2 else x2)
    cy = (y1 if side == 0 else y2) if side in (0, 1) else y1 + bh * rng.uniform(0.2, 0.9)
    kind = rng.random()
    colour = _colour(rng, 20, 235)
    if kind < 0.35:
        r = max(1, int(min(w, h) * 0.2))
        draw.rounded_rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), radius=r, fill=colour,
                               outline=_colour(rng, 0, 80))
        draw.arc((cx - w / 3, cy - h, cx + w / 3, cy), 180, 360, fill=colour, width=max(1, r // 2))
    elif kind < 0.65:
        skin = SKIN[int(rng.integers(len(SKIN)))]
        draw.ellipse((cx - w / 3, cy - h / 2, cx + w / 3, cy + h / 2), fill=skin)
        edge = image.width if cx > x1 + bw / 2 else 0
        draw.polygon([(cx, cy - h / 5), (edge, cy - h / 3), (edge, cy + h / 3), (cx, cy + h / 5)], fill=skin)
    elif kind < 0.85:
        draw.rectangle((cx - w / 5, 0, cx + w / 5, image.height), fill=colour)
    else:
        draw.rectangle((0, y2 - h * 0.8, image.width, image.height), fill=colour, outline=_colour(rng, 0, 80))


def _light(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Uneven coloured light, exposure, gamma and sensor noise."""
    size = image.width
    arr = np.asarray(image, dtype=np.float32) / 255.0
    phi = rng.uniform(0, 2 * math.pi)
    u = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = 1.0 + np.float32(rng.uniform(0.1, 0.6)) * (u[None, :] * math.cos(phi) + u[:, None] * math.sin(phi))
    gains = np.exp(rng.normal(0.0, 0.12, size=3)).astype(np.float32) * rng.uniform(0.7, 1.15)
    gamma = np.float32(rng.uniform(0.8, 1.25))
    arr = np.clip(arr * ramp[..., None] * gains, 0.0, 1.0) ** gamma
    arr = arr * 255.0 + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 6.0))
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def consumer_view(garment: Garment, size: int, rng: np.random.Generator) -> tuple[Image.Image, Box]:
    """A street/selfie-style photo of the garment being worn, and the garment's box in it."""
    figure, mask = dress_figure(garment, garment.image.width, rng)
    figure, mask = figure.reduce(2), mask.reduce(2)
    h = _place(mask, size, rng)
    warped, warped_mask = _warp(figure, h, size), _warp(mask, h, size)
    background = np.asarray(clutter(size, rng), dtype=np.float32)
    fig = np.asarray(warped, dtype=np.float32)
    alpha = fig[..., 3:4] / 255.0
    image = Image.fromarray(np.clip(background * (1 - alpha) + fig[..., :3] + 0.5, 0, 255).astype(np.uint8), "RGB")
    box = _box_of(warped_mask)
    if rng.random() < 0.75:
        _occlude(image, box, rng)
    image = _light(image, rng)
    if rng.random() < 0.8:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0)) * size / 128))
    return image, box
