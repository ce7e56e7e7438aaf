"""`POST /search` against every hostile photo, in process (FastAPI's TestClient).

tests/test_serve.py drives a real ``mmfl serve`` over HTTP (junk, bombs, 413s, traversal) and
bench/load.py hammers one with concurrent clients; here the same upload matrix as the CLI runs
against the app: a refused photo is a 400 with a one-line JSON error naming the upload, an
unusual but valid one is searched upright.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from .factory import IMAGE_CASES, H, W, ImageCase, exif_rotated


@pytest.fixture(scope="module")
def client(index: Path) -> Iterator[TestClient]:
    from mmfl.serve.app import create_app

    with TestClient(create_app(index, max_upload_mb=1)) as c:
        yield c


@pytest.mark.parametrize("case", [c for c in IMAGE_CASES if c.name != "missing"], ids=lambda c: c.name)
def test_hostile_upload(case: ImageCase, client: TestClient) -> None:
    name = f"photo ü ß {case.name}{case.suffix}"
    response = client.post("/search", files={"image": (name, case.make(1), "application/octet-stream")},
                           data={"k": "3"})
    body = response.json()
    if case.accepted:
        assert response.status_code == 200, body
        assert (body["query"]["width"], body["query"]["height"]) == (W, H) and len(body["results"]) == 3
        return
    assert response.status_code == 400, body
    error = body["error"]
    assert "\n" not in error and "Traceback" not in error and "<_io." not in error  # no Python object in the words
    if case.name == "zero-byte":
        assert error == "uploaded image is empty"
    else:
        assert error.startswith(f"uploaded image '{name}': ") and case.decode in error, error


def test_exif_rotated_upload_finds_its_item(client: TestClient) -> None:
    response = client.post("/search", files={"image": ("turned.jpg", exif_rotated(1, 8), "image/jpeg")},
                           data={"k": "1"})
    assert response.status_code == 200 and response.json()["results"][0]["item_id"] == "it1"


def test_upload_without_an_image_and_with_a_bad_box(client: TestClient) -> None:
    missing = client.post("/search", data={"k": "3"})
    assert missing.status_code == 422 and "image" in missing.json()["error"]
    bad_box = client.post("/search", files={"image": ("p.png", exif_rotated(0, 6), "image/jpeg")},
                          data={"bbox": "40,40,90,90"})
    assert bad_box.status_code == 400 and "no area" in bad_box.json()["error"]
