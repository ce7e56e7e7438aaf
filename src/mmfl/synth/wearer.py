"""A simple person wearing the garment, for consumer photos.

Street photos show the garment on a body next to other clothes: skin shows through necklines,
arms and legs continue out of sleeves and hems, and a second garment (trousers under a top, a
top over a skirt) sits right next to the one being searched for. That second garment is the
distractor a box crop or an attention branch must learn to ignore. The figure is drawn in unit
coordinates on a canvas ``canvas`` wide and ``FIGURE_HEIGHT`` canvases tall.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from mmfl.synth.garments import Garment, Limb

FIGURE_HEIGHT = 2.2
NECK_Y = 0.42  # where the garment's neck anchor lands in the figure
WAIST_Y = 0.95  # where a skirt's or trousers' waistband lands

SKIN = ((241, 204, 177), (224, 172, 138), (198, 134, 96), (141, 85, 54), (92, 56, 38))
HAIR = ((25, 20, 18), (70, 45, 25), (150, 105, 60), (210, 180, 120), (120, 120, 120))


def _colour(rng: np.random.Generator, low: int = 20, high: int = 230) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))  # type: ignore[return-value]


class _Body:
    """ImageDraw in unit coordinates for the figure canvas."""

    def __init__(self, image: Image.Image, canvas: int) -> None:
        self.draw = ImageDraw.Draw(image)
        self.g = canvas

    def poly(self, pts: list[tuple[float, float]], fill: tuple) -> None:
        self.draw.polygon([(x * self.g, y * self.g) for x, y in pts], fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple) -> None:
        g = self.g
        self.draw.ellipse(((cx - rx) * g, (cy - ry) * g, (cx + rx) * g, (cy + ry) * g), fill=fill)

    def limb(self, limb: Limb, dy: float, fill: tuple, end: tuple | None) -> None:
        """A limb as a quadrilateral, with a hand/foot ellipse in ``end`` colour when given."""
        (sx, sy), (ux, uy) = limb.start, limb.direction
        sy += dy
        nx, ny = -uy * limb.half_width, ux * limb.half_width
        ex, ey = sx + ux * limb.length, sy + uy * limb.length
        tip_x, tip_y = nx * 0.8, ny * 0.8
        self.poly([(sx + nx, sy + ny), (ex + tip_x, ey + tip_y), (ex - tip_x, ey - tip_y), (sx - nx, sy - ny)], fill)
        if end is not None:
            r = limb.half_width * 1.1
            self.ellipse(ex, ey, r, r * 1.2, end)


def _head(body: _Body, neck_y: float, skin: tuple, hair: tuple, long_hair: bool) -> None:
    cy = neck_y - 0.11
    if long_hair:
        body.poly([(0.42, cy - 0.05), (0.58, cy - 0.05), (0.60, cy + 0.2), (0.40, cy + 0.2)], hair)
    body.poly([(0.47, cy + 0.05), (0.53, cy + 0.05), (0.55, neck_y + 0.14), (0.45, neck_y + 0.14)], skin)
    body.ellipse(0.5, cy - 0.012, 0.072, 0.082, hair)
    body.ellipse(0.5, cy + 0.005, 0.062, 0.08, skin)


def _other_top(body: _Body, colour: tuple, skin: tuple) -> None:
    """A plain top worn with a skirt or trousers (drawn behind the garment's waistband)."""
    for sign in (-1, 1):
        body.limb(Limb((0.5 + sign * 0.2, NECK_Y + 0.06), (sign * 0.42, 0.91), 0.045, 0.55), 0.0, skin, skin)
        body.poly([(0.5 + sign * 0.16, NECK_Y), (0.5 + sign * 0.25, NECK_Y + 0.03), (0.5 + sign * 0.29, NECK_Y + 0.15),
                   (0.5 + sign * 0.19, NECK_Y + 0.17)], colour)
    body.poly([(0.43, NECK_Y - 0.01), (0.30, NECK_Y + 0.02), (0.31, WAIST_Y + 0.06), (0.69, WAIST_Y + 0.06),
               (0.70, NECK_Y + 0.02), (0.57, NECK_Y - 0.01), (0.5, NECK_Y + 0.06)], colour)


def _other_bottom(body: _Body, top: float, colour: tuple, shoes: tuple, skin: tuple, skirt: bool) -> None:
    """Trousers or a skirt worn under a top, with legs and shoes."""
    if skirt:
        hem = top + 0.5
        for sign in (-1, 1):
            body.limb(Limb((0.5 + sign * 0.07, hem - 0.02), (0.0, 1.0), 0.045, 2.1 - hem), 0.0, skin, shoes)
        body.poly([(0.34, top), (0.27, hem), (0.73, hem), (0.66, top)], colour)
        return
    for sign in (-1, 1):
        body.ellipse(0.5 + sign * 0.11, 2.1, 0.06, 0.03, shoes)
    feet = 2.09
    body.poly([(0.33, top), (0.31, feet), (0.47, feet), (0.5, top + 0.3),
               (0.53, feet), (0.69, feet), (0.67, top)], colour)


def dress_figure(garment: Garment, canvas: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The garment worn by a person: (RGBa figure, L mask of the garment alone), same size."""
    height = int(round(FIGURE_HEIGHT * canvas))
    figure = Image.new("RGBA", (canvas, height), (0, 0, 0, 0))
    body = _Body(figure, canvas)
    skin = SKIN[int(rng.integers(len(SKIN)))]
    hair = HAIR[int(rng.integers(len(HAIR)))]
    other = _colour(rng)
    shoes = _colour(rng, 10, 120)
    if garment.neck is not None:
        dy = NECK_Y - garment.neck[1]
        _head(body, NECK_Y, skin, hair, bool(rng.random() < 0.5))
        if not garment.legs:
            _other_bottom(body, dy + garment.hem - 0.06, other, shoes, skin, skirt=bool(rng.random() < 0.3))
        body.poly([(0.42, NECK_Y - 0.02), (0.58, NECK_Y - 0.02), (0.6, NECK_Y + 0.2), (0.4, NECK_Y + 0.2)], skin)
    else:
        dy = WAIST_Y - (garment.waist[0] if garment.waist is not None else 0.0)
        _head(body, NECK_Y, skin, hair, bool(rng.random() < 0.5))
        _other_top(body, other, skin)
    for arm in garment.arms:
        body.limb(arm, dy, skin, skin)
    for leg in garment.legs:
        body.limb(leg, dy, skin, shoes)
    top = int(round(dy * canvas))
    sprite = garment.image.convert("RGBA")
    figure.alpha_composite(sprite, (0, top))
    mask = Image.new("L", figure.size, 0)
    mask.paste(sprite.getchannel("A"), (0, top))
    return figure.convert("RGBa"), mask
