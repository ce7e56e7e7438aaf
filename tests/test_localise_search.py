"""Searching with the predicted garment box (issue 16): which box a search uses and what it says, through
``mmfl.Catalog``, ``mmfl search`` (real FAISS), ``mmfl serve`` over real HTTP, and ONNX Runtime.

The checkpoint is barely trained (tests/box_helpers.py): these tests check the wiring (the
predicted box is the one searched, the user's box wins, the whole photo when asked or when
nothing is found, boxes inside the photo), not the boxes' accuracy (tests/test_localise.py).
"""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from mmfl import Catalog, Retriever
from mmfl.checkpoint import load_model
from mmfl.cli import main
from mmfl.errors import DataError, MMFLError
from mmfl.export import box_graph_path, export_box_onnx

from box_helpers import MIN_SCORE, BoxedIndex, boxed_index
from search_helpers import start_server, stop_server


@pytest.fixture(scope="module")
def boxed(tmp_path_factory: pytest.TempPathFactory) -> BoxedIndex:
    return boxed_index(tmp_path_factory)


@pytest.fixture(scope="module")
def catalog(boxed: BoxedIndex) -> Iterator[Catalog]:
    with Catalog.open(boxed.index) as opened:
        yield opened


@pytest.fixture(scope="module")
def photo(boxed: BoxedIndex) -> Path:
    return boxed.consumer_photos()[0]


def without_time(answer: dict) -> dict:
    return {**answer, "query": {k: v for k, v in answer["query"].items() if k != "took_ms"}}


def test_search_without_a_box_uses_the_predicted_one(catalog: Catalog, photo: Path,
                                                      capsys: pytest.CaptureFixture[str], boxed: BoxedIndex) -> None:
    """The box searched is the best detection, and the results are those of searching that box by hand;
    ``mmfl search`` answers the same and prints which box it used."""
    assert catalog.has_box_head
    answer = catalog.search(photo, k=5)
    q = answer["query"]
    assert q["box_source"] == "predicted" and q["detections"], q
    best = q["detections"][0]
    assert q["bbox"] == best["box"] and q["bbox"] != [0, 0, q["width"], q["height"]]
    assert q["box_reason"] == f"predicted {best['category']} box (score {best['score']:.2f})"
    assert all(d["score"] >= MIN_SCORE for d in q["detections"])
    by_hand = catalog.search(photo, k=5, box=tuple(q["bbox"]))
    assert by_hand["results"] == answer["results"]
    assert by_hand["query"]["box_source"] == "user" and by_hand["query"]["detections"] == []
    assert [d.box for d in catalog.detect(photo)] == [tuple(d["box"]) for d in q["detections"]]

    capsys.readouterr()
    assert main(["search", str(boxed.index), str(photo), "--json", "--top-k", "5"]) == 0
    assert without_time(json.loads(capsys.readouterr().out)) == without_time(answer)
    assert main(["search", str(boxed.index), str(photo), "--top-k", "5"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith(f"query 96x96 box {','.join(map(str, q['bbox']))} [predicted: {q['box_reason']}] ({len(answer['results'])} items")


_OPENS: dict[str, int] = {}


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]) in _OPENS:
        _OPENS[str(args[0])] += 1


sys.addaudithook(_count_opens)  # Python's audit event for every open() of a file: how often a photo is read


def opens_of(photo: Path, call: Callable[[], object]) -> int:
    """How many times ``call`` opens the file ``photo``."""
    _OPENS[str(photo)] = 0
    try:
        call()
        return _OPENS[str(photo)]
    finally:
        del _OPENS[str(photo)]


def test_a_search_reads_and_decodes_the_photo_once(catalog: Catalog, photo: Path) -> None:
    """The box head's detection and the embedding of its box read one decode of the photo (they decoded it
    once each before), whichever box is searched; the results are those of the predicted box given by hand."""
    answers = []
    assert opens_of(photo, lambda: answers.append(catalog.search(photo, k=5))) == 1
    assert answers[0]["query"]["box_source"] == "predicted"
    assert opens_of(photo, lambda: catalog.search_garments(photo, k=2)) == 1
    assert opens_of(photo, lambda: catalog.search(photo, k=2, whole_image=True)) == 1
    assert opens_of(photo, lambda: catalog.search(photo, k=2, box=(5, 5, 60, 70))) == 1
    assert opens_of(photo, lambda: catalog.search_many([photo, photo], k=2)) == 2
    by_hand = catalog.search(photo, k=5, box=tuple(answers[0]["query"]["bbox"]))
    assert by_hand["results"] == answers[0]["results"]


def test_whole_image_turns_the_predicted_box_off(catalog: Catalog, photo: Path, boxed: BoxedIndex,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    whole = catalog.search(photo, k=5, whole_image=True)
    q = whole["query"]
    assert (q["bbox"], q["box_source"], q["box_reason"], q["detections"]) == (None, "whole", "whole image asked for", [])
    assert catalog.search(photo, k=5, box=(0, 0, 96, 96))["results"] == whole["results"]
    capsys.readouterr()
    assert main(["search", str(boxed.index), str(photo), "--whole-image", "--top-k", "3"]) == 0
    assert capsys.readouterr().out.startswith("query 96x96 whole [whole: whole image asked for] (3 items")
    with pytest.raises(MMFLError, match="whole_image: expected True or False"):
        catalog.search(photo, whole_image="yes")


def test_a_box_given_by_the_user_always_wins(catalog: Catalog, photo: Path) -> None:
    for whole_image in (False, True):
        q = catalog.search(photo, k=3, box=(10, 20, 200, 300), whole_image=whole_image)["query"]
        assert q["bbox"] == [10, 20, 96, 96]  # clamped to the photo
        assert (q["box_source"], q["box_reason"], q["detections"]) == ("user", "box given by the user", [])
    with pytest.raises(DataError, match="no area") as err:
        catalog.search(photo, box=(120, 120, 150, 150))
    assert "\n" not in str(err.value)


def test_nothing_found_searches_the_whole_photo_and_says_so(boxed: BoxedIndex, photo: Path, catalog: Catalog,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with Catalog.open(boxed.index, min_score=1.0) as strict:
        q = strict.search(photo, k=5)["query"]
        assert q["bbox"] is None and q["box_source"] == "whole" and q["detections"] == []
        assert q["box_reason"].startswith("no garment found (best score ")
        assert q["box_reason"].endswith(", below 1.00): searched the whole photo")
        assert strict.search(photo, k=5)["results"] == catalog.search(photo, k=5, whole_image=True)["results"]
        garments = strict.search_garments(photo, k=2)
        assert [g["box_source"] for g in garments["garments"]] == ["whole"]
    with pytest.raises(MMFLError, match=r"min_score=1\.5: must be a number in \[0, 1\]"):
        Catalog.open(boxed.index, min_score=1.5)
    capsys.readouterr()
    assert main(["search", str(boxed.index), str(photo), "--min-score", "1", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.startswith("query 96x96 whole [whole: no garment found (best score ")
    assert main(["search", str(boxed.index), str(photo), "--min-score", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min_score=2.0: must be a number in [0, 1]" in err


def test_predicted_boxes_lie_inside_the_photo(catalog: Catalog, photo: Path) -> None:
    """A wide photo 3.1x the training size, and one stored sideways with an EXIF turn: every box lies
    inside the upright photo, and the turned photo's boxes are the upright one's."""
    image = Image.open(photo).convert("RGB").resize((300, 180))
    upright = catalog.detect(image, min_score=0.0)
    assert upright and all(0 <= d.box[0] < d.box[2] <= 300 and 0 <= d.box[1] < d.box[3] <= 180 for d in upright)
    sideways = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored turned a quarter the other way
    image.rotate(90, expand=True).save(sideways, format="PNG", exif=exif)
    turned = catalog.detect(sideways.getvalue(), min_score=0.0)
    assert [d.box for d in turned] == [d.box for d in upright]
    q = catalog.search(sideways.getvalue(), k=1)["query"]
    assert (q["width"], q["height"]) == (300, 180)


def test_garments_mode_searches_each_detection(catalog: Catalog, photo: Path) -> None:
    answer = catalog.search_garments(photo, k=3)
    detections = answer["query"]["detections"]
    assert len(answer["garments"]) == len(detections) >= 1
    for garment, detection in zip(answer["garments"], detections):
        assert garment["box"] == detection["box"] and garment["box_source"] == "predicted"
        assert garment["results"] == catalog.search(photo, k=3, box=tuple(garment["box"]))["results"]
    assert answer["results"] == answer["garments"][0]["results"]


def test_service_searches_the_predicted_box(boxed: BoxedIndex, photo: Path, catalog: Catalog,
                                            tmp_path: Path) -> None:
    """``POST /search`` on a real server: the predicted box by default, ``whole_image``, ``garments=all``."""
    proc, base = start_server(boxed.index, tmp_path / "server.log")
    try:
        def post(**data: str) -> httpx.Response:
            return httpx.post(f"{base}/search", files={"image": ("photo.jpg", photo.read_bytes(), "image/jpeg")},
                              data={"k": "3", **data}, timeout=60)

        assert httpx.get(f"{base}/healthz").json()["box_head"] is True
        found = post().json()
        expected = catalog.search(photo, k=3)
        assert {k: found["query"][k] for k in ("bbox", "box_source", "box_reason")} == \
               {k: expected["query"][k] for k in ("bbox", "box_source", "box_reason")}
        # the server is another process (its own thread pool): the same boxes, scores equal to float32 rounding
        assert [(d["box"], d["category"]) for d in found["query"]["detections"]] == \
               [(d["box"], d["category"]) for d in expected["query"]["detections"]]
        for got, want in zip(found["query"]["detections"], expected["query"]["detections"]):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert got["category_score"] == pytest.approx(want["category_score"], abs=1e-5)
        assert [r["item_id"] for r in found["results"]] == [r["item_id"] for r in expected["results"]]
        whole = post(whole_image="true").json()["query"]
        assert (whole["bbox"], whole["box_source"], whole["box_reason"]) == (None, "whole", "whole image asked for")
        user = post(bbox="5,5,60,70", whole_image="false").json()["query"]
        assert (user["bbox"], user["box_source"]) == ([5, 5, 60, 70], "user")
        per = post(garments="all").json()
        assert [g["box"] for g in per["garments"]] == [d["box"] for d in expected["query"]["detections"]]
        assert all(r["image_url"].startswith("/items/") for g in per["garments"] for r in g["results"])
        refused = post(garments="all", bbox="5,5,60,70")
        assert refused.status_code == 400 and "leave out bbox" in refused.json()["error"]
        assert post(garments="some").status_code == 422
        batch = httpx.post(f"{base}/search/batch", data={"k": "2", "whole_image": "true"}, timeout=60,
                           files=[("image", ("a.jpg", photo.read_bytes(), "image/jpeg"))] * 2).json()
        assert [a["query"]["box_source"] for a in batch["answers"]] == ["whole", "whole"]
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def exported(boxed: BoxedIndex, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(boxed.checkpoint), "--onnx", str(out)]) == 0
    assert out.with_name("model.boxes.onnx").is_file()
    return out


def test_onnx_catalog_uses_the_exported_box_graph(boxed: BoxedIndex, exported: Path, photo: Path,
                                                  catalog: Catalog, tmp_path: Path) -> None:
    """``serve --onnx`` / ``search --onnx`` open the catalogue this way: the box graph beside the
    embedding graph predicts the box; without it, the whole photo, and the reason names the file."""
    reference = catalog.search(photo, k=3)["query"]
    with Catalog.open(boxed.index, onnx=exported) as onnx:
        assert onnx.has_box_head
        q = onnx.search(photo, k=3)["query"]
        assert q["box_source"] == "predicted" and q["box_reason"].split(" box")[0] == reference["box_reason"].split(" box")[0]
        assert all(abs(a - b) <= 1 for a, b in zip(q["bbox"], reference["bbox"]))  # ONNX Runtime's float32, rounded
    alone = tmp_path / "model.onnx"
    shutil.copy(exported, alone)
    with Catalog.open(boxed.index, onnx=alone) as onnx:
        q = onnx.search(photo, k=3)["query"]
        assert (q["box_source"], q["box_reason"]) == (
            "whole", "model has no box head (no box graph model.boxes.onnx beside the ONNX file)")
    other = load_model(boxed.checkpoint)  # a box graph claiming other weights beside the embedding graph
    other.meta["checkpoint_sha256"] = "0" * 64
    export_box_onnx(other, box_graph_path(alone), 96, max_boxes=4)
    with pytest.raises(MMFLError, match=r"model\.boxes\.onnx: exported from another checkpoint") as err:
        Catalog.open(boxed.index, onnx=alone)
    assert "\n" not in str(err.value)


def test_onnx_retriever_predicts_the_checkpoints_boxes(boxed: BoxedIndex, exported: Path) -> None:
    """``Retriever.load(model.onnx)`` with the box graph beside it detects as the checkpoint does (boxes to a
    pixel, scores to 1e-4, same categories) and embeds each predicted box alike."""
    photos = boxed.consumer_photos()[:4]
    torch_side, onnx_side = Retriever.load(boxed.checkpoint), Retriever.load(exported)
    assert torch_side.has_box_head and onnx_side.has_box_head
    found, want = onnx_side.detect(photos, min_score=0.0), torch_side.detect(photos, min_score=0.0)
    assert [len(f) for f in found] == [len(w) for w in want] and all(found)
    for got, ref in zip((d for f in found for d in f), (d for w in want for d in w)):
        assert got.category == ref.category and abs(got.score - ref.score) < 1e-4
        assert max(abs(a - b) for a, b in zip(got.box, ref.box)) <= 1
    boxes = [w[0].box for w in want]
    assert float(np.abs(onnx_side.embed(photos, boxes) - torch_side.embed(photos, boxes)).max()) < 1e-4
    assert [len(f) for f in torch_side.detect(photos)] == [len([d for d in w if d.score >= MIN_SCORE]) for w in want]


def test_onnx_server_uses_the_box_graph(boxed: BoxedIndex, exported: Path, photo: Path, tmp_path: Path) -> None:
    proc, base = start_server(boxed.index, tmp_path / "server.log", "--onnx", str(exported))
    try:
        health = httpx.get(f"{base}/healthz").json()
        assert (health["runtime"], health["box_head"]) == ("onnxruntime", True)
        answer = httpx.post(f"{base}/search", files={"image": ("p.jpg", photo.read_bytes(), "image/jpeg")},
                            data={"k": "2"}, timeout=60).json()
        assert answer["query"]["box_source"] == "predicted" and answer["query"]["detections"]
    finally:
        stop_server(proc)
