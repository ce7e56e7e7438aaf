"""``mmfl synth``: the generated folder is parsed back with a small independent parser and checked.

The parser here is deliberately separate from the package's readers: it checks the published
DeepFashion Consumer-to-shop layout itself (count lines, headers, columns, naming), so a bug in
the generator cannot be hidden by the same bug in a shared parser.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfl.cli import main
from mmfl.errors import MMFLError
from mmfl.synth import generate
from mmfl.synth.recipe import FAMILY_SIZE, make_recipe

ITEMS, SIZE, SEED = 12, 64, 3
CLOTHES_TYPE = {"CLOTHING": {1}, "TOPS": {1}, "DRESSES": {2, 3}, "TROUSERS": {2}}


def read_table(path: Path) -> tuple[str, list[list[str]]]:
    """(header line, rows split on whitespace); asserts the count line matches the rows."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert int(lines[0]) == len(lines) - 2, f"{path.name}: count line {lines[0]} vs {len(lines) - 2} rows"
    return lines[1], [line.split() for line in lines[2:]]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, generate(out, ITEMS, seed=SEED, size=SIZE)


@pytest.fixture(scope="module")
def bboxes(dataset: tuple[Path, dict]) -> list[list[str]]:
    header, rows = read_table(dataset[0] / "Anno" / "list_bbox_consumer2shop.txt")
    assert header.split() == ["image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2"]
    return rows


def test_bbox_list_names_types_and_boxes(dataset: tuple[Path, dict], bboxes: list[list[str]]) -> None:
    root, summary = dataset
    assert len(bboxes) == summary["shop_images"] + summary["consumer_images"]
    listed = set()
    per_item: dict[str, dict[int, int]] = defaultdict(lambda: {1: 0, 2: 0})
    for name, clothes_type, source_type, *box in bboxes:
        assert len(box) == 4
        parts = name.split("/")
        assert parts[0] == "img" and len(parts) == 5, name
        cat, item, file = parts[1], parts[3], parts[4]
        assert item.startswith("id_") and len(item) == 11 and item[3:].isdigit(), item
        assert int(clothes_type) in CLOTHES_TYPE[cat], name
        prefix = {"1": "shop_", "2": "comsumer_"}[source_type]
        assert file.startswith(prefix) and file.endswith(".jpg") and file[len(prefix):-4].isdigit(), name
        per_item[item][int(source_type)] += 1
        x1, y1, x2, y2 = map(int, box)
        with Image.open(root / name) as img:
            img.load()
            assert img.mode == "RGB" and img.size == (SIZE, SIZE)
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE, (name, box)
        assert x2 - x1 >= SIZE // 8 and y2 - y1 >= SIZE // 8, (name, box)
        listed.add(name)
    assert len(listed) == len(bboxes)
    assert listed == {str(p.relative_to(root)) for p in root.rglob("*.jpg")}, "every image listed, nothing extra"
    assert len(per_item) == ITEMS
    for counts in per_item.values():
        assert 1 <= counts[1] <= 2 and 2 <= counts[2] <= 4
    # numbering starts at 01 and has no gaps
    for item_dir in {Path(n).parent for n in listed}:
        for prefix in ("shop_", "comsumer_"):
            numbers = sorted(int(Path(n).stem[len(prefix):]) for n in listed
                             if Path(n).parent == item_dir and Path(n).name.startswith(prefix))
            assert numbers == list(range(1, len(numbers) + 1))


def test_shop_boxes_are_tight(dataset: tuple[Path, dict], bboxes: list[list[str]]) -> None:
    """On a plain background the garment is what differs from the corner colour: its extent is the box."""
    root = dataset[0]
    for name, _, source_type, *box in bboxes:
        if source_type != "1":
            continue
        arr = np.asarray(Image.open(root / name), dtype=np.int16)
        corner = np.median(np.concatenate([arr[:3, :3].reshape(-1, 3), arr[-3:, -3:].reshape(-1, 3)]), axis=0)
        ys, xs = np.nonzero(np.abs(arr - corner).max(axis=2) > 40)
        x1, y1, x2, y2 = map(int, box)
        assert abs(xs.min() - x1) <= 2 and abs(ys.min() - y1) <= 2, (name, box, xs.min(), ys.min())
        assert abs(xs.max() + 1 - x2) <= 2 and abs(ys.max() + 1 - y2) <= 2, (name, box, xs.max(), ys.max())


def test_consumer_views_are_harder_than_shop_views(dataset: tuple[Path, dict], bboxes: list[list[str]]) -> None:
    """Outside the box a shop photo is flat; a consumer photo is cluttered."""
    root = dataset[0]
    spread: dict[str, list[float]] = {"1": [], "2": []}
    for name, _, source_type, *box in bboxes:
        arr = np.asarray(Image.open(root / name), dtype=np.float32)
        x1, y1, x2, y2 = map(int, box)
        outside = np.ones(arr.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        spread[source_type].append(float(arr[outside].std(axis=0).mean()))
    assert max(spread["1"]) < 8.0
    assert np.median(spread["2"]) > 25.0


def test_items_and_attributes(dataset: tuple[Path, dict], bboxes: list[list[str]]) -> None:
    anno = dataset[0] / "Anno"
    header, rows = read_table(anno / "list_item_consumer2shop.txt")
    assert header.strip() == "item_id"
    ids = [r[0] for r in rows]
    assert ids == [f"id_{i:08d}" for i in range(1, ITEMS + 1)]
    assert set(ids) == {name.split("/")[3] for name, *_ in bboxes}

    header, cloth = read_table(anno / "list_attr_cloth.txt")
    assert header.split() == ["attribute_name", "attribute_type"]
    names = [r[0] for r in cloth]
    assert len(set(names)) == len(names) >= 10
    assert {int(r[1]) for r in cloth} == {1, 2, 3, 4, 5}
    assert all(len(r) == 2 for r in cloth)

    header, labels = read_table(anno / "list_attr_items.txt")
    assert header.split() == ["item_id", "attribute_labels"]
    assert [r[0] for r in labels] == ids
    values = np.array([[int(v) for v in r[1:]] for r in labels])
    assert values.shape == (ITEMS, len(names))
    assert set(np.unique(values)) == {-1, 0, 1}
    assert (values == 1).sum(axis=1).min() >= 3, "every item has a few positive attributes"


def test_partition_pairs_and_disjoint_splits(dataset: tuple[Path, dict], bboxes: list[list[str]]) -> None:
    root, summary = dataset
    header, pairs = read_table(root / "Eval" / "list_eval_partition.txt")
    assert header.split() == ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"]
    source = {name: st for name, _, st, *_ in bboxes}
    split_of: dict[str, set[str]] = defaultdict(set)
    seen_pairs = set()
    for consumer, shop, item, status in pairs:
        assert source[consumer] == "2" and source[shop] == "1"
        assert consumer.split("/")[3] == shop.split("/")[3] == item
        assert status in ("train", "val", "test")
        split_of[item].add(status)
        seen_pairs.add((consumer, shop))
    assert len(seen_pairs) == len(pairs) == summary["pairs"]
    assert all(len(s) == 1 for s in split_of.values()), "an item must not straddle splits"
    assert len(split_of) == ITEMS
    counts = {s: sum(1 for v in split_of.values() if v == {s}) for s in ("train", "val", "test")}
    assert counts == {"train": summary["train_items"], "val": summary["val_items"], "test": summary["test_items"]}
    assert min(counts.values()) >= 1 and counts["train"] > counts["val"]
    # every consumer image x every shop image of the item
    by_item: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"1": [], "2": []})
    for name, st in source.items():
        by_item[name.split("/")[3]][st].append(name)
    expected = {(c, s) for imgs in by_item.values() for c in imgs["2"] for s in imgs["1"]}
    assert seen_pairs == expected


def test_family_members_differ_only_in_fine_detail() -> None:
    a, b = make_recipe(SEED, 0), make_recipe(SEED, 1)
    assert FAMILY_SIZE >= 2  # items 0 and 1 are one family
    assert (a.category, a.colour_name, a.pattern, a.sleeve) == (b.category, b.colour_name, b.pattern, b.sleeve)
    fine = ("pitch", "logo_shape", "logo_spot", "pockets", "trim_colour", "buttons", "accent_band", "print_seed")
    assert any(getattr(a, f) != getattr(b, f) for f in fine)
    others = [make_recipe(SEED, FAMILY_SIZE * k) for k in range(1, 8)]
    assert len({(r.category, r.colour_name, r.pattern) for r in others + [a]}) > 4, "families differ coarsely"


def test_deterministic_for_any_worker_count(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    reference = tree_hashes(dataset[0])
    generate(tmp_path / "again", ITEMS, seed=SEED, size=SIZE, workers=2)
    assert tree_hashes(tmp_path / "again") == reference
    generate(tmp_path / "other", ITEMS, seed=SEED + 1, size=SIZE)
    other = tree_hashes(tmp_path / "other")
    assert other != reference
    images = [{h for k, h in tree.items() if k.endswith(".jpg")} for tree in (other, reference)]
    assert not images[0] & images[1], "another seed draws other images"


def test_refuses_bad_arguments_and_foreign_folders(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MMFLError, match="not empty"):
        generate(foreign, 3, size=32)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    with pytest.raises(MMFLError, match="--items"):
        generate(tmp_path / "few", 2, size=32)
    with pytest.raises(MMFLError, match="--size"):
        generate(tmp_path / "tiny", 3, size=16)
    assert not (tmp_path / "few").exists() and not (tmp_path / "tiny").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--items", "5", "--seed", "1", "--size", "32"]) == 0
    assert "wrote 5 items" in capsys.readouterr().out
    first = tree_hashes(out)
    # a previous synth output is replaced, with fewer items leaving nothing stale behind
    assert main(["synth", str(out), "--items", "3", "--seed", "1", "--size", "32", "--workers", "2"]) == 0
    second = tree_hashes(out)
    assert sum(k.endswith(".jpg") for k in second) < sum(k.endswith(".jpg") for k in first)
    assert int((out / "Anno" / "list_item_consumer2shop.txt").read_text().split()[0]) == 3

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not ours")
    capsys.readouterr()
    assert main(["synth", str(bad), "--items", "3", "--size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(bad) in err and "\n" not in err
    assert (bad / "x.jpg").read_bytes() == b"not ours"
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    assert main(["synth", str(not_dir), "--items", "3", "--size", "32"]) == 2
