"""The attribute vocabulary of generated items and each item's labels in the 1/-1/0 convention.

Types follow DeepFashion's ``list_attr_cloth.txt``: 1 texture, 2 fabric, 3 shape, 4 part,
5 style (here: the dominant colour). A label is 1 when the item has the attribute, -1 when it
does not and 0 when it is unknown: a small random share, as with real annotators who leave fields
blank. The loss masks the zeros, so the generated data exercises that path too. An attribute that
cannot apply (a sleeve length or neckline of trousers, cuffs of a sleeveless top) is a known -1,
not a 0: a blank would teach the model nothing there, and it then claimed a sleeve length for
every pair of jeans.

:data:`EXCLUSIVE_GROUPS` declares which attributes exclude each other (an item has one sleeve
length, one fabric, ...). The generator writes them to ``Anno/list_attr_groups.txt`` (the format
read by :mod:`mmfl.data.formats.attributes`), so that predictions keep one value per group.
"""
from __future__ import annotations

from mmfl.synth.recipe import COLOURS, STREAM_LABELS, Recipe, kind_group, rng_for

#: share of applicable attributes left unlabelled (0) per item
UNKNOWN_RATE = 0.08

ATTRIBUTES: tuple[tuple[str, int], ...] = (
    ("solid", 1), ("striped", 1), ("checked", 1), ("dotted", 1), ("printed", 1), ("colour_block", 1),
    ("cotton", 2), ("denim", 2), ("lace", 2), ("knit", 2), ("chiffon", 2),
    ("top", 3), ("outerwear", 3), ("dress", 3), ("skirt", 3), ("trousers", 3), ("shorts", 3),
    ("sleeveless", 3), ("short_sleeve", 3), ("long_sleeve", 3), ("flared", 3),
    ("collar", 4), ("v_neck", 4), ("crew_neck", 4), ("pockets", 4), ("buttons", 4), ("logo", 4),
    ("contrast_hem", 4), ("contrast_cuffs", 4), ("belt", 4), ("accent_band", 4), ("side_stripe", 4),
    *((name, 5) for name in COLOURS),
)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(name for name, _ in ATTRIBUTES)

#: Groups of mutually exclusive attributes: :func:`attribute_labels` marks at most one of each
#: group present (the recipe has one pattern, fabric, kind, sleeve, neckline and colour).
#: A group may be absent from an item (trousers have no sleeve length: all its values are -1).
EXCLUSIVE_GROUPS: dict[str, tuple[str, ...]] = {
    "pattern": ("solid", "striped", "checked", "dotted", "printed", "colour_block"),
    "fabric": ("cotton", "denim", "lace", "knit", "chiffon"),
    "garment": ("top", "outerwear", "dress", "skirt", "trousers", "shorts"),
    "sleeve_length": ("sleeveless", "short_sleeve", "long_sleeve"),
    "neckline": ("collar", "v_neck", "crew_neck"),
    "colour": tuple(COLOURS),
}

_PATTERN_ATTR = {"solid": "solid", "hstripes": "striped", "vstripes": "striped", "checks": "checked",
                 "dots": "dotted", "print": "printed", "colour_block": "colour_block"}
_KIND_ATTR = {"tee": "top", "blouse": "top", "sweater": "top", "tank": "top", "coat": "outerwear",
              "dress": "dress", "skirt": "skirt", "trousers": "trousers", "leggings": "trousers",
              "shorts": "shorts"}


def attribute_labels(recipe: Recipe, seed: int) -> list[int]:
    """One value in {1, -1, 0} per entry of :data:`ATTRIBUTE_NAMES`."""
    kind = recipe.category.kind
    has_top = kind_group(kind) in ("upper", "dress")
    present = {
        _PATTERN_ATTR[recipe.pattern],
        recipe.category.fabric,
        _KIND_ATTR[kind],
        recipe.colour_name,
    }
    if has_top:
        present.add({"none": "sleeveless", "short": "short_sleeve", "long": "long_sleeve"}[recipe.sleeve])
        present.add({"collar": "collar", "v": "v_neck", "crew": "crew_neck"}[recipe.neckline])
        if recipe.trim_cuffs and recipe.sleeve != "none":
            present.add("contrast_cuffs")
    if recipe.flare > 0.6 and kind in ("dress", "skirt", "tee", "blouse"):
        present.add("flared")
    flags = {
        "pockets": recipe.pockets != "none",
        "buttons": recipe.buttons > 0,
        "logo": recipe.logo_shape is not None,
        "contrast_hem": recipe.trim_hem,
        "belt": recipe.belt,
        "accent_band": recipe.accent_band is not None,
        "side_stripe": recipe.side_stripe,
    }
    present.update(name for name, on in flags.items() if on)
    rng = rng_for(seed, STREAM_LABELS, recipe.index)
    labels = []
    for name in ATTRIBUTE_NAMES:
        if rng.random() < UNKNOWN_RATE:
            labels.append(0)
        else:
            labels.append(1 if name in present else -1)
    return labels

