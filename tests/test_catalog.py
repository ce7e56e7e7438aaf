"""``mmfl.Catalog`` on a tiny FAISS index: the CLI's answers, add, remove, compaction, input checks."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfl import Catalog
from mmfl.cli import main
from mmfl.errors import GalleryIndexError, MMFLError
from mmfl.index import Filter, open_store, read_manifest

from search_helpers import ITEMS, draw_item, make_served_index


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/gallery``, ``root/model.pt`` and ``root/index``: a flat FAISS index of 8 items x 2 shop photos."""
    root = tmp_path_factory.mktemp("catalog")
    make_served_index(root)
    return root


@pytest.fixture
def index(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the index for a test that changes it."""
    return Path(shutil.copytree(built / "index", tmp_path / "index"))


def png(item: str, variant: int) -> bytes:
    buffer = io.BytesIO()
    draw_item(item, variant).save(buffer, format="PNG")
    return buffer.getvalue()


def without_time(answer: dict) -> dict:
    return {**answer, "query": {k: v for k, v in answer["query"].items() if k != "took_ms"}}


def test_search_answers_as_the_cli_does(built: Path, capsys: pytest.CaptureFixture) -> None:
    photo = built / "gallery" / "id_05_consumer_2.png"
    capsys.readouterr()
    assert main(["search", str(built / "index"), str(photo), "--json", "--top-k", "5", "--bbox", "2,2,40,44",
                 "--filter", "category=top"]) == 0
    cli = json.loads(capsys.readouterr().out)
    with Catalog.open(built / "index") as catalog:
        api = catalog.search(str(photo), k=5, box=(2, 2, 40, 44), filter={"categories": ["top"]})
        assert without_time(api) == without_time(cli)
        assert api["results"][0]["item_id"] == "id_05"
        many = catalog.search_many([photo, png("id_02", 1)], k=3)
        assert without_time(many[0]) == without_time(catalog.search(photo, k=3))
        assert [a["results"][0]["item_id"] for a in many] == ["id_05", "id_02"]


def test_a_model_without_box_head_searches_the_whole_photo_and_says_why(built: Path) -> None:
    photo = built / "gallery" / "id_05_consumer_2.png"
    with Catalog.open(built / "index") as catalog:
        assert not catalog.has_box_head
        q = catalog.search(photo, k=2)["query"]
        assert (q["bbox"], q["box_source"], q["box_reason"], q["detections"]) == (None, "whole", "model has no box head", [])
        garments = catalog.search_garments(photo, k=2)
        assert [g["box_source"] for g in garments["garments"]] == ["whole"]
        assert garments["garments"][0]["results"] == catalog.search(photo, k=2)["results"]
        with pytest.raises(MMFLError, match="cannot detect garments: model has no box head"):
            catalog.detect(photo)


def test_an_exif_turned_photo_is_searched_upright_whatever_its_form(built: Path, tmp_path: Path) -> None:
    """A JPEG stored sideways with an EXIF orientation: its path, its bytes, the decoded PIL image and
    ``Retriever.embed`` all search (and embed) the upright photo, through the one decode path."""
    import mmfl

    upright = draw_item("id_04", 2).resize((48, 64))
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to view": stored turned a quarter clockwise
    sideways = tmp_path / "sideways.jpg"
    upright.rotate(-90, expand=True).save(sideways, quality=95, exif=exif)
    box = (4, 6, 40, 50)
    with Catalog.open(built / "index") as catalog:
        answers = [without_time(catalog.search(source, k=4, box=box)) for source in
                   (str(sideways), sideways.read_bytes(), Image.open(sideways))]
        assert answers[1] == answers[0] and answers[2]["results"] == answers[0]["results"]
        assert [(a["query"]["width"], a["query"]["height"]) for a in answers] == [(48, 64)] * 3
        vector = mmfl.Retriever.load(built / "model.pt").embed([Image.open(sideways)], boxes=[box])[0]
        by_vector = catalog.search(vector, k=4)["results"]
    assert [r["item_id"] for r in by_vector] == [r["item_id"] for r in answers[0]["results"]]
    assert [r["score"] for r in by_vector] == pytest.approx([r["score"] for r in answers[0]["results"]], abs=1e-5)


def test_added_item_is_found_and_a_removed_one_is_gone_also_after_reopening(index: Path) -> None:
    new_photos = [png("id_03", 5), png("id_03", 6)]  # a look-alike of id_03 under a new id
    with Catalog.open(index) as catalog:
        report = catalog.add(new_photos, "new_item", category="dress", attributes=["denim"])
        assert report == {"item_id": "new_item", "added": 2, "already_indexed": 0, "count": 2 * len(ITEMS) + 2}
        first = catalog.search(new_photos[1], k=3)["results"][0]
        assert first["item_id"] == "new_item" and first["score"] == pytest.approx(1.0, abs=1e-4)
        assert first["attributes"] == ["denim"] and first["attribute_source"] == "annotated"
        assert catalog.add(new_photos[:1], "new_item")["already_indexed"] == 1  # the same photo again: skipped
        stored = catalog.images_of("new_item")
        assert [Path(p).parent for p in stored] == [(index / "photos").resolve()] * 2
        assert Path(stored[0]).read_bytes() == new_photos[0]
        facets = catalog.manifest["facets"]
        assert facets["categories"]["dress"] == len(ITEMS) + 2 and facets["attributes"]["denim"] == 2
    with Catalog.open(index) as catalog:  # durable: another process would see the same
        assert catalog.search(new_photos[0], k=1)["results"][0]["item_id"] == "new_item"
        assert catalog.remove(["new_item", "id_03"]) == 2
        assert len(catalog) == 2 * len(ITEMS) - 2
        found = {r["item_id"] for r in catalog.search(new_photos[0], k=len(ITEMS))["results"]}
        assert found == set(ITEMS) - {"id_03"}
        assert "denim" not in catalog.manifest["facets"]["attributes"]
    with Catalog.open(index) as catalog:
        assert catalog.images_of("id_03") == [] and len(catalog) == 2 * len(ITEMS) - 2


def test_uploaded_photos_go_when_the_removal_of_their_items_commits(index: Path) -> None:
    """A removed item's uploads are deleted by its removal (not at a later compaction); one that another live
    item shares stays; a file no row names (what a killed writer leaves) goes at the next commit."""
    only, shared, later = png("id_02", 5), png("id_04", 5), png("id_02", 6)
    photos = (index / "photos").resolve()

    def on_disk() -> set[str]:
        return {str(p.resolve()) for p in photos.iterdir()}

    with Catalog.open(index) as catalog:
        catalog.add([only, shared], "first")
        catalog.add([shared, later], "second")
        first, second = catalog.images_of("first"), catalog.images_of("second")
        assert first[1] == second[0] and on_disk() == {*first, *second}  # the shared upload is one file
        assert catalog.remove(["first"]) == 1
        assert on_disk() == set(second) and Path(second[0]).read_bytes() == shared
        orphans = [photos / f"{n:032x}.png" for n in (1, 2)]
        orphans[0].write_bytes(only)
        catalog.add(np.eye(catalog.manifest["embed_dim"], dtype=np.float32)[:1], "vector_item")
        assert on_disk() == set(second)
        orphans[1].write_bytes(only)
        catalog.remove(["id_05"])  # removes no upload of its own
        assert on_disk() == set(second)
        catalog.remove(["second"])
        assert on_disk() == set()
        assert catalog.search(shared, k=1)["results"][0]["item_id"] != "second"


def test_vectors_can_be_added_and_searched_without_a_model(index: Path) -> None:
    with Catalog.open(index, with_model=False) as catalog:
        dim = catalog.manifest["embed_dim"]
        vectors = np.random.default_rng(0).normal(size=(3, dim)).astype(np.float32)
        catalog.add(vectors[:2], "vec_item", category="top")
        answers = catalog.search_many(vectors, k=2)
        assert answers[0]["results"][0]["item_id"] == "vec_item"
        assert answers[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert answers[2]["results"][0]["item_id"] != "vec_item" or answers[2]["results"][0]["score"] < 0.99
        with pytest.raises(MMFLError, match="opened without a model"):
            catalog.search(png("id_01", 0))
        with pytest.raises(MMFLError, match=rf"\(N, {dim}\)"):
            catalog.add(vectors[:, :5], "short")


def test_compaction_folds_the_journal_into_a_new_generation(index: Path) -> None:
    photo = png("id_06", 4)
    with Catalog.open(index) as catalog:
        catalog.add([photo], "fresh")
        catalog.remove(["id_01"])
        before = without_time(catalog.search(photo, k=6))
        old = catalog.manifest["generation"]
        catalog.compact()
        assert catalog.manifest["generation"] != old and "journal" not in catalog.manifest
        assert without_time(catalog.search(photo, k=6)) == before
    assert not list(index.glob("journal-*")) and len(list(index.glob("vectors-*"))) == 1
    store = open_store(index)
    assert len(store) == 2 * len(ITEMS) - 1 and store.pending_rows() == 0


def test_a_torn_journal_tail_is_ignored_and_a_damaged_journal_refused(index: Path) -> None:
    with Catalog.open(index, with_model=False) as catalog:
        catalog.remove(["id_02"])
        committed = read_manifest(index)
    journal = index / committed["journal"]["file"]
    with open(journal, "ab") as fh:  # what a writer killed between its append and its commit leaves
        fh.write(b'{"op":"remove","item_ids":["id_04"]}\n{"op":"add","entr')
    store = open_store(index)
    assert len(store) == 2 * len(ITEMS) - 2 and store.images_of("id_04")
    with Catalog.open(index, with_model=False) as catalog:  # the next writer cuts the tail off first
        catalog.remove(["id_05"])
        assert catalog.images_of("id_04") and journal.stat().st_size == catalog.manifest["journal"]["bytes"]
    data = bytearray(journal.read_bytes())
    data[10] ^= 1
    journal.write_bytes(bytes(data))
    with pytest.raises(GalleryIndexError, match="SHA-256"):
        open_store(index)


def test_index_remove_command(index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["index", "--out", str(index), "--remove", "id_01, id_02"]) == 0
    assert f"removed 2 items (4 images); {2 * len(ITEMS) - 4} images left" in capsys.readouterr().out
    ids = tmp_path / "ids.txt"
    ids.write_text("# gone today\nid_03\n\nno_such_item\nalso_missing\n")
    assert main(["index", "--out", str(index), "--remove", f"@{ids}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "2 of 3 item ids are not in the catalogue ('no_such_item', 'also_missing'); nothing was removed" in err
    assert open_store(index).images_of("id_03")
    for argv, words in ((["--remove", "id_01"], "id_01"), (["--remove", f"@{tmp_path / 'none.txt'}"], "file not found"),
                        (["--remove", " , "], "no item ids"), (["model.pt", "--remove", "id_04"], "takes only --out"),
                        ([], "CHECKPOINT, --data, --format required")):
        assert main(["index", "--out", str(index), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


def test_strings_where_lists_are_expected_are_refused(index: Path) -> None:
    with pytest.raises(MMFLError, match=r"Filter.attributes: expected a list of names, got the string 'denim'"):
        Filter(attributes="denim")
    assert Filter(attributes=["denim"]).attributes == ("denim",)
    assert Filter.coerce({"categories": ["top"]}) == Filter(categories=("top",))
    for bad, words in (({"category": ["top"]}, "unknown key 'category'"), ({"categories": "top"}, "the string 'top'"),
                       ("category=top", "expected a Filter or a dict"), ({"attributes": [""]}, "non-empty string")):
        with pytest.raises(MMFLError, match=words):
            Filter.coerce(bad)
    with Catalog.open(index) as catalog:
        photo = png("id_01", 0)
        cases = [
            (lambda: catalog.search(photo, filter={"attributes": "denim"}), "the string 'denim'"),
            (lambda: catalog.search(photo, box="1,2,30,40"), "box: expected"),
            (lambda: catalog.search(photo, k=0), "k=0"),
            (lambda: catalog.search_many(photo), "expected a list of photos"),
            (lambda: catalog.search_many([photo], boxes=[(1, 1, 9, 9), None]), "2 boxes for 1 images"),
            (lambda: catalog.add(photo, "x"), "expected a list of photos"),
            (lambda: catalog.add([photo], "x", attributes="denim"), "the string 'denim'"),
            (lambda: catalog.add([photo], ""), "item_id: expected a non-empty string"),
            (lambda: catalog.add([b"not an image"], "x"), "photo 1 of item 'x'"),
            (lambda: catalog.remove("id_01"), "the string 'id_01'"),
        ]
        for call, words in cases:
            with pytest.raises(MMFLError, match=words):
                call()
        assert len(catalog) == 2 * len(ITEMS) and "journal" not in catalog.manifest  # nothing was written


def test_index_add_folds_live_updates_into_its_new_generation(index: Path, built: Path) -> None:
    with Catalog.open(index) as catalog:
        catalog.add([png("id_03", 5)], "live_only")
        catalog.remove(["id_01"])
    assert main(["index", str(built / "model.pt"), "--data", str(built / "gallery"), "--format", "csv",
                 "--out", str(index), "--add", "--no-progress", "--workers", "0"]) == 0
    store = open_store(index)
    assert "journal" not in store.manifest and not list(index.glob("journal-*"))
    assert len(store.images_of("live_only")) == 1 and len(store.images_of("id_01")) == 2  # id_01 is in the dataset
    assert len(store) == 2 * len(ITEMS) + 1
