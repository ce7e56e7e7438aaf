"""What one generated item *is*: its category, shape, colours, pattern and fine details.

Items come in families of :data:`FAMILY_SIZE` consecutive indices that share everything coarse
(category, silhouette, colours, pattern kind) and differ only in fine detail (logo shape and
placement, stripe pitch, pockets, trims, buttons, an accent band). Retrieval then cannot be solved
by one global colour/shape feature: the part and local branches have to find the small
differences. Each recipe is a pure function of ``(seed, index)`` so that any worker can draw any
item and the output does not depend on how items are spread over processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: consecutive items sharing coarse properties (hard negatives for each other)
FAMILY_SIZE = 3

# Random streams: one integer per purpose keeps them independent of each other.
STREAM_FAMILY, STREAM_DETAIL, STREAM_RENDER, STREAM_SPLIT, STREAM_LABELS = range(5)


def rng_for(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, stream, index), never on call order."""
    return np.random.default_rng(np.random.SeedSequence((seed, stream, index)))


@dataclass(frozen=True)
class Category:
    """A DeepFashion-style folder pair and how it is drawn."""

    folder: str  # top-level folder, e.g. CLOTHING
    sub: str  # sub folder, e.g. Blouse
    clothes_type: int  # 1 upper body, 2 lower body, 3 full body
    kind: str  # silhouette template in garments.py
    fabric: str  # one of FABRICS


CATEGORIES: tuple[Category, ...] = (
    Category("CLOTHING", "Blouse", 1, "blouse", "chiffon"),
    Category("CLOTHING", "T_Shirt", 1, "tee", "cotton"),
    Category("CLOTHING", "Coat", 1, "coat", "cotton"),
    Category("TOPS", "Chiffon", 1, "tee", "chiffon"),
    Category("TOPS", "Sweater", 1, "sweater", "knit"),
    Category("TOPS", "Tank_Top", 1, "tank", "cotton"),
    Category("DRESSES", "Dress", 3, "dress", "cotton"),
    Category("DRESSES", "Lace_Dress", 3, "dress", "lace"),
    Category("DRESSES", "Sleeveless_Dress", 3, "dress", "chiffon"),
    Category("DRESSES", "Skirt", 2, "skirt", "cotton"),
    Category("TROUSERS", "Pants", 2, "trousers", "cotton"),
    Category("TROUSERS", "Jeans", 2, "trousers", "denim"),
    Category("TROUSERS", "Leggings", 2, "leggings", "knit"),
    Category("TROUSERS", "Shorts", 2, "shorts", "cotton"),
)

#: name -> RGB; the name becomes a colour attribute
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (190, 35, 40),
    "blue": (40, 80, 180),
    "navy": (25, 35, 80),
    "green": (40, 130, 70),
    "yellow": (230, 195, 50),
    "pink": (230, 140, 170),
    "white": (236, 236, 232),
    "black": (30, 30, 32),
    "grey": (128, 128, 130),
    "beige": (205, 185, 150),
    "orange": (225, 120, 40),
    "purple": (110, 60, 140),
}
DENIM = ("blue", "navy", "black", "grey")

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots", "print", "colour_block")
FABRICS = ("cotton", "denim", "lace", "knit", "chiffon")
LOGO_SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring", "bars")
#: where a logo may sit, per kind group; (x, y) in the unit garment frame
LOGO_SPOTS = {
    "upper": {"chest_left": (0.40, 0.30), "chest_right": (0.60, 0.30), "centre": (0.50, 0.42),
              "low_left": (0.40, 0.58), "low_right": (0.60, 0.58)},
    "dress": {"chest_left": (0.42, 0.28), "chest_right": (0.58, 0.28), "skirt_left": (0.40, 0.66),
              "skirt_right": (0.60, 0.66), "centre": (0.50, 0.36)},
    "skirt": {"hip_left": (0.40, 0.38), "hip_right": (0.60, 0.38), "hem_left": (0.38, 0.62),
              "hem_right": (0.62, 0.62)},
    "legs": {"hip_left": (0.40, 0.20), "hip_right": (0.60, 0.20), "thigh_left": (0.37, 0.42),
             "thigh_right": (0.63, 0.42)},
}
POCKET_STYLES = ("none", "chest_left", "chest_right", "two_low", "kangaroo")


def kind_group(kind: str) -> str:
    """Which LOGO_SPOTS table (and pocket rules) a silhouette uses."""
    if kind == "dress":
        return "dress"
    if kind == "skirt":
        return "skirt"
    if kind in ("trousers", "leggings", "shorts"):
        return "legs"
    return "upper"


@dataclass(frozen=True)
class Recipe:
    """Everything needed to draw one item; all lengths are fractions of the garment canvas."""

    index: int
    category: Category
    # coarse (shared by the family)
    colour_name: str
    colour: tuple[int, int, int]
    colour2: tuple[int, int, int]
    pattern: str
    sleeve: str  # none | short | long (ignored for lower-body kinds)
    neckline: str  # crew | v | collar
    width: float
    length: float
    flare: float
    # fine (per item)
    pitch: float
    phase: float
    logo_shape: str | None
    logo_spot: str
    logo_size: float
    logo_colour: tuple[int, int, int]
    pockets: str
    trim_colour: tuple[int, int, int]
    trim_hem: bool
    trim_cuffs: bool
    buttons: int
    accent_band: float | None  # y of a thin contrasting band, or None
    belt: bool
    side_stripe: bool
    print_seed: int

    @property
    def item_id(self) -> str:
        return item_id(self.index)


def item_id(index: int) -> str:
    """DeepFashion-style id: index 0 -> ``id_00000001``."""
    return f"id_{index + 1:08d}"


def _pick(rng: np.random.Generator, options: tuple | list) -> object:
    return options[int(rng.integers(len(options)))]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    delta = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + delta, 0, 255))  # type: ignore[return-value]


def _contrast_colour(rng: np.random.Generator, avoid: str) -> tuple[int, int, int]:
    names = [n for n in COLOURS if n != avoid]
    return COLOURS[str(_pick(rng, names))]


def make_recipe(seed: int, index: int) -> Recipe:
    """The recipe of item ``index``: coarse part from its family, fine part from the item itself."""
    fam = rng_for(seed, STREAM_FAMILY, index // FAMILY_SIZE)
    cat: Category = _pick(fam, CATEGORIES)  # type: ignore[assignment]
    colour_name = str(_pick(fam, DENIM if cat.fabric == "denim" else tuple(COLOURS)))
    colour = COLOURS[colour_name]
    colour2 = _contrast_colour(fam, colour_name)
    pattern = "solid" if cat.fabric in ("denim", "lace") else str(_pick(fam, PATTERNS))
    if cat.kind in ("tank",) or cat.sub == "Sleeveless_Dress":
        sleeve = "none"
    elif cat.kind in ("coat", "sweater"):
        sleeve = "long"
    elif cat.kind in ("trousers", "leggings", "shorts", "skirt"):
        sleeve = "none"
    else:
        sleeve = str(_pick(fam, ("short", "short", "long", "none") if cat.kind == "dress" else ("short", "long")))
    neckline = "collar" if cat.kind in ("blouse", "coat") else str(_pick(fam, ("crew", "v")))
    width = float(fam.uniform(0.9, 1.1))
    length = float(fam.uniform(0.85, 1.1))
    flare = float(fam.uniform(0.0, 1.0))

    det = rng_for(seed, STREAM_DETAIL, index)
    colour = _jitter(colour, det, 6)
    group = kind_group(cat.kind)
    has_logo = det.random() < 0.8
    logo_spot = str(_pick(det, tuple(LOGO_SPOTS[group])))
    pockets = "none"
    if group in ("upper", "dress"):
        pockets = str(_pick(det, POCKET_STYLES if group == "upper" else ("none", "two_low")))
    elif group in ("legs", "skirt"):
        pockets = str(_pick(det, ("none", "two_low")))
    buttons = int(det.integers(3, 7)) if cat.kind in ("blouse", "coat") else int(_pick(det, (0, 0, 0, 2, 3)))
    return Recipe(
        index=index,
        category=cat,
        colour_name=colour_name,
        colour=colour,
        colour2=colour2,
        pattern=pattern,
        sleeve=sleeve,
        neckline=neckline,
        width=width,
        length=length,
        flare=flare,
        pitch=float(det.uniform(0.035, 0.09)),
        phase=float(det.uniform(0.0, 1.0)),
        logo_shape=str(_pick(det, LOGO_SHAPES)) if has_logo else None,
        logo_spot=logo_spot,
        logo_size=float(det.uniform(0.07, 0.11)),
        logo_colour=_contrast_colour(det, colour_name),
        pockets=pockets,
        trim_colour=_contrast_colour(det, colour_name),
        trim_hem=bool(det.random() < 0.5),
        trim_cuffs=bool(det.random() < 0.5),
        buttons=buttons,
        accent_band=float(det.uniform(0.3, 0.75)) if det.random() < 0.4 else None,
        belt=bool(cat.kind == "dress" and det.random() < 0.5),
        side_stripe=bool(group == "legs" and det.random() < 0.4),
        print_seed=int(det.integers(2**31)),
    )
