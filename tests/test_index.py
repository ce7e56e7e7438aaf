"""Gallery indexes: build, search by item, FAISS vs Milvus Lite, --add, killed builds, wrong checkpoints."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmfl.checkpoint import load_model
from mmfl.cli import main
from mmfl.data.formats import read_dataset
from mmfl.data.images import open_image
from mmfl.errors import GalleryIndexError, MMFLError
from mmfl.index import Searcher, build_index, open_store, parse_filters, read_manifest, search_items
from mmfl.index.search import embed_query

from search_helpers import ITEMS, item_category, make_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def shop(gallery: Path):
    return read_dataset(gallery, "csv").split("test", domain="shop")


@pytest.fixture(scope="module")
def flat_index(work: Path, gallery: Path, checkpoint: Path) -> Path:
    """Built through the CLI, as a user would."""
    out = work / "flat"
    assert main(["index", str(checkpoint), "--data", str(gallery), "--format", "csv", "--out", str(out),
                 "--no-progress", "--workers", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def milvus_index(work: Path, model, shop) -> Path:
    """Milvus Lite in a local file: built from half the items, then the rest added."""
    out = work / "milvus"
    first = [r for r in shop if r.item_id in ITEMS[:4]]
    build_index(model, first, out, backend="milvus", progress=False)
    report = build_index(model, shop, out, backend="milvus", add=True, progress=False)
    assert (report.added, report.already_indexed, report.count) == (len(shop) - len(first), len(first), len(shop))
    return out


def search_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["search", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_manifest_records_checkpoint_and_files(flat_index: Path, checkpoint: Path, model) -> None:
    m = read_manifest(flat_index)
    assert m["checkpoint"] == str(checkpoint.resolve())
    assert m["checkpoint_sha256"] == model.meta["checkpoint_sha256"]
    assert (m["backend"], m["kind"], m["embed_dim"], m["count"]) == ("faiss", "flat", model.embed_dim, 2 * len(ITEMS))
    assert m["facets"]["categories"] == {"dress": len(ITEMS), "top": len(ITEMS)}
    # a CSV gallery has no attribute labels: every row is predicted, and this checkpoint stores no
    # thresholds, which the manifest says rather than passing 0.5 off as calibrated
    assert m["facets"]["attribute_sources"] == {"predicted": 2 * len(ITEMS)}
    assert m["attribute_predictions"]["thresholds"]["source"] == "default"
    assert set(m["files"]) == set(m["faiss"].values()) == {p.name for p in flat_index.iterdir()} - {"manifest.json"}
    rows = [json.loads(line) for line in (flat_index / m["faiss"]["metadata"]).read_text().splitlines()]
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)


def test_gallery_image_finds_its_own_item_first(flat_index: Path, gallery: Path, capsys) -> None:
    for item in ITEMS[::3]:
        answer = search_json(capsys, str(flat_index), str(gallery / f"{item}_shop_1.png"), "--top-k", "5")
        results = answer["results"]
        assert results[0]["item_id"] == item
        assert results[0]["image"] == str((gallery / f"{item}_shop_1.png").resolve())
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["category"] == item_category(item)
        ids = [r["item_id"] for r in results]
        assert len(ids) == len(set(ids)) == 5  # items, not duplicate images
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        assert answer["query"]["k"] == 5 and answer["query"]["width"] == 48


def test_phone_size_photo_is_decoded_small_and_answers_as_a_full_decode(flat_index: Path, gallery: Path,
                                                                        tmp_path: Path) -> None:
    """A gallery image enlarged to 1920 px (a phone photo) is decoded at 1/8 scale by ``search_photo``:
    the same items in the same order, scores within 0.01 of the full decode's, and the full size reported."""
    from PIL import Image

    big = tmp_path / "phone.jpg"
    Image.open(gallery / "id_04_shop_0.png").convert("RGB").resize((1920, 1920), Image.Resampling.BICUBIC).save(
        big, quality=92)
    searcher = Searcher(flat_index)
    try:
        reduced = searcher.search_photo(big, k=5, bbox=(80, 80, 1840, 1880))
        full = searcher.search(open_image(big), k=5, bbox=(80, 80, 1840, 1880))
    finally:
        searcher.close()
    assert [r["item_id"] for r in reduced["results"]] == [r["item_id"] for r in full["results"]]
    assert reduced["results"][0]["item_id"] == "id_04"
    assert all(abs(a["score"] - b["score"]) < 0.01 for a, b in zip(reduced["results"], full["results"]))
    query = reduced["query"]
    assert (query["width"], query["height"], query["bbox"]) == (1920, 1920, [80, 80, 1840, 1880])


def test_search_table_bbox_and_filters(flat_index: Path, gallery: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["search", str(flat_index), str(gallery / "id_02_shop_0.png"), "--top-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["rank", "score", "item"] and table[2].split()[:3] == ["1", "1.0000", "id_02"]
    answer = search_json(capsys, str(flat_index), str(gallery / "id_02_shop_0.png"), "--bbox", "4,4,40,44",
                         "--filter", "category=top", "--top-k", "8")
    assert answer["query"]["bbox"] == [4, 4, 40, 44] and answer["query"]["filters"] == ["category=top"]
    assert {r["category"] for r in answer["results"]} == {"top"}
    assert len(answer["results"]) == len(ITEMS) // 2  # every top item, found by growing the over-fetch
    assert main(["search", str(flat_index), str(gallery / "id_02_shop_0.png"), "--filter", "colour=red"]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err


def test_ivf_and_hnsw_find_the_item_and_record_parameters(work: Path, model, shop, gallery: Path) -> None:
    for kind, keys in (("ivf", {"nlist", "nprobe"}), ("hnsw", {"M", "efConstruction", "efSearch"})):
        out = work / kind
        build_index(model, shop, out, kind=kind, progress=False)
        store = open_store(out)
        assert store.manifest["kind"] == kind and set(store.manifest["params"]) == keys
        query = embed_query(model, open_image(gallery / "id_05_shop_0.png"))
        assert search_items(store, query.vector, 3)[0].entry.item_id == "id_05"


def test_faiss_flat_and_milvus_lite_return_the_same_items(flat_index: Path, milvus_index: Path, model, gallery) -> None:
    faiss_store, milvus_store = open_store(flat_index), open_store(milvus_index)
    try:
        assert len(faiss_store) == len(milvus_store) == 2 * len(ITEMS)
        attribute = next(iter(read_manifest(flat_index)["facets"]["attributes"]), "floral")
        for name in ("id_01_shop_0.png", "id_06_consumer_2.png", "id_04_shop_1.png"):
            vector = embed_query(model, open_image(gallery / name)).vector
            for flt in (parse_filters([]), parse_filters(["category=dress"]), parse_filters([f"attribute={attribute}"])):
                a, b = search_items(faiss_store, vector, 5, flt), search_items(milvus_store, vector, 5, flt)
                assert [h.entry.item_id for h in a] == [h.entry.item_id for h in b]
                assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-4)
                assert all(flt.matches(h.entry) for h in b)
        assert milvus_store.images_of("id_03") == faiss_store.images_of("id_03")
        assert milvus_store.images_of("no-such-item") == []
    finally:
        faiss_store.close()
        milvus_store.close()


def test_milvus_lite_index_is_refused_for_several_server_workers(milvus_index: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["serve", str(milvus_index), "--workers", "2"]) == 2
    assert "one process at a time" in capsys.readouterr().err


def test_add_keeps_old_items_and_skips_known_images(work: Path, model, shop, gallery: Path, checkpoint: Path) -> None:
    out = work / "grow"
    first = [r for r in shop if r.item_id in ITEMS[:3]]
    build_index(model, first, out, progress=False)
    old_rows = list(open_store(out).entries)
    created = read_manifest(out)["created"]
    assert main(["index", str(checkpoint), "--data", str(gallery), "--format", "csv", "--out", str(out),
                 "--add", "--no-progress", "--workers", "0"]) == 0
    after = open_store(out)
    assert len(after) == len(shop)
    assert after.entries[:len(old_rows)] == old_rows
    assert {e.item_id for e in after.entries} == set(ITEMS)
    query = embed_query(model, open_image(gallery / "id_07_shop_0.png")).vector
    assert search_items(after, query, 1)[0].entry.item_id == "id_07"
    report = build_index(model, shop, out, add=True, progress=False)
    assert (report.added, report.already_indexed, report.count) == (0, len(shop), len(shop))
    assert read_manifest(out)["created"] == created


def test_killed_build_leaves_the_previous_index_usable(work: Path, model, shop, gallery: Path, checkpoint: Path) -> None:
    out = work / "killed"
    build_index(model, [r for r in shop if r.item_id in ITEMS[:2]], out, progress=False)
    before = read_manifest(out)
    argv = ["index", str(checkpoint), "--data", str(gallery), "--format", "csv", "--out", str(out),
            "--add", "--no-progress", "--workers", "0"]
    # SIGKILL the build at the worst moment: new data fully written, manifest about to be switched.
    code = textwrap.dedent(f"""
        import os, signal, sys
        real_replace = os.replace
        def die_at_commit(src, dst, *args, **kwargs):
            if os.path.basename(str(dst)) == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)
        os.replace = die_at_commit
        from mmfl.cli import main
        sys.exit(main({argv!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(list(out.glob("vectors-*.faiss"))) == 2  # the dead build's generation is on disk...
    assert read_manifest(out) == before  # ...but not visible
    store = open_store(out)
    assert len(store) == 4
    query = embed_query(model, open_image(gallery / "id_01_shop_1.png")).vector
    assert search_items(store, query, 1)[0].entry.item_id == "id_01"
    report = build_index(model, shop, out, add=True, progress=False)
    assert report.count == len(shop)
    assert len(list(out.glob("vectors-*.faiss"))) == 1 and not list(out.glob(".manifest.json.tmp-*"))


def test_index_from_another_checkpoint_is_refused(work: Path, flat_index: Path, gallery: Path, checkpoint: Path,
                                                  capsys) -> None:
    other = make_checkpoint(work / "other.pt", seed=1)
    capsys.readouterr()
    rc = main(["index", str(other), "--data", str(gallery), "--format", "csv", "--out", str(flat_index), "--add", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "rebuild the index" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(GalleryIndexError, match="sha256"):
        Searcher(flat_index, checkpoint=other)
    copy = work / "moved" / "model.pt"  # the same checkpoint under another path is accepted
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    Searcher(flat_index, checkpoint=copy).close()


def test_broken_or_foreign_folders_are_refused(work: Path, flat_index: Path, model, shop) -> None:
    broken = work / "broken"
    shutil.copytree(flat_index, broken)
    meta = broken / read_manifest(broken)["faiss"]["metadata"]
    meta.write_text(meta.read_text().replace("id_00", "id_99"))
    with pytest.raises(GalleryIndexError, match="SHA-256"):
        open_store(broken)
    moved = work / "moved-ckpt"
    shutil.copytree(flat_index, moved)
    manifest = read_manifest(moved)
    manifest["checkpoint"] = str(work / "gone.pt")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GalleryIndexError, match="--checkpoint"):
        Searcher(moved)
    foreign = work / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GalleryIndexError, match="not an mmfl index"):
        build_index(model, shop, foreign, progress=False)
    with pytest.raises(MMFLError, match="expected key=value"):
        parse_filters(["category"])
