"""The HTTP service over real HTTP: ``mmfl serve`` in a subprocess on 127.0.0.1, driven with httpx."""
from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx
import pytest
from PIL import Image

from mmfl.serve.process import free_port
from search_helpers import ITEMS, make_served_index, start_server, stop_server

#: What the service logs per request (after uvicorn's level prefix): method, path, status, duration.
REQUEST_LINE = re.compile(r"^INFO:\s+(GET|POST) (\S+) (\d{3}) (\d+\.\d) ms$")


class Served(NamedTuple):
    base: str
    root: Path  # holds the gallery, the checkpoint and the index: no response may name anything under it
    log: Path  # the server's stdout and stderr

    @property
    def gallery(self) -> Path:
        return self.root / "gallery"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    index = make_served_index(root)
    proc, base = start_server(index, root / "server.log", "--max-upload-mb", "1")
    try:
        yield Served(base, root, root / "server.log")
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(served: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base, timeout=60) as c:
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
    photo = served.gallery / "id_04_shop_1.png"
    response = post_image(client, photo.read_bytes(), k=4)
    assert response.status_code == 200, response.text
    answer = response.json()
    first = answer["results"][0]
    assert first["item_id"] == "id_04" and first["image_url"] == "/items/id_04/image?n=1"
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert {"item_id", "score", "category", "attributes", "image_url"} <= set(first)
    assert len(answer["results"]) == 4 and answer["query"]["k"] == 4
    image = client.get(first["image_url"])
    assert image.status_code == 200 and image.content == photo.read_bytes()
    assert image.headers["content-type"] == "image/png"


def test_box_and_filters_are_applied(client: httpx.Client, served) -> None:
    data = (served.gallery / "id_03_shop_0.png").read_bytes()
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
    response = post_image(client, (served.gallery / "id_00_shop_0.png").read_bytes(), **form)
    assert response.status_code == status and words in response.json()["error"]


def test_junk_and_bombs_are_refused_with_json(client: httpx.Client) -> None:
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

    with httpx.Client(base_url=served.base, timeout=60) as fresh:
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


def test_undecodable_upload_names_the_upload_in_plain_words(client: httpx.Client) -> None:
    junk = post_image(client, b"this is not an image at all" * 10, name="junk.jpg")
    assert junk.status_code == 400
    assert junk.json()["error"] == ("uploaded image 'junk.jpg': cannot decode image "
                                    "(not a JPEG, PNG, WebP or other supported image format)")


class _Assets(HTMLParser):
    """Every URL an HTML page makes the browser load by itself (scripts, styles, images, icons)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "img": "src", "link": "href"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def test_api_docs_load_nothing_from_outside_the_machine(client: httpx.Client) -> None:
    html = client.get("/docs")
    assert html.status_code == 200
    assets = _Assets()
    assets.feed(html.text)
    assert assets.urls and all(url.startswith("/") and not url.startswith("//") for url in assets.urls), assets.urls
    assert "fonts.googleapis" not in html.text and "cdn." not in html.text
    for url in assets.urls:
        assert client.get(url).status_code == 200, url
    assert "/openapi.json" in html.text
    assert client.get("/redoc").status_code == 404  # ReDoc fetches its logo from outside: not served


def test_responses_carry_image_urls_never_server_paths(client: httpx.Client, served: Served) -> None:
    photo = (served.gallery / "id_06_shop_0.png").read_bytes()
    search = post_image(client, photo, k=8)
    assert search.status_code == 200
    for result in search.json()["results"]:
        assert "image" not in result and result["image_url"].startswith(f"/items/{result['item_id']}/image?n=")
    responses = [search, client.get("/healthz"), client.get("/facets"), client.get("/openapi.json"),
                 post_image(client, photo, bbox="90,90,99,99"), post_image(client, b"junk" * 40, name="x.png"),
                 client.get("/items/id_01/image?n=9"), client.get("/items/nope/image"), client.get("/nowhere")]
    roots = {str(served.root), str(served.root.resolve())}
    for response in responses:
        assert not any(root in response.text for root in roots), (response.request.url, response.text)


def test_each_request_is_logged_once_with_method_path_status_and_ms(client: httpx.Client, served: Served) -> None:
    photo = (served.gallery / "id_01_shop_0.png").read_bytes()
    # An earlier test's last line can still be on its way: count from the line of a marker request.
    assert client.get("/log-marker").status_code == 404
    deadline = time.monotonic() + 30
    while True:
        marked = [i for i, line in enumerate(served.log.read_text().splitlines())
                  if (m := REQUEST_LINE.match(line)) and m[2] == "/log-marker"]
        if marked:
            break
        assert time.monotonic() < deadline, "the marker request was never logged"
        time.sleep(0.1)
    done = marked[-1] + 1
    requests = [("GET", "/facets", 200, lambda: client.get("/facets")),
                ("POST", "/search", 200, lambda: post_image(client, photo, k=2)),
                ("POST", "/search", 400, lambda: post_image(client, b"junk" * 40, name="junk.png")),
                ("POST", "/search", 413, lambda: post_image(client, b"\0" * (1200 * 1024), name="big.png")),
                ("GET", "/items/log%20probe/image", 404, lambda: client.get("/items/log probe/image?n=0"))]
    for method, path, status, send in requests:
        assert send().status_code == status
    deadline = time.monotonic() + 30  # the line is written as the response ends; give the server a moment
    while True:
        lines = served.log.read_text().splitlines()[done:]
        if len(lines) >= len(requests) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    parsed = [REQUEST_LINE.match(line) for line in lines]
    assert all(parsed) and len(lines) == len(requests), lines  # one line each: uvicorn's access log is off
    assert [(m[1], m[2], int(m[3])) for m in parsed] == [(m, p, s) for m, p, s, _ in requests]


def test_server_is_warmed_up_before_it_answers(client: httpx.Client, served: Served) -> None:
    health = client.get("/healthz").json()
    assert health["warmup_ms"] > 0
    assert re.search(r"warmed up with one search in \d+ ms", served.log.read_text())


def test_onnx_session_is_warmed_up_before_the_first_request(tmp_path: Path) -> None:
    from mmfl.checkpoint import load_model
    from mmfl.export import export_onnx

    index = make_served_index(tmp_path)
    graph = tmp_path / "model.onnx"
    export_onnx(load_model(tmp_path / "model.pt"), graph, 64)
    proc, base = start_server(index, tmp_path / "server.log", "--onnx", str(graph))
    try:
        health = httpx.get(f"{base}/healthz", timeout=30).json()
    finally:
        stop_server(proc)
    assert health["runtime"] == "onnxruntime" and health["warmup_ms"] > 0


@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_upload_mb_below_one_is_refused_before_anything_starts(tmp_path: Path, value: str) -> None:
    port = free_port()
    # A missing index: had the flag been checked after loading, the error would be about the index.
    done = subprocess.run([sys.executable, "-m", "mmfl.cli", "serve", str(tmp_path / "no-index"), "--port", str(port),
                           "--max-upload-mb", value], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: --max-upload-mb {value}: must be at least 1\n"
