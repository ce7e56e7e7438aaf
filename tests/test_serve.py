"""The HTTP service over real HTTP: ``mmfl serve`` in a subprocess on 127.0.0.1, driven with httpx."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image

from search_helpers import ITEMS, make_served_index, start_server, stop_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("serve")
    index = make_served_index(root)
    proc, base = start_server(index, root / "server.log", "--max-upload-mb", "1")
    try:
        yield base, root / "gallery"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(served: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


def post_image(client: httpx.Client, data: bytes, name: str = "photo.png", **form: object) -> httpx.Response:
    return client.post("/search", files={"image": (name, data, "application/octet-stream")}, data=form)


def test_health_and_docs(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["count"] == 2 * len(ITEMS) and health["backend"] == "faiss"
    assert client.get("/docs").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert client.get("/facets").json()["categories"] == {"dress": len(ITEMS), "top": len(ITEMS)}
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and client.get("/static/app.js").status_code == 200


def test_search_returns_the_photographed_item_and_serves_its_image(client: httpx.Client, served) -> None:
    gallery = served[1]
    photo = gallery / "id_04_shop_1.png"
    response = post_image(client, photo.read_bytes(), k=4)
    assert response.status_code == 200, response.text
    answer = response.json()
    first = answer["results"][0]
    assert first["item_id"] == "id_04" and first["image"] == str(photo.resolve())
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(first) == {"item_id", "image", "score", "category", "attributes", "image_url"}
    assert len(answer["results"]) == 4 and answer["query"]["k"] == 4
    image = client.get(first["image_url"])
    assert image.status_code == 200 and image.content == photo.read_bytes()
    assert image.headers["content-type"] == "image/png"


def test_box_and_filters_are_applied(client: httpx.Client, served) -> None:
    data = (served[1] / "id_03_shop_0.png").read_bytes()
    response = client.post("/search", files={"image": ("p.png", data, "image/png")},
                           data={"bbox": "2,2,40,40", "k": "10", "filter": ["category=dress"]})
    answer = response.json()
    assert response.status_code == 200, answer
    assert answer["query"]["bbox"] == [2, 2, 40, 40] and answer["query"]["filters"] == ["category=dress"]
    assert {r["category"] for r in answer["results"]} == {"dress"} and len(answer["results"]) == len(ITEMS) // 2


@pytest.mark.parametrize("form, status, words", [
    ({"bbox": "1,2,3"}, 400, "x1,y1,x2,y2"),
    ({"bbox": "60,60,90,90"}, 400, "no area"),
    ({"filter": "size=xl"}, 400, "unknown key"),
    ({"k": "0"}, 422, "k"),
])
def test_bad_parameters_are_json_errors(client: httpx.Client, served, form: dict, status: int, words: str) -> None:
    response = post_image(client, (served[1] / "id_00_shop_0.png").read_bytes(), **form)
    assert response.status_code == status and words in response.json()["error"]


def test_junk_and_bombs_are_refused_with_json(client: httpx.Client) -> None:
    junk = post_image(client, b"this is not an image at all" * 10, name="junk.jpg")
    assert junk.status_code == 400 and "cannot decode" in junk.json()["error"]
    bomb = io.BytesIO()
    Image.new("1", (9000, 8000)).save(bomb, format="PNG")  # 72 Mpx in a few KB
    assert len(bomb.getvalue()) < 100_000
    response = post_image(client, bomb.getvalue(), name="bomb.png")
    assert response.status_code == 400 and "pixel limit" in response.json()["error"]
    assert post_image(client, b"", name="empty.png").status_code == 400
    missing = client.post("/search", data={"k": "3"})
    assert missing.status_code == 422 and "image" in missing.json()["error"]


def test_oversized_uploads_get_413(client: httpx.Client, served) -> None:
    big = b"\0" * (1024 * 1024 + 100 * 1024)  # over the 1 MiB limit the server runs with
    declared = post_image(client, big, name="big.png")
    assert declared.status_code == 413 and "MiB" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count what arrives
        for _ in range(20):
            yield b"\0" * (128 * 1024)

    with httpx.Client(base_url=served[0], timeout=60) as fresh:
        streamed = fresh.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413 and "error" in streamed.json()


@pytest.mark.parametrize("path", [
    "/items/..%2F..%2F..%2Fetc%2Fpasswd/image",
    "/items/%2E%2E/image",
    "/items/no-such-item/image",
    "/items/id_01/image?n=7",
    "/items/id_01/..%2F..%2Fetc%2Fpasswd",
])
def test_item_images_cannot_escape_the_gallery(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "root:" not in response.text and "error" in response.json()
