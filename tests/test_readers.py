"""Dataset readers on small fixtures written here in each published format.

Every fixture uses CRLF line endings, count and header lines where the format has them, a root
folder whose name holds a space and non-ASCII letters, and repeats some pairs.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfl.data.formats import FORMATS, read_dataset
from mmfl.errors import DataError

W, H = 24, 20  # size of every fixture image


def jpeg(path: Path, size: tuple[int, int] = (W, H), seed: int = 0, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def truncated_jpeg(path: Path) -> None:
    """A JPEG whose header reads fine but whose pixel data stops half-way."""
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2 + 200])


def write_list(path: Path, header: str, rows: list[str], count: int | None = None) -> None:
    """A DeepFashion list file: count line, header line, rows; CRLF line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows) if count is None else count), header, *rows]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))


def edit_line(path: Path, number: int, text: str | None) -> None:
    """Replace (or with None delete) 1-based line ``number`` of a CRLF file."""
    lines = path.read_bytes().decode("utf-8").split("\r\n")
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text
    path.write_bytes("\r\n".join(lines).encode("utf-8"))


def error_of(root: Path, fmt: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_dataset(root, fmt, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- Consumer-to-shop
A = "img/TOPS/Summer_Wear/id_00000001"
B = "img/CLOTHING/Blouse/id_00000002"
C = "img/DRESSES/Lace_Dress/id_00000003"
C2S_IMAGES = [  # name, clothes_type, source_type (1 shop, 2 consumer), box
    (f"{A}/comsumer_01.jpg", 1, 2, (2, 2, 20, 18)),  # bbox line 3
    (f"{A}/comsumer_02.jpg", 1, 2, (0, 0, 24, 20)),  # line 4
    (f"{A}/shop_01.jpg", 1, 1, (1, 1, 23, 19)),  # line 5
    (f"{B}/comsumer_01.jpg", 1, 2, (3, 4, 15, 16)),  # line 6
    (f"{B}/shop_01.jpg", 1, 1, (0, 0, 22, 20)),  # line 7
    (f"{B}/shop_02.jpg", 1, 1, (0, 2, 24, 18)),  # line 8
    (f"{C}/comsumer_01.jpg", 3, 2, (5, 0, 20, 20)),  # line 9
    (f"{C}/shop_01.jpg", 3, 1, (0, 0, 24, 20)),  # line 10
]
C2S_PAIRS = [  # partition lines 3..8; line 5 repeats line 3
    f"{A}/comsumer_01.jpg {A}/shop_01.jpg id_00000001 train",
    f"{A}/comsumer_02.jpg {A}/shop_01.jpg id_00000001 train",
    f"{A}/comsumer_01.jpg {A}/shop_01.jpg id_00000001 train",
    f"{B}/comsumer_01.jpg {B}/shop_01.jpg id_00000002 test",
    f"{B}/comsumer_01.jpg {B}/shop_02.jpg id_00000002 test",
    f"{C}/comsumer_01.jpg {C}/shop_01.jpg id_00000003 val",
]


def make_c2s(root: Path) -> Path:
    for i, (name, *_rest) in enumerate(C2S_IMAGES):
        jpeg(root / name, seed=i)
    bbox_rows = [f"{n:<60}{t:>3}{s:>3}{b[0]:>5}{b[1]:>5}{b[2]:>5}{b[3]:>5}" for n, t, s, b in C2S_IMAGES]
    write_list(root / "Anno/list_bbox_consumer2shop.txt", "image_name clothes_type source_type x_1 y_1 x_2 y_2", bbox_rows)
    write_list(root / "Eval/list_eval_partition.txt",
               "image_pair_name_1 image_pair_name_2 item_id evaluation_status", C2S_PAIRS)
    write_list(root / "Anno/list_attr_cloth.txt", "attribute_name attribute_type",
               ["棉 cotton 2", "striped 1", "long sleeve 3"])
    write_list(root / "Anno/list_attr_items.txt", "item_id attribute_labels",
               ["id_00000001 1 -1 0", "id_00000002  -1  0  1", "id_00000003 0 0 0"])
    return root


@pytest.fixture
def c2s(tmp_path: Path) -> Path:
    return make_c2s(tmp_path / "Deep Fashion ü")


def test_formats_listed():
    assert FORMATS == ["deepfashion-c2s", "inshop", "street2shop", "deepfashion2", "csv", "folder", "folder-photos"]


def test_c2s_reads_published_layout(c2s: Path):
    assert b"\r\n" in (c2s / "Eval/list_eval_partition.txt").read_bytes()
    cat = read_dataset(c2s, "deepfashion-c2s")
    got = {(Path(r.path).relative_to(c2s).as_posix(), r.item_id, r.domain, r.split) for r in cat.records}
    assert len(cat.records) == 8 == len(got)  # the repeated pair and the shared shop image counted once
    assert got == {
        (f"{A}/comsumer_01.jpg", "id_00000001", "consumer", "train"),
        (f"{A}/comsumer_02.jpg", "id_00000001", "consumer", "train"),
        (f"{A}/shop_01.jpg", "id_00000001", "shop", "train"),
        (f"{B}/comsumer_01.jpg", "id_00000002", "consumer", "test"),
        (f"{B}/shop_01.jpg", "id_00000002", "shop", "test"),
        (f"{B}/shop_02.jpg", "id_00000002", "shop", "test"),
        (f"{C}/comsumer_01.jpg", "id_00000003", "consumer", "val"),
        (f"{C}/shop_01.jpg", "id_00000003", "shop", "val"),
    }
    by_name = {Path(r.path).relative_to(c2s).as_posix(): r for r in cat.records}
    assert by_name[f"{B}/comsumer_01.jpg"].box == (3, 4, 15, 16)
    assert by_name[f"{B}/comsumer_01.jpg"].category == "CLOTHING/Blouse"
    assert by_name[f"{B}/comsumer_01.jpg"].source == f"{c2s / 'Anno/list_bbox_consumer2shop.txt'}:6"
    assert cat.category_names == ["CLOTHING/Blouse", "DRESSES/Lace_Dress", "TOPS/Summer_Wear"]
    assert cat.attribute_names == ["cotton", "striped", "long sleeve"]
    assert cat.attributes["id_00000001"].dtype == np.int8
    assert cat.attributes["id_00000001"].tolist() == [1, -1, 0]
    assert cat.attribute_matrix(["id_00000002", "unknown"]).tolist() == [[-1, 0, 1], [0, 0, 0]]
    assert cat.skipped == []
    assert [r.domain for r in cat.split("test", "consumer")] == ["consumer"]


def test_c2s_box_clamped_to_the_image_when_its_size_is_known(c2s: Path):
    edit_line(c2s / "Anno/list_bbox_consumer2shop.txt", 3, f"{A}/comsumer_01.jpg 1 2 2 2 40 30")
    boxes = {m: {r.path: r.box for r in read_dataset(c2s, "deepfashion-c2s", check_images=m).records}
             for m in ("header", "none")}
    path = str(c2s / A / "comsumer_01.jpg")
    assert boxes["header"][path] == (2, 2, W, H)
    assert boxes["none"][path] == (2, 2, 40, 30)  # size unknown: left for load_crop to clamp


BBOX, PART, ATTR = "Anno/list_bbox_consumer2shop.txt", "Eval/list_eval_partition.txt", "Anno/list_attr_items.txt"
# (id, file, line, new text or None to delete, message fragment, skipped with --skip-bad, records left, check mode)
C2S_ERRORS = [
    ("too-few-columns", BBOX, 4, f"{A}/comsumer_02.jpg 1 2 0 0 24", "expected 7 columns", 1, 7, "header"),
    ("non-numeric-box", BBOX, 6, f"{B}/comsumer_01.jpg 1 2 3 four 15 16", "box coordinate 'four' is not a number", 1, 7, "header"),
    ("unknown-source", BBOX, 5, f"{A}/shop_01.jpg 1 7 1 1 23 19", "unknown source_type 7", 1, 7, "header"),
    ("negative-box", BBOX, 9, f"{C}/comsumer_01.jpg 3 2 -5 0 20 20", "negative coordinate", 1, 7, "header"),
    ("zero-area-box", BBOX, 9, f"{C}/comsumer_01.jpg 3 2 5 0 5 20", "has no area", 1, 7, "header"),
    ("box-outside-image", BBOX, 10, f"{C}/shop_01.jpg 3 1 30 0 40 20", "lies outside the 24x20 image", 1, 7, "header"),
    ("count-mismatch", BBOX, 1, "99", "count line says 99 rows but the file has 8", 1, 8, "header"),
    ("missing-header", BBOX, 2, None, "missing header line", 1, 8, "header"),
    ("missing-count", PART, 1, None, "missing count line", 1, 8, "header"),
    ("unknown-status", PART, 8, f"{C}/comsumer_01.jpg {C}/shop_01.jpg id_00000003 tset", "unknown evaluation_status 'tset'", 1, 6, "header"),
    ("swapped-columns", PART, 6, f"{B}/shop_01.jpg {B}/comsumer_01.jpg id_00000002 test", "stands in the consumer column", 2, 7, "header"),
    ("pair-too-few-columns", PART, 4, f"{A}/comsumer_02.jpg id_00000001 train", "expected 4 columns", 1, 7, "header"),
    ("attribute-out-of-range", ATTR, 4, "id_00000002 -1 2 1", "attribute value '2' is not one of 1, -1, 0", 1, 8, "header"),
    ("attribute-not-int", ATTR, 4, "id_00000002 -1 1.0 1", "attribute value '1.0' is not an integer", 1, 8, "header"),
    ("attribute-columns", ATTR, 3, "id_00000001 1 -1", "expected an item id and 3 attribute values, found 2", 1, 8, "header"),
]


@pytest.mark.parametrize("case", C2S_ERRORS, ids=[c[0] for c in C2S_ERRORS])
def test_c2s_errors_name_file_and_line(c2s: Path, case):
    _, rel, line, text, fragment, skipped, left, mode = case
    edit_line(c2s / rel, line, text)
    message = error_of(c2s, "deepfashion-c2s", check_images=mode)
    assert message.startswith(f"{c2s / rel}:{line}: ")
    assert fragment in message
    assert "\n" not in message
    cat = read_dataset(c2s, "deepfashion-c2s", skip_bad=True, check_images=mode)
    assert len(cat.skipped) == skipped
    assert cat.skipped[0] == message
    assert len(cat.records) == left


def test_c2s_attributes_dropped_under_skip_bad_keep_the_others(c2s: Path):
    edit_line(c2s / ATTR, 4, "id_00000002 -1 2 1")
    cat = read_dataset(c2s, "deepfashion-c2s", skip_bad=True)
    assert set(cat.attributes) == {"id_00000001", "id_00000003"}
    assert cat.attributes["id_00000001"].tolist() == [1, -1, 0]


IMAGE_PROBLEMS = [  # (id, how to spoil image B/shop_02, check mode, message fragment)
    ("missing", lambda p: p.unlink(), "none", "file not found"),
    ("garbage-header", lambda p: p.write_bytes(b"<html>not found</html>"), "header", "cannot read image header"),
    ("truncated", truncated_jpeg, "decode", "cannot decode image"),
]


@pytest.mark.parametrize("case", IMAGE_PROBLEMS, ids=[c[0] for c in IMAGE_PROBLEMS])
def test_c2s_image_problems_name_the_annotation_line_and_image(c2s: Path, case):
    _, spoil, mode, fragment = case
    image = c2s / B / "shop_02.jpg"
    spoil(image)
    message = error_of(c2s, "deepfashion-c2s", check_images=mode)
    assert message.startswith(f"{c2s / BBOX}:8: {image}: ")
    assert fragment in message
    cat = read_dataset(c2s, "deepfashion-c2s", skip_bad=True, check_images=mode)
    assert cat.skipped == [message]
    assert str(image) not in {r.path for r in cat.records}
    assert len(cat.records) == 7


def test_header_mode_does_not_decode_and_none_mode_only_checks_existence(c2s: Path):
    truncated_jpeg(c2s / B / "shop_02.jpg")
    assert len(read_dataset(c2s, "deepfashion-c2s", check_images="header").records) == 8
    (c2s / B / "shop_01.jpg").write_bytes(b"not an image")
    assert len(read_dataset(c2s, "deepfashion-c2s", check_images="none").records) == 8


def test_missing_annotation_file_is_an_error_even_with_skip_bad(c2s: Path):
    (c2s / PART).unlink()
    with pytest.raises(DataError, match=r"list_eval_partition\.txt: file not found"):
        read_dataset(c2s, "deepfashion-c2s", skip_bad=True)


def test_read_dataset_rejects_unknown_format_mode_and_root(tmp_path: Path):
    with pytest.raises(DataError, match="unknown dataset format 'imagenet'"):
        read_dataset(tmp_path, "imagenet")
    with pytest.raises(DataError, match="check_images must be one of none, header, decode"):
        read_dataset(tmp_path, "csv", check_images="full")
    with pytest.raises(DataError, match="dataset not found"):
        read_dataset(tmp_path / "nowhere", "inshop")


# ----------------------------------------------------------------------------- In-shop
def make_inshop(root: Path) -> Path:
    images = [  # name, item, status, clothes_type
        ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train", 3),
        ("img/WOMEN/Dresses/id_00000001/01_2 side.jpg", "id_00000001", "train", 3),  # a space in the name
        ("img/MEN/Tees_Tanks/id_00000007/01_1_front.jpg", "id_00000007", "query", 1),
        ("img/MEN/Tees_Tanks/id_00000007/02_1_front.jpg", "id_00000007", "gallery", 1),
        ("img/MEN/Pants/id_00000009/01_1_front.jpg", "id_00000009", "gallery", 2),
    ]
    for i, (name, *_rest) in enumerate(images):
        jpeg(root / name, seed=i)
    write_list(root / "Eval/list_eval_partition.txt", "image_name item_id evaluation_status",
               [f"{n}  {item}  {status}" for n, item, status, _ in images])
    write_list(root / "Anno/list_bbox_inshop.txt", "image_name clothes_type pose_type x_1 y_1 x_2 y_2",
               [f"{n}  {t}  1  001  002  020  019" for n, _, _, t in images])
    return root


def test_inshop_maps_query_and_gallery_to_test_domains(tmp_path: Path):
    root = make_inshop(tmp_path / "in shop é")
    cat = read_dataset(root, "inshop")
    got = sorted((Path(r.path).relative_to(root).as_posix(), r.domain, r.split, r.category) for r in cat.records)
    assert got == [
        ("img/MEN/Pants/id_00000009/01_1_front.jpg", "shop", "test", "lower"),
        ("img/MEN/Tees_Tanks/id_00000007/01_1_front.jpg", "consumer", "test", "upper"),
        ("img/MEN/Tees_Tanks/id_00000007/02_1_front.jpg", "shop", "test", "upper"),
        ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "shop", "train", "full"),
        ("img/WOMEN/Dresses/id_00000001/01_2 side.jpg", "shop", "train", "full"),
    ]
    assert {r.box for r in cat.records} == {(1, 2, 20, 19)}
    assert cat.category_names == ["full", "lower", "upper"]
    assert cat.attribute_names == [] and cat.skipped == []


def test_inshop_errors_name_file_and_line(tmp_path: Path):
    root = make_inshop(tmp_path / "inshop")
    part = root / "Eval/list_eval_partition.txt"
    edit_line(part, 5, "img/MEN/Tees_Tanks/id_00000007/01_1_front.jpg id_00000007 probe")
    assert error_of(root, "inshop").startswith(f"{part}:5: unknown evaluation_status 'probe'")
    edit_line(part, 5, "img/MEN/Tees_Tanks/id_00000007/03_1_front.jpg id_00000007 query")
    assert error_of(root, "inshop") == f"{part}:5: img/MEN/Tees_Tanks/id_00000007/03_1_front.jpg is not listed in {root / 'Anno/list_bbox_inshop.txt'}"
    cat = read_dataset(root, "inshop", skip_bad=True)
    assert len(cat.skipped) == 1 and len(cat.records) == 4
    bbox = root / "Anno/list_bbox_inshop.txt"
    edit_line(bbox, 7, "img/MEN/Pants/id_00000009/01_1_front.jpg 2 1 1 2 20 -19")
    assert error_of(root, "inshop") == f"{bbox}:7: box (1, 2, 20, -19) has a negative coordinate"
    cat = read_dataset(root, "inshop", skip_bad=True)  # the bad bbox line is counted once, not again per use
    assert len(cat.skipped) == 2 and len(cat.records) == 3


# ----------------------------------------------------------------------------- Street2Shop
def make_street2shop(root: Path) -> Path:
    meta = root / "meta/json"
    meta.mkdir(parents=True)

    def box(left, top, width, height):
        return {"left": left, "top": top, "width": width, "height": height}

    files = {
        "train_pairs_dresses.json": [
            {"photo": 1, "product": 10, "bbox": box(2, 3, 10, 12)},
            {"photo": 2, "product": 10, "bbox": box(0.4, 0, 20.2, 19.6)},
            {"photo": 3, "product": 11, "bbox": box(0, 0, 5, 5)},  # photo 3 never downloaded
        ],
        "test_pairs_dresses.json": [
            {"photo": 4, "product": 12, "bbox": box(1, 1, 10, 10)},
            {"photo": 4, "product": 12, "bbox": box(1, 1, 10, 10)},  # repeated
            {"photo": 5, "product": 10, "bbox": box(0, 0, 30, 30)},  # product 10 also in train; box clamped
        ],
        "retrieval_dresses.json": [
            {"photo": 100, "product": 10}, {"photo": 101, "product": 12},
            {"photo": 102, "product": 13},  # in no pair: a test distractor
            {"photo": 103, "product": 11},  # never downloaded
        ],
        "train_pairs_bags.json": [{"photo": 6, "product": 20, "bbox": box(4, 4, 8, 8)}],
        "test_pairs_bags.json": [],
        "retrieval_bags.json": [{"photo": 104, "product": 20}],
    }
    for name, entries in files.items():
        (meta / name).write_text(json.dumps(entries))
    for photo in (1, 2, 4, 5, 6, 100, 101, 102):
        jpeg(root / "images" / f"{photo:09d}.jpg", seed=photo)
    jpeg(root / "images" / f"{104:09d}.png", seed=104, fmt="PNG")
    return root


def test_street2shop_reads_categories_splits_and_counts_missing_photos(tmp_path: Path):
    root = make_street2shop(tmp_path / "street 2 shop ß")
    cat = read_dataset(root, "street2shop")  # no skip_bad: missing photos are never an error
    got = sorted((Path(r.path).name, r.item_id, r.domain, r.split, r.category) for r in cat.records)
    assert got == [
        ("000000001.jpg", "10", "consumer", "train", "dresses"),
        ("000000002.jpg", "10", "consumer", "train", "dresses"),
        ("000000004.jpg", "12", "consumer", "test", "dresses"),
        ("000000005.jpg", "10", "consumer", "test", "dresses"),
        ("000000006.jpg", "20", "consumer", "train", "bags"),
        ("000000100.jpg", "10", "shop", "test", "dresses"),
        ("000000100.jpg", "10", "shop", "train", "dresses"),
        ("000000101.jpg", "12", "shop", "test", "dresses"),
        ("000000102.jpg", "13", "shop", "test", "dresses"),
        ("000000104.png", "20", "shop", "train", "bags"),
    ]
    boxes = {Path(r.path).name: r.box for r in cat.records if r.domain == "consumer"}
    assert boxes["000000001.jpg"] == (2, 3, 12, 15)
    assert boxes["000000002.jpg"] == (0, 0, 21, 20)
    assert boxes["000000005.jpg"] == (0, 0, W, H)
    assert cat.category_names == ["bags", "dresses"]
    meta = root / "meta/json"
    assert cat.skipped == [
        f"{meta / 'train_pairs_dresses.json'}[2]: street photo 000000003 is missing on disk",
        f"{meta / 'retrieval_dresses.json'}[3]: shop photo 000000103 is missing on disk",
    ]


def test_street2shop_errors_name_file_and_entry(tmp_path: Path):
    root = make_street2shop(tmp_path / "s2s")
    meta = root / "meta/json"
    entries = json.loads((meta / "test_pairs_dresses.json").read_text())
    entries[1]["bbox"]["width"] = 0
    (meta / "test_pairs_dresses.json").write_text(json.dumps(entries))
    assert error_of(root, "street2shop") == f"{meta / 'test_pairs_dresses.json'}[1]: box (1, 1, 1, 11) has no area (needs x2 > x1 and y2 > y1)"
    cat = read_dataset(root, "street2shop", skip_bad=True)
    assert len(cat.skipped) == 3 and len(cat.records) == 10  # two missing photos + the bad box
    (meta / "retrieval_bags.json").unlink()
    assert error_of(root, "street2shop", skip_bad=True).startswith(f"{meta / 'retrieval_bags.json'}: file not found")


# ----------------------------------------------------------------------------- DeepFashion2
def df2_item(style: int, category_id: int, name: str, box: list[int]) -> dict:
    return {"style": style, "category_id": category_id, "category_name": name, "bounding_box": box,
            "segmentation": [[0, 0, 1, 1, 1, 0]], "landmarks": [], "occlusion": 1, "scale": 2,
            "viewpoint": 2, "zoom_in": 1}


def make_df2(root: Path) -> Path:
    annos = {
        "train/annos/000001.json": {"source": "user", "pair_id": 1,
                                    "item1": df2_item(1, 1, "short sleeve top", [1, 2, 20, 18]),
                                    "item2": df2_item(0, 8, "trousers", [0, 10, 24, 20])},
        "train/annos/000002.json": {"source": "shop", "pair_id": 1,
                                    "item1": df2_item(1, 1, "short sleeve top", [0, 0, 24, 20])},
        "validation/annos/000001.json": {"source": "user", "pair_id": 5,
                                         "item1": df2_item(2, 7, "shorts", [3, 3, 12, 12])},
        "validation/annos/000002.json": {"source": "shop", "pair_id": 5,
                                         "item1": df2_item(2, 7, "shorts", [2, 2, 22, 19])},
    }
    for i, (rel, data) in enumerate(annos.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        jpeg(root / rel.replace("annos", "image").replace(".json", ".jpg"), seed=i)
    return root


def test_deepfashion2_items_pair_by_pair_id_and_style(tmp_path: Path):
    root = make_df2(tmp_path / "deep fashion 2 ü")
    cat = read_dataset(root, "deepfashion2")
    got = sorted((Path(r.path).relative_to(root).as_posix(), r.item_id, r.domain, r.split, r.category, r.box)
                 for r in cat.records)
    assert got == [
        ("train/image/000001.jpg", "1_1", "consumer", "train", "short sleeve top", (1, 2, 20, 18)),
        ("train/image/000002.jpg", "1_1", "shop", "train", "short sleeve top", (0, 0, 24, 20)),
        ("validation/image/000001.jpg", "5_2", "consumer", "val", "shorts", (3, 3, 12, 12)),
        ("validation/image/000002.jpg", "5_2", "shop", "val", "shorts", (2, 2, 22, 19)),
    ]
    assert cat.category_names == ["short sleeve top", "shorts"]  # ordered by category_id
    assert cat.skipped == [f"{root / 'train/annos/000001.json'}:item2: style 0 (no counterpart in the other domain), left out of retrieval"]


def test_deepfashion2_errors_name_file_and_item(tmp_path: Path):
    root = make_df2(tmp_path / "df2")
    (root / "validation/image/000002.jpg").unlink()
    anno = root / "validation/annos/000002.json"
    assert error_of(root, "deepfashion2") == f"{anno}:item1: {root / 'validation/image/000002.jpg'}: file not found"
    first = root / "train/annos/000001.json"
    data = json.loads(first.read_text())
    data["source"] = "street"
    first.write_text(json.dumps(data))
    assert error_of(root, "deepfashion2").startswith(f"{first}: source must be 'user' or 'shop'")
    (root / "train/annos/000002.json").write_text('{"source": "shop",\n "pair_id": }')
    assert error_of(root, "deepfashion2", check_images="none").startswith(f"{first}: source must be")
    cat = read_dataset(root, "deepfashion2", skip_bad=True)
    assert len(cat.skipped) == 3  # bad source, invalid JSON, missing image
    assert any(s.startswith(f"{root / 'train/annos/000002.json'}:2: invalid JSON") for s in cat.skipped)
    assert [r.item_id for r in cat.records] == ["5_2"]


# ----------------------------------------------------------------------------- CSV
def make_csv(folder: Path, header: list[str], rows: list[list[str]], name: str = "dataset.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # writes CRLF line endings
        writer.writerow(header)
        writer.writerows(rows)
    return folder / name


def test_csv_relative_absolute_unicode_paths_and_optional_columns(tmp_path: Path):
    folder = tmp_path / "my data ü"
    jpeg(folder / "photos" / "ünï code 1.jpg")
    elsewhere = tmp_path / "elsewhere" / "shop, one.jpg"
    jpeg(elsewhere)
    table = make_csv(folder, ["path", "item_id", "domain", "split", "x1", "y1", "x2", "y2", "category"], [
        ["photos/ünï code 1.jpg", "sku 1", "consumer", "test", "1", "2", "30", "18", "dress"],
        [str(elsewhere), "sku 1", "Shop", "TEST", "", "", "", "", ""],
        ["photos/ünï code 1.jpg", "sku 1", "consumer", "test", "1", "2", "30", "18", "dress"],  # repeat
    ])
    assert b"\r\n" in table.read_bytes()
    for root in (folder, table):
        cat = read_dataset(root, "csv")
        got = [(r.path, r.item_id, r.domain, r.split, r.box, r.category) for r in cat.records]
        assert got == [
            (str(folder / "photos" / "ünï code 1.jpg"), "sku 1", "consumer", "test", (1, 2, W, 18), "dress"),
            (str(elsewhere), "sku 1", "shop", "test", None, None),
        ]
        assert cat.category_names == ["dress"] and cat.skipped == []
    minimal = make_csv(tmp_path / "min", ["path", "item_id", "domain", "split"], [[str(elsewhere), "a", "shop", "val"]], "x.csv")
    assert [(r.split, r.box) for r in read_dataset(minimal, "csv").records] == [("val", None)]


CSV_ERRORS = [  # (id, row, message fragment)
    ("domain", ["a.jpg", "i", "street", "test", "", "", "", ""], "unknown domain 'street'"),
    ("split", ["a.jpg", "i", "shop", "query", "", "", "", ""], "unknown split 'query'"),
    ("box", ["a.jpg", "i", "shop", "test", "1", "1", "x", "9"], "box coordinate 'x' is not a number"),
    ("partial-box", ["a.jpg", "i", "shop", "test", "1", "1", "", "9"], "box coordinate '' is not a number"),
    ("columns", ["a.jpg", "i", "shop", "test", "1"], "expected 8 columns"),
    ("missing-image", ["b.jpg", "i", "shop", "test", "", "", "", ""], "file not found"),
]


@pytest.mark.parametrize("case", CSV_ERRORS, ids=[c[0] for c in CSV_ERRORS])
def test_csv_errors_name_file_and_line(tmp_path: Path, case):
    _, bad_row, fragment = case
    jpeg(tmp_path / "a.jpg")
    good = ["a.jpg", "i", "consumer", "test", "", "", "", ""]
    table = make_csv(tmp_path, ["path", "item_id", "domain", "split", "x1", "y1", "x2", "y2"], [good, bad_row, good])
    message = error_of(tmp_path, "csv")
    assert message.startswith(f"{table}:3: ")
    assert fragment in message
    cat = read_dataset(tmp_path, "csv", skip_bad=True)
    assert cat.skipped == [message] and len(cat.records) == 1


def test_csv_header_is_required(tmp_path: Path):
    jpeg(tmp_path / "a.jpg")
    table = make_csv(tmp_path, ["a.jpg", "i", "shop", "test"], [["a.jpg", "j", "consumer", "test"]])
    assert error_of(tmp_path, "csv") == f"{table}:1: missing header row path,item_id,domain,split[,x1,y1,x2,y2][,category]"
    cat = read_dataset(tmp_path, "csv", skip_bad=True)  # the first row is then read as data
    assert [r.item_id for r in cat.records] == ["i", "j"] and len(cat.skipped) == 1
    make_csv(tmp_path, ["path", "item", "domain", "split"], [])
    assert "header must be path,item_id,domain,split" in error_of(tmp_path, "csv", skip_bad=True)
