"""Drawing one garment from its :class:`~mmfl.synth.recipe.Recipe` onto a transparent canvas.

A garment is a silhouette (polygons per kind: tops, dresses, skirts, trousers) filled with a
pattern texture, then fine details on top (logo, pockets, trims, buttons, bands), fold shading
and a seam outline. It is drawn once per item in a unit frame (x, y in [0, 1]) at ``canvas``
pixels; shop and consumer views both start from this one drawing so that they show the same
item. The returned anchors tell the view code where a wearer's head, arms and legs attach.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from mmfl.synth.recipe import LOGO_SPOTS, Recipe, kind_group

Point = tuple[float, float]


@dataclass(frozen=True)
class Limb:
    """A body part that continues out of the garment: start point, unit direction, half width, length."""

    start: Point
    direction: Point
    half_width: float
    length: float


@dataclass
class Garment:
    """A drawn garment: ``image`` is RGBa (premultiplied) ``canvas`` x ``canvas``; geometry in unit coords."""

    image: Image.Image
    hem: float  # y of the hem (where a second garment or the legs start)
    neck: Point | None  # where the wearer's head sits above (tops and dresses)
    waist: tuple[float, float] | None  # (y, half width) of the waistband (skirts and trousers)
    arms: list[Limb] = field(default_factory=list)
    legs: list[Limb] = field(default_factory=list)


class _Pen:
    """Draws in unit coordinates on the colour layer and the coverage mask at once."""

    def __init__(self, rgb: Image.Image, mask: Image.Image) -> None:
        self.g = rgb.width
        self.rgb = ImageDraw.Draw(rgb)
        self.mask = ImageDraw.Draw(mask)
        self.line_w = max(1, round(self.g / 170))

    def px(self, pts: list[Point]) -> list[tuple[float, float]]:
        return [(x * self.g, y * self.g) for x, y in pts]

    def box(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        return (x1 * self.g, y1 * self.g, x2 * self.g, y2 * self.g)

    def silhouette(self, pts: list[Point]) -> None:
        self.mask.polygon(self.px(pts), fill=255)

    def cut_polygon(self, pts: list[Point]) -> None:
        self.mask.polygon(self.px(pts), fill=0)

    def cut_ellipse(self, box: tuple[float, float, float, float]) -> None:
        self.mask.ellipse(self.box(*box), fill=0)

    def poly(self, pts: list[Point], fill: tuple | None, outline: tuple | None = None, cover: bool = False) -> None:
        """A filled shape on the colour layer; ``cover`` also adds it to the silhouette (collars, scallops)."""
        self.rgb.polygon(self.px(pts), fill=fill, outline=outline, width=self.line_w)
        if cover:
            self.mask.polygon(self.px(pts), fill=255)

    def ellipse(self, box: tuple[float, float, float, float], fill: tuple | None, outline: tuple | None = None,
                width: int | None = None, cover: bool = False) -> None:
        self.rgb.ellipse(self.box(*box), fill=fill, outline=outline, width=width or self.line_w)
        if cover:
            self.mask.ellipse(self.box(*box), fill=255)

    def line(self, pts: list[Point], colour: tuple) -> None:
        self.rgb.line(self.px(pts), fill=colour, width=self.line_w)

    def outline(self, pts: list[Point], colour: tuple) -> None:
        """Seam line around a silhouette piece; drawn on the mask too so the seam belongs to the garment."""
        closed = self.px(pts + [pts[0]])
        self.rgb.line(closed, fill=colour, width=self.line_w, joint="curve")
        self.mask.line(closed, fill=255, width=self.line_w, joint="curve")


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in rgb)  # type: ignore[return-value]


def _seam_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (85, 85, 90) if sum(rgb) < 150 else _shade(rgb, 0.55)


def _mirror(pts: list[Point]) -> list[Point]:
    return [(1.0 - x, y) for x, y in reversed(pts)]


# --------------------------------------------------------------------------- texture


def pattern_texture(recipe: Recipe, canvas: int) -> np.ndarray:
    """(canvas, canvas, 3) uint8 fill: the pattern in colour/colour2 plus fabric grain and folds."""
    coords = (np.arange(canvas, dtype=np.float32) + 0.5) / canvas
    y, x = coords[:, None], coords[None, :]  # broadcast instead of full grids: this runs once per item
    p, ph = recipe.pitch, recipe.phase * recipe.pitch
    if recipe.pattern == "hstripes":
        m = (((y + ph) % p) < 0.45 * p).astype(np.float32)
    elif recipe.pattern == "vstripes":
        m = (((x + ph) % p) < 0.45 * p).astype(np.float32)
    elif recipe.pattern == "checks":
        m = 0.5 * ((((x + ph) % p) < 0.5 * p).astype(np.float32) + (((y + ph) % p) < 0.5 * p).astype(np.float32))
    elif recipe.pattern == "dots":
        dx, dy = (x + ph) % p - p / 2, (y + ph) % p - p / 2
        m = ((dx * dx + dy * dy) < (0.24 * p) ** 2).astype(np.float32)
    elif recipe.pattern == "colour_block":
        m = (y > 0.42 + 0.2 * recipe.phase).astype(np.float32)
    elif recipe.pattern == "print":
        m = _print_mask(recipe, canvas)
    else:
        m = np.zeros((canvas, canvas), np.float32)
    m = np.broadcast_to(m, (canvas, canvas))
    base = np.asarray(recipe.colour, np.float32)
    second = np.asarray(recipe.colour2, np.float32)
    img = base * (1.0 - m[..., None]) + second * m[..., None]
    fabric = recipe.category.fabric
    if fabric == "denim":
        twill = ((np.floor(x * canvas) + np.floor(y * canvas)) % 3 == 0).astype(np.float32)
        img *= (1.0 + 0.10 * twill)[..., None]
    elif fabric == "knit":
        rib = ((np.floor(x * canvas / max(1, canvas // 64))) % 2).astype(np.float32)
        img *= (1.0 - 0.07 * rib)[..., None]
    elif fabric == "lace":
        q = 0.028
        lx, ly = x % q - q / 2, (y + (np.floor(x / q) % 2) * q / 2) % q - q / 2
        holes = ((lx * lx + ly * ly) < (0.3 * q) ** 2).astype(np.float32)
        img = img * (1 - 0.45 * holes[..., None]) + 245 * 0.45 * holes[..., None]
    folds = 1.0 - 0.07 * (0.5 + 0.5 * np.sin(2 * math.pi * x / 0.17 + 6.0 * recipe.phase)) - 0.06 * y
    img *= folds[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _print_mask(recipe: Recipe, canvas: int) -> np.ndarray:
    """Scattered little flowers: an all-over print whose layout is one of the item's fine details."""
    rng = np.random.default_rng(recipe.print_seed)
    layer = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(layer)
    n = int(6 / recipe.pitch)
    r = recipe.pitch * canvas * 0.22
    for cx, cy in rng.uniform(0, canvas, size=(n, 2)):
        for k in range(5):
            a = 2 * math.pi * k / 5
            px, py = cx + r * math.cos(a), cy + r * math.sin(a)
            draw.ellipse((px - r * 0.7, py - r * 0.7, px + r * 0.7, py + r * 0.7), fill=255)
    return np.asarray(layer, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- silhouettes


@dataclass
class _Shape:
    """Silhouette pieces and where the details go."""

    pieces: list[list[Point]]
    top: float  # y where the garment starts (neckline or waistband)
    hem: float
    hem_x: tuple[float, float]
    sleeve_ends: list[tuple[Point, Point, float]] = field(default_factory=list)  # centre, direction, half width
    neck: Point | None = None
    waist: tuple[float, float] | None = None
    arms: list[Limb] = field(default_factory=list)
    legs: list[Limb] = field(default_factory=list)
    waist_band: tuple[float, float] | None = None  # (y, half width) for belts/waistbands


ARM_LENGTH = 0.55
LEG_LENGTH = 0.95


def _sleeves(recipe: Recipe, shoulder: Point, armpit: Point) -> tuple[list, list]:
    """Left sleeve polygon (mirrored for the right) and the arms that continue from the cuffs."""
    theta = 0.45
    d = (-math.sin(theta), math.cos(theta))
    n = (-d[1], d[0])
    base = ((shoulder[0] + armpit[0]) / 2, (shoulder[1] + armpit[1]) / 2)
    if recipe.sleeve == "none":
        arm = Limb(base, d, 0.04, ARM_LENGTH)
        return [], [arm, Limb((1 - base[0], base[1]), (-d[0], d[1]), 0.04, ARM_LENGTH)]
    length = 0.13 if recipe.sleeve == "short" else 0.40
    hw = 0.065 if recipe.sleeve == "short" else 0.05
    end = (base[0] + d[0] * length, base[1] + d[1] * length)
    left = [shoulder, (end[0] + n[0] * hw, end[1] + n[1] * hw), (end[0] - n[0] * hw, end[1] - n[1] * hw), armpit]
    pieces = [left, _mirror(left)]
    rest = ARM_LENGTH - length
    arms = [Limb(end, d, 0.04, rest), Limb((1 - end[0], end[1]), (-d[0], d[1]), 0.04, rest)]
    return pieces, arms


def _upper(r: Recipe) -> _Shape:
    kind = r.category.kind
    cx, sy = 0.5, 0.2
    w = (0.20 if kind == "coat" else 0.18) * r.width
    length = {"tee": 0.52, "blouse": 0.52, "sweater": 0.55, "tank": 0.5, "coat": 0.68}[kind] * r.length
    hem = min(sy + length, 0.93)
    f = {"tee": 0.05, "blouse": 0.06, "sweater": 0.0, "tank": 0.03, "coat": 0.03}[kind] * r.flare
    nw = 0.09 if kind == "tank" else 0.065
    if kind == "tank":
        shoulder, armpit = (cx - nw - 0.04, sy - 0.02), (cx - w, sy + 0.14)
        half = [(cx - nw, sy - 0.02), shoulder, (cx - w + 0.005, sy + 0.10), armpit, (cx - w - f, hem)]
    else:
        shoulder, armpit = (cx - w - 0.035, sy + 0.015), (cx - w, sy + 0.15)
        half = [(cx - nw, sy - 0.015), shoulder, armpit, (cx - w - f, hem)]
    body = half + _mirror(half)
    sleeve_pieces, arms = _sleeves(r, shoulder, armpit)
    shape = _Shape([body, *sleeve_pieces], top=sy, hem=hem, hem_x=(cx - w - f, cx + w + f),
                   neck=(cx, sy - 0.03), arms=arms)
    if sleeve_pieces:
        shape.sleeve_ends = [_sleeve_end(sleeve_pieces[0]), _sleeve_end(sleeve_pieces[1])]
    return shape


def _sleeve_end(piece: list[Point]) -> tuple[Point, Point, float]:
    (ax, ay), (bx, by) = piece[1], piece[2]
    centre = ((ax + bx) / 2, (ay + by) / 2)
    inner = ((piece[0][0] + piece[3][0]) / 2, (piece[0][1] + piece[3][1]) / 2)
    dx, dy = centre[0] - inner[0], centre[1] - inner[1]
    norm = math.hypot(dx, dy)
    return centre, (dx / norm, dy / norm), math.hypot(bx - ax, by - ay) / 2


def _dress(r: Recipe) -> _Shape:
    cx, sy = 0.5, 0.14
    w = 0.15 * r.width
    wy = sy + 0.22
    hem = min(wy + 0.47 * r.length, 0.95)
    hh = w * 0.85 + 0.07 + 0.14 * r.flare
    nw = 0.075 if r.sleeve == "none" else 0.06
    if r.sleeve == "none":
        shoulder, armpit = (cx - nw - 0.035, sy - 0.02), (cx - w, sy + 0.13)
        half = [(cx - nw, sy - 0.02), shoulder, (cx - w + 0.005, sy + 0.09), armpit]
    else:
        shoulder, armpit = (cx - w - 0.03, sy + 0.015), (cx - w, sy + 0.14)
        half = [(cx - nw, sy - 0.015), shoulder, armpit]
    half += [(cx - w * 0.85, wy), (cx - hh, hem)]
    body = half + _mirror(half)
    sleeve_pieces, arms = _sleeves(r, shoulder, armpit)
    legs = [Limb((cx + dx, hem - 0.02), (0.0, 1.0), 0.04, LEG_LENGTH - hem + 0.3) for dx in (-0.07, 0.07)]
    shape = _Shape([body, *sleeve_pieces], top=sy, hem=hem, hem_x=(cx - hh, cx + hh), neck=(cx, sy - 0.03),
                   arms=arms, legs=legs, waist_band=(wy, w * 0.85))
    if sleeve_pieces:
        shape.sleeve_ends = [_sleeve_end(sleeve_pieces[0]), _sleeve_end(sleeve_pieces[1])]
    return shape


def _skirt(r: Recipe) -> _Shape:
    cx, wy = 0.5, 0.2
    ww = 0.15 * r.width
    hem = wy + 0.48 * r.length
    hh = ww + 0.06 + 0.15 * r.flare
    body = [(cx - ww, wy), (cx - hh, hem), (cx + hh, hem), (cx + ww, wy)]
    legs = [Limb((cx + dx, hem - 0.02), (0.0, 1.0), 0.045, 0.9) for dx in (-0.07, 0.07)]
    return _Shape([body], top=wy, hem=hem, hem_x=(cx - hh, cx + hh), waist=(wy, ww), legs=legs, waist_band=(wy, ww))


def _legs(r: Recipe) -> _Shape:
    kind = r.category.kind
    cx, wy, crotch = 0.5, 0.06, 0.34
    ww = 0.17 * r.width
    hem = {"trousers": 0.94, "leggings": 0.92, "shorts": 0.06 + 0.43 * r.length}[kind]
    lc = {"trousers": 0.11, "leggings": 0.09, "shorts": 0.13}[kind]
    lhw = {"trousers": 0.065 + 0.03 * r.flare, "leggings": 0.045, "shorts": 0.085}[kind]
    half = [(cx - ww, wy), (cx - ww - 0.015, 0.25), (cx - lc - lhw, hem), (cx - lc + lhw, hem), (cx, crotch)]
    body = half + _mirror(half)[1:]
    rest = max(0.08, 0.98 - hem)
    legs = [Limb((cx + dx, hem - 0.01), (0.0, 1.0), min(lhw, 0.045), rest) for dx in (-lc, lc)]
    return _Shape([body], top=wy, hem=hem, hem_x=(cx - lc - lhw, cx - lc + lhw), waist=(wy, ww), legs=legs,
                  waist_band=(wy, ww))


_SHAPES = {"upper": _upper, "dress": _dress, "skirt": _skirt, "legs": _legs}


# --------------------------------------------------------------------------- details


def _necklines(pen: _Pen, r: Recipe, s: _Shape, seam: tuple) -> None:
    if s.neck is None:
        return
    cx, ny = s.neck[0], s.top
    nw = 0.09 if r.category.kind == "tank" or r.sleeve == "none" else 0.065
    if r.neckline == "crew" and r.category.kind != "tank" and r.sleeve != "none":
        box = (cx - nw, ny - 0.06, cx + nw, ny + 0.045)
        pen.cut_ellipse(box)
        pen.ellipse(box, None, outline=seam)
    elif r.neckline == "crew":
        box = (cx - nw, ny - 0.08, cx + nw, ny + 0.09)
        pen.cut_ellipse(box)
        pen.ellipse(box, None, outline=seam)
    else:
        v = [(cx - nw, ny - 0.03), (cx + nw, ny - 0.03), (cx, ny + 0.13)]
        pen.cut_polygon(v)
        pen.line([v[0], v[2], v[1]], seam)
    if r.neckline == "collar":
        colour = r.trim_colour if r.trim_cuffs else _shade(r.colour, 1.12)
        left = [(cx - nw - 0.005, ny - 0.025), (cx - 0.004, ny + 0.12), (cx - nw - 0.045, ny + 0.06)]
        pen.poly(left, colour, outline=seam, cover=True)
        pen.poly(_mirror(left), colour, outline=seam, cover=True)


def _band(pen: _Pen, y1: float, y2: float, x1: float, x2: float, colour: tuple) -> None:
    pen.poly([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], colour)


def _trims(pen: _Pen, r: Recipe, s: _Shape, seam: tuple) -> None:
    group = kind_group(r.category.kind)
    if r.trim_hem:
        if group == "legs":
            for sign in (-1, 1):
                x1, x2 = s.hem_x if sign < 0 else (1 - s.hem_x[1], 1 - s.hem_x[0])
                _band(pen, s.hem - 0.035, s.hem + 0.01, x1 - 0.01, x2 + 0.01, r.trim_colour)
        else:
            _band(pen, s.hem - 0.035, s.hem + 0.01, s.hem_x[0] - 0.02, s.hem_x[1] + 0.02, r.trim_colour)
    if r.category.fabric == "lace":
        n = 12
        x1, x2 = s.hem_x
        rad = (x2 - x1) / n / 2
        light = _shade(r.colour, 1.3)
        for k in range(n):
            xc = x1 + rad * (2 * k + 1)
            pen.ellipse((xc - rad, s.hem - rad, xc + rad, s.hem + rad), light, outline=seam, cover=True)
    if r.trim_cuffs:
        for centre, d, hw in s.sleeve_ends:
            n = (-d[1], d[0])
            back = (centre[0] - d[0] * 0.035, centre[1] - d[1] * 0.035)
            pts = [(centre[0] + n[0] * hw, centre[1] + n[1] * hw), (centre[0] - n[0] * hw, centre[1] - n[1] * hw),
                   (back[0] - n[0] * hw, back[1] - n[1] * hw), (back[0] + n[0] * hw, back[1] + n[1] * hw)]
            pen.poly(pts, r.trim_colour)
    if s.waist is not None:
        wy, ww = s.waist
        colour = r.trim_colour if r.trim_cuffs else _shade(r.colour, 0.85)
        _band(pen, wy, wy + 0.045, 0.5 - ww, 0.5 + ww, colour)
        pen.line([(0.5 - ww, wy + 0.045), (0.5 + ww, wy + 0.045)], seam)
    if r.belt and s.waist_band is not None:
        wy, ww = s.waist_band
        _band(pen, wy - 0.02, wy + 0.02, 0.5 - ww - 0.02, 0.5 + ww + 0.02, r.trim_colour)
        pen.poly([(0.47, wy - 0.028), (0.53, wy - 0.028), (0.53, wy + 0.028), (0.47, wy + 0.028)], None,
                 outline=(210, 190, 90))
    if r.accent_band is not None:
        y = s.top + r.accent_band * (s.hem - s.top)
        _band(pen, y, y + 0.028, 0.0, 1.0, r.trim_colour)
    if r.side_stripe:
        for sign in (-1, 1):
            a = (0.5 + sign * (0.17 * r.width + 0.01), 0.25)
            b = (0.5 + sign * (abs(s.hem_x[0] - 0.5)), s.hem)
            inset = -sign * 0.03
            pen.poly([a, b, (b[0] + inset, b[1]), (a[0] + inset, a[1])], r.trim_colour)
    if group == "skirt" and r.flare > 0.5:
        wy, ww = s.waist  # type: ignore[misc]
        hh = abs(s.hem_x[0] - 0.5)
        for k in range(1, 8):
            t = k / 8
            pen.line([(0.5 - ww + 2 * ww * t, wy + 0.045), (0.5 - hh + 2 * hh * t, s.hem)], seam)


def _pockets(pen: _Pen, r: Recipe, s: _Shape, seam: tuple) -> None:
    if r.pockets == "none":
        return
    fill = _shade(r.colour, 0.9)
    group = kind_group(r.category.kind)
    rects: list[tuple[float, float, float, float]] = []
    if group == "upper":
        if r.pockets == "chest_left":
            rects = [(0.35, s.top + 0.08, 0.44, s.top + 0.17)]
        elif r.pockets == "chest_right":
            rects = [(0.56, s.top + 0.08, 0.65, s.top + 0.17)]
        elif r.pockets == "two_low":
            rects = [(0.34, s.hem - 0.16, 0.44, s.hem - 0.06), (0.56, s.hem - 0.16, 0.66, s.hem - 0.06)]
        else:
            y1, y2 = s.hem - 0.17, s.hem - 0.05
            pen.poly([(0.40, y1), (0.60, y1), (0.66, y2), (0.34, y2)], fill, outline=seam)
    elif group == "dress" and s.waist_band is not None:
        wy = s.waist_band[0]
        rects = [(0.36, wy + 0.08, 0.44, wy + 0.16), (0.56, wy + 0.08, 0.64, wy + 0.16)]
    else:
        wy, ww = s.waist  # type: ignore[misc]
        for sign in (-1, 1):
            x_out = 0.5 + sign * (ww - 0.005)
            pen.line([(x_out, wy + 0.06), (0.5 + sign * (ww - 0.07), wy + 0.06), (x_out, wy + 0.16)], seam)
    for box in rects:
        x1, y1, x2, y2 = box
        pen.poly([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], fill, outline=seam)
        pen.line([(x1, y1 + 0.02), (x2, y1 + 0.02)], seam)


def _buttons(pen: _Pen, r: Recipe, s: _Shape, seam: tuple) -> None:
    if r.buttons == 0:
        return
    group = kind_group(r.category.kind)
    rad = 0.012
    colour = _shade(r.trim_colour, 0.9)
    if group in ("legs", "skirt"):
        ys = [s.top + 0.022 + 0.03 * k for k in range(min(r.buttons, 2))]
    elif r.category.kind in ("blouse", "coat"):
        y1, y2 = s.top + 0.12, s.hem - 0.06
        ys = [y1 + (y2 - y1) * k / max(1, r.buttons - 1) for k in range(r.buttons)]
        pen.line([(0.5, s.top + 0.1), (0.5, s.hem)], seam)
    else:
        ys = [s.top + 0.06 + 0.04 * k for k in range(r.buttons)]
    for y in ys:
        pen.ellipse((0.5 - rad, y - rad, 0.5 + rad, y + rad), colour, outline=seam)


def _star(cx: float, cy: float, rad: float) -> list[Point]:
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rr = rad if k % 2 == 0 else rad * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _logo(pen: _Pen, r: Recipe) -> None:
    if r.logo_shape is None:
        return
    cx, cy = LOGO_SPOTS[kind_group(r.category.kind)][r.logo_spot]
    h = r.logo_size / 2
    c = r.logo_colour
    shape = r.logo_shape
    if shape == "circle":
        pen.ellipse((cx - h, cy - h, cx + h, cy + h), c)
    elif shape == "ring":
        pen.ellipse((cx - h, cy - h, cx + h, cy + h), None, outline=c, width=max(1, round(h * 0.5 * pen.g)))
    elif shape == "square":
        pen.poly([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], c)
    elif shape == "triangle":
        pen.poly([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], c)
    elif shape == "diamond":
        pen.poly([(cx, cy - h), (cx + h * 0.8, cy), (cx, cy + h), (cx - h * 0.8, cy)], c)
    elif shape == "star":
        pen.poly(_star(cx, cy, h * 1.1), c)
    else:
        for k in range(3):
            y = cy - h + k * h * 0.8
            right = cx + h * (1 - 0.3 * k)
            pen.poly([(cx - h, y), (right, y), (right, y + h * 0.45), (cx - h, y + h * 0.45)], c)


# --------------------------------------------------------------------------- entry point


def draw_garment(recipe: Recipe, canvas: int) -> Garment:
    """Draw ``recipe`` on a transparent ``canvas`` x ``canvas`` RGBa image (premultiplied alpha)."""
    rgb = Image.fromarray(pattern_texture(recipe, canvas), "RGB")
    mask = Image.new("L", (canvas, canvas), 0)
    pen = _Pen(rgb, mask)
    seam = _seam_colour(recipe.colour)
    shape = _SHAPES[kind_group(recipe.category.kind)](recipe)
    for piece in shape.pieces:
        pen.silhouette(piece)
    _trims(pen, recipe, shape, seam)
    _pockets(pen, recipe, shape, seam)
    _buttons(pen, recipe, shape, seam)
    _logo(pen, recipe)
    for piece in shape.pieces:
        pen.outline(piece, seam)
    _necklines(pen, recipe, shape, seam)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(mask)
    return Garment(image=rgba.convert("RGBa"), hem=shape.hem, neck=shape.neck, waist=shape.waist,
                   arms=shape.arms, legs=shape.legs)
