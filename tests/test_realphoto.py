"""The real-photo benchmark: seeded consumer-style views with valid boxes (standard and hard protocols),
leak-free distractors, and smoke runs of the bench."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfl.data.consumer_views.hard import hard_view
from mmfl.data.consumer_views.standard import consumer_view
from mmfl.data.formats import read_dataset
from mmfl.data.realphoto import (
    CSV_HEADER,
    DISTRACTOR_SPLIT,
    _ItemJob,
    build_realphoto,
    check_no_leak,
    find_clothing_small,
    item_rng,
)
from mmfl.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "realphoto.py"


def _photo_folder(root: Path, train: int = 3) -> Path:
    """A tiny clothing-small lookalike: 2 classes, ``train`` train + 1 validation photo each, varied sizes."""
    rng = np.random.default_rng(7)
    sizes = [(72, 96), (96, 72), (60, 100), (80, 80)]
    for split, count in (("train", train), ("validation", 1)):
        for cls in ("dress", "hat"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = sizes[(i + len(cls)) % len(sizes)]
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{cls}-{split}-{i}.jpg", quality=90)
    return root


def _tree_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "build.json"}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "dataset.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_views_are_deterministic_and_boxes_lie_inside(tmp_path: Path) -> None:
    src = _photo_folder(tmp_path / "src")
    a = build_realphoto(src, tmp_path / "a", views=3, seed=0, size=64).parent
    b = build_realphoto(src, tmp_path / "b", views=3, seed=0, size=64, workers=2).parent
    hashes = _tree_hashes(a)
    assert hashes == _tree_hashes(b)
    stamp = (a / "dataset.csv").stat().st_mtime_ns
    assert build_realphoto(src, a, views=3, seed=0, size=64) == a / "dataset.csv"  # same parameters: reused
    assert (a / "dataset.csv").stat().st_mtime_ns == stamp
    assert len(hashes) == 2 + 8 * 4  # the two CSVs plus shop + 3 views for each of 8 photos

    # A subset renders each kept item exactly as the full build did; another seed renders differently.
    sub = build_realphoto(src, tmp_path / "sub", views=3, seed=0, size=64, max_items=2).parent
    sub_hashes = {k: v for k, v in _tree_hashes(sub).items() if not k.endswith(".csv")}
    assert len(sub_hashes) == 2 * 2 * 4  # 2 items per split
    assert all(hashes[k] == v for k, v in sub_hashes.items())
    train_only = _rows(build_realphoto(src, tmp_path / "t", views=3, seed=0, size=64, max_items={"train": 1}).parent)
    assert len({r["item_id"] for r in train_only if r["split"] == "train"}) == 1
    assert len({r["item_id"] for r in train_only if r["split"] == "val"}) == 2
    other = _tree_hashes(build_realphoto(src, tmp_path / "c", views=3, seed=1, size=64).parent)
    views = [k for k in hashes if "_v" in k]
    assert all(other[k] != hashes[k] for k in views)
    assert all(other[k] == hashes[k] for k in hashes if k.endswith("_shop.jpg"))

    with open(a / "dataset.csv", newline="") as fh:
        assert next(csv.reader(fh)) == CSV_HEADER
    rows = _rows(a)
    assert {r["split"] for r in rows} == {"train", "val"}
    assert {r["category"] for r in rows} == {"dress", "hat"}
    for r in rows:
        path = a / r["path"]
        assert not Path(r["path"]).is_absolute() and path.is_file()
        assert r["item_id"] in path.name
        w, h = Image.open(path).size
        x1, y1, x2, y2 = (int(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        if r["domain"] == "shop":
            assert (x1, y1, x2, y2) == (0, 0, w, h) and max(w, h) == 64
        else:
            assert (w, h) == (64, 64) and x2 - x1 >= 8 and y2 - y1 >= 8

    catalog = read_dataset(a, "csv")
    assert len(catalog.split("val", "consumer")) == 6 and len(catalog.split("val", "shop")) == 2
    assert len(catalog.items(catalog.split("train"))) == 6


def test_box_covers_the_garment() -> None:
    """A pure-red photo: the box holds far more red pixels than the clutter around it."""
    photo = Image.new("RGB", (90, 120), (255, 0, 0))
    inside, outside = [], []
    for k in range(8):
        view, (x1, y1, x2, y2), quality = consumer_view(photo, item_rng(0, "train", f"red-{k}"), 128)
        assert 60 <= quality <= 92
        arr = np.asarray(view, dtype=np.int32)
        red = (arr[..., 0] > arr[..., 1] + 60) & (arr[..., 0] > arr[..., 2] + 60)
        mask = np.zeros_like(red)
        mask[y1:y2, x1:x2] = True
        inside.append(red[mask].mean())
        outside.append(red[~mask].mean() if (~mask).any() else 0.0)
    assert np.mean(inside) > 0.5 and np.mean(inside) > np.mean(outside) + 0.3


def test_hard_views_are_deterministic_with_boxes_inside(tmp_path: Path) -> None:
    src = _photo_folder(tmp_path / "src")
    a = build_realphoto(src, tmp_path / "a", views=2, seed=0, size=64, protocol="hard").parent
    b = build_realphoto(src, tmp_path / "b", views=2, seed=0, size=64, protocol="hard", workers=2).parent
    hashes = _tree_hashes(a)
    assert hashes == _tree_hashes(b)
    standard = _tree_hashes(build_realphoto(src, tmp_path / "s", views=2, seed=0, size=64).parent)
    views = [k for k in hashes if "_v" in k]
    assert len(views) == 16 and all(standard[k] != hashes[k] for k in views)  # another renderer and stream
    assert all(standard[k] == hashes[k] for k in hashes if k.endswith("_shop.jpg"))
    assert json.loads((a / "build.json").read_text())["params"]["protocol"] == "hard"
    for r in _rows(a):
        w, h = Image.open(a / r["path"]).size
        x1, y1, x2, y2 = (int(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    with pytest.raises(DataError, match="unknown protocol"):
        build_realphoto(src, tmp_path / "x", size=64, protocol="harder")


def test_hard_box_covers_the_visible_garment() -> None:
    """The same stream renders a red and a blue photo: the pixels that differ are the visible garment.

    Geometry, clutter, occluders and lighting are drawn identically for both, so the difference
    isolates the garment; nearly all of it must lie in the box (blur and low resolution smear a
    rim of a few pixels), and the garment must fill a fair share of the box.
    """
    red, blue = Image.new("RGB", (90, 120), (220, 30, 30)), Image.new("RGB", (90, 120), (30, 30, 220))
    for k in range(12):
        view_r, box, quality = hard_view(red, item_rng(0, "train", f"g-{k}", "hard"), 128)
        view_b, box_b, _ = hard_view(blue, item_rng(0, "train", f"g-{k}", "hard"), 128)
        again, box_again, _ = hard_view(red, item_rng(0, "train", f"g-{k}", "hard"), 128)
        assert np.array_equal(np.asarray(view_r), np.asarray(again)) and box_again == box == box_b
        assert 40 <= quality <= 85 and view_r.size == (128, 128)
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
        diff = np.abs(np.asarray(view_r, np.int32) - np.asarray(view_b, np.int32)).max(axis=2) > 40
        inside = np.zeros_like(diff)
        inside[y1:y2, x1:x2] = True
        near = np.zeros_like(diff)
        near[max(0, y1 - 8):y2 + 8, max(0, x1 - 8):x2 + 8] = True
        assert diff.sum() > 0
        assert diff[inside].sum() >= 0.9 * diff.sum() and diff[near].sum() >= 0.99 * diff.sum()
        assert diff[inside].mean() > 0.2


def test_distractors_are_unused_training_photos(tmp_path: Path) -> None:
    src = _photo_folder(tmp_path / "src", train=6)  # 12 train photos
    out = build_realphoto(src, tmp_path / "d", views=1, seed=0, size=64, max_items={"train": 5},
                          distractors=6).parent
    rows = _rows(out)
    train = {r["item_id"] for r in rows if r["split"] == "train"}
    distractors = [r for r in rows if r["split"] == DISTRACTOR_SPLIT]
    assert len(train) == 5 and len(distractors) == 6
    assert all(r["domain"] == "shop" for r in distractors)
    assert not train & {r["item_id"] for r in distractors}  # no training item in the gallery
    assert json.loads((out / "build.json").read_text())["items"] == {"train": 5, "val": 2, "test": 6}
    # The training subset is the one built without distractors, image for image.
    plain = _tree_hashes(build_realphoto(src, tmp_path / "p", views=1, seed=0, size=64, max_items={"train": 5}).parent)
    assert {k: v for k, v in _tree_hashes(out).items() if "/test/" not in k and not k.endswith(".csv")} == \
        {k: v for k, v in plain.items() if not k.endswith(".csv")}
    catalog = read_dataset(out, "csv")
    assert len(catalog.split(["val", DISTRACTOR_SPLIT], "shop")) == 8 and not catalog.split(DISTRACTOR_SPLIT, "consumer")
    with pytest.raises(DataError, match="only 7 training photos are left out"):
        build_realphoto(src, tmp_path / "e", size=64, max_items={"train": 5}, distractors=8)
    with pytest.raises(DataError, match="only 0 training photos"):
        build_realphoto(src, tmp_path / "f", size=64, distractors=1)


def test_plain_scores_match_an_evaluation_without_distractors(tmp_path: Path) -> None:
    """The plain-gallery scores re-ranked from the wide pass equal a separate plain evaluation."""
    import torch

    class Thumbnail(torch.nn.Module):
        """A fixed, training-free embedding: the 4x4 colour thumbnail, L2-normalised."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1), dim=1)

    src = _photo_folder(tmp_path / "src", train=6)
    out = build_realphoto(src, tmp_path / "d", views=3, seed=0, size=64, max_items={"train": 5},
                          distractors=6, protocol="hard").parent
    catalog = read_dataset(out, "csv")
    bench = _load_bench()
    s = {"size": 32, "device": "cpu", "num_workers": 0, "distractors": 6}
    wide = bench.evaluate(Thumbnail(), catalog, s, progress=False)
    plain = bench.evaluate(Thumbnail(), catalog, {**s, "distractors": 0}, progress=False)
    assert "distractors" in wide and "distractors" not in plain
    assert {k: v for k, v in wide.items() if k != "distractors"} == plain
    assert wide["distractors"]["num_gallery"] == 8 and plain["num_gallery"] == 2
    assert wide["distractors"]["mAP"] <= plain["mAP"]


def test_leak_check_refuses_a_distractor_that_is_a_training_item() -> None:
    def job(stem: str, split: str) -> _ItemJob:
        return _ItemJob(f"/x/{stem}.jpg", stem, "hat", split, 1, 0, 64, "/tmp/out")

    check_no_leak([job("a", "train"), job("b", DISTRACTOR_SPLIT)])
    with pytest.raises(DataError, match="1 are training items"):
        check_no_leak([job("a", "train"), job("b", DISTRACTOR_SPLIT), job("a", DISTRACTOR_SPLIT)])


def test_find_clothing_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _photo_folder(tmp_path / "shared" / "data" / "clothing-small")
    assert find_clothing_small(src) == src
    assert find_clothing_small(tmp_path / "shared") == src
    assert find_clothing_small(tmp_path / "nothing-here") is None
    monkeypatch.setenv("MMFL_SHARED", str(tmp_path / "shared"))
    assert find_clothing_small() == src


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_realphoto", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_refuses_a_missing_source_and_a_work_folder_in_the_repo(tmp_path: Path, capsys) -> None:
    bench = _load_bench()
    assert bench.main(["--src", str(tmp_path / "missing"), "--smoke"]) == 2
    assert "no clothing-small photos" in capsys.readouterr().err
    src = _photo_folder(tmp_path / "src")
    assert bench.main(["--src", str(src), "--smoke", "--work", str(REPO / "runs-here")]) == 2
    assert "inside the repository" in capsys.readouterr().err
    assert bench.main(["--src", str(src), "--smoke", "--variants", "global,nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert bench.main(["--src", str(src), "--smoke", "--seeds", "0,x"]) == 2
    assert "--seeds: '0,x'" in capsys.readouterr().err


def test_bench_smoke_on_real_photos(tmp_path: Path) -> None:
    src = find_clothing_small()
    if src is None:
        pytest.skip("clothing-small not found: set MMFL_SHARED or place shared/ beside the repository")
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--src", str(src), "--work", str(tmp_path / "work"),
         "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"imagenet-only", "global"}
    for r in rows.values():
        assert r["num_gallery"] == 20 and r["num_queries"] == 60
        tops = [r[k] for k in ("top1", "top5", "top10", "top20")]
        assert all(0 <= t <= 1 for t in tops) and tops == sorted(tops) and 0 < r["mAP"] <= 1
    # ImageNet features already find the right photo among 20 far above chance (0.05).
    assert rows["imagenet-only"]["top1"] > 0.3
    assert rows["global"]["seed"] == 0 and rows["global"]["epochs"] == 1 and rows["global"]["train_minutes"] > 0
    assert doc["settings"]["size"] == 64 and doc["settings"]["items"] == 20
    assert set(doc["summary"]) == {"imagenet-only", "global"}
    assert "| imagenet-only |" in proc.stdout
    assert not any((REPO / p).exists() for p in ("images", "dataset.csv"))


def test_bench_hard_smoke_with_distractors_and_paired_stats(tmp_path: Path) -> None:
    """20 items on the hard protocol with distractors; two trained variants over 2 seeds are compared."""
    src = find_clothing_small()
    if src is None:
        pytest.skip("clothing-small not found: set MMFL_SHARED or place shared/ beside the repository")
    out = tmp_path / "hard.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--protocol", "hard", "--distractors", "40", "--src", str(src),
         "--work", str(tmp_path / "work"), "--variants", "imagenet-only,global,mgn", "--seeds", "0,1",
         "--pretrained", "imagenet", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["protocol"] == "hard" and doc["settings"]["distractors"] == 40
    for r in doc["rows"]:
        assert r["num_gallery"] == 20 and r["num_queries"] == 60
        assert r["distractors"]["num_gallery"] == 60 and r["distractors"]["num_queries"] == 60
        # More gallery photos can only push the right one down the list.
        assert r["distractors"]["top1"] <= r["top1"] and r["distractors"]["top20"] <= r["top20"]
    assert len([r for r in doc["rows"] if r["variant"] == "mgn"]) == 2
    assert {(c["a"], c["b"], c["gallery"], c["metric"]) for c in doc["comparisons"]} == {
        ("mgn", "global", g, m) for g in ("plain", "distractors") for m in ("top1", "mAP")}
    for c in doc["comparisons"]:
        assert c["n"] == 2 and c["seeds"] == [0, 1] and 0 <= c["p"] <= 1
    assert "distractors" in doc["summary"]["mgn"] and "| mgn vs global |" in proc.stdout
    data = next((tmp_path / "work").glob("data-*-hard-d40"))
    rows = _rows(data)
    train = {r["item_id"] for r in rows if r["split"] == "train"}
    assert len(train) == 20 and not train & {r["item_id"] for r in rows if r["split"] == DISTRACTOR_SPLIT}
