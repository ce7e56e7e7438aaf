"""The search page in a real headless Chromium (Debian's, driven by Playwright's Python package)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from box_helpers import boxed_index
from search_helpers import make_served_index, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CARD_IMAGES_LOADED = "() => [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does this)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("web")
    index = make_served_index(root)
    proc, base = start_server(index, root / "server.log")
    try:
        yield base, root / "gallery"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_tab(browser, url: str, **context: object) -> tuple[object, list[str], list[str]]:
    """A tab on ``url`` in a fresh context, its uncaught script errors, and every request to another host.

    Requests to any host but the server's are recorded and aborted, as on a machine with no
    outside network: a page that needs one shows up as a broken page and a non-empty list.
    """
    tab = browser.new_context(**context).new_page()
    errors: list[str] = []
    outside: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))

    def route(handle) -> None:
        if urlsplit(handle.request.url).hostname == "127.0.0.1" or handle.request.url.startswith(("data:", "blob:")):
            handle.continue_()
        else:
            outside.append(handle.request.url)
            handle.abort()

    tab.route("**/*", route)
    tab.goto(url)
    return tab, errors, outside


@pytest.fixture(scope="module")
def page(site, browser):
    tab, errors, outside = open_tab(browser, site[0] + "/", viewport={"width": 1100, "height": 720})
    yield tab
    assert errors == [] and outside == []


def test_upload_shows_result_cards(page, site, tmp_path: Path) -> None:
    url = page.url
    page.set_input_files("#file", str(site[1] / "id_05_shop_0.png"))
    page.wait_for_selector(".card")
    cards = page.locator(".card")
    assert cards.count() == 8  # every item of the gallery (k=20 > 8 items), one card each
    first = cards.first
    assert first.get_attribute("data-item-id") == "id_05"
    assert "id_05" in first.inner_text() and "1.000" in first.inner_text()
    page.wait_for_function(CARD_IMAGES_LOADED)
    assert "8 items" in page.inner_text("#status")
    assert page.url == url  # no reload
    page.screenshot(path=str(tmp_path / "results.png"))


def test_box_and_category_filter_update_results_in_place(page, site) -> None:
    page.set_input_files("#file", str(site[1] / "id_02_shop_1.png"))
    page.wait_for_function("() => document.querySelector('.card')?.dataset.itemId === 'id_02'")
    box = page.locator("#preview").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.7, steps=5)
    page.mouse.up()
    page.wait_for_function("() => document.querySelector('#query').textContent.includes('box:')")
    page.select_option("#category", "top")
    page.wait_for_function("() => document.querySelectorAll('.card').length === 4")
    categories = page.locator(".card .category").all_inner_texts()
    assert categories == ["top"] * 4
    assert not page.is_disabled("#clear-box")


def test_api_docs_render_offline(browser, site) -> None:
    tab, errors, outside = open_tab(browser, site[0] + "/docs")
    tab.wait_for_selector(".opblock-summary-path[data-path='/search']")
    tab.wait_for_load_state("networkidle")
    assert outside == [] and errors == []
    assert "/healthz" in tab.inner_text("body")


def test_undecodable_upload_is_shown_as_an_error(page) -> None:
    page.set_input_files("#file", {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"shopping list\n" * 30})
    alert = page.wait_for_selector("#results [role=alert]")
    assert alert.inner_text() == ("uploaded image 'notes.jpg': cannot decode image "
                                  "(not a JPEG, PNG, WebP or other supported image format)")
    assert "No matching items" not in page.inner_text("#results") and page.locator(".card").count() == 0
    assert alert.evaluate("e => getComputedStyle(e).color") == "rgb(180, 35, 24)"


def test_page_fits_a_phone_and_explains_box_and_score(browser, site, tmp_path: Path) -> None:
    tab, errors, outside = open_tab(browser, site[0] + "/", viewport={"width": 390, "height": 844},
                                    device_scale_factor=2, is_mobile=True, has_touch=True)
    help_text = tab.inner_text("aside")
    assert "box around the garment" in help_text and "cosine similarity" in help_text
    tab.set_input_files("#file", str(site[1] / "id_03_shop_0.png"))
    tab.wait_for_function("() => document.querySelector('.card')?.dataset.itemId === 'id_03'")
    box = tab.locator("#preview").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    tab.mouse.move(box["x"] + 4, box["y"] + 4)
    tab.mouse.down()
    tab.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7, steps=4)
    tab.mouse.up()
    tab.wait_for_function("() => document.querySelector('#query').textContent.includes('box:')")
    tab.wait_for_function(CARD_IMAGES_LOADED)
    assert tab.evaluate("() => document.scrollingElement.scrollWidth") <= 390
    for card in tab.locator(".card").all():
        left, width = card.bounding_box()["x"], card.bounding_box()["width"]
        assert left >= 0 and left + width <= 390 and width >= 150
    score = tab.locator(".card .score").first
    assert score.bounding_box()["width"] > 0 and "cosine similarity" in score.get_attribute("title")
    tab.screenshot(path=str(tmp_path / "page-phone.png"), full_page=True)
    assert errors == [] and outside == []


@pytest.fixture(scope="module")
def boxed_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server over an index whose checkpoint has a box head, and a consumer photo of an indexed item."""
    built = boxed_index(tmp_path_factory)
    proc, base = start_server(built.index, built.root / "web-server.log")
    try:
        yield base, built.consumer_photos()[0]
    finally:
        stop_server(proc)


def test_detected_boxes_are_drawn_and_a_click_searches_that_garment(browser, boxed_site) -> None:
    """Upload: the page draws the detected garments (the best one searched); a click inside another box
    searches that box, and the cards are its results."""
    base, photo = boxed_site
    tab, errors, outside = open_tab(browser, base + "/", viewport={"width": 1100, "height": 720})
    with tab.expect_response(lambda r: r.url.endswith("/search")) as first:
        tab.set_input_files("#file", str(photo))
    answer = first.value.json()
    detections = answer["query"]["detections"]
    assert answer["query"]["box_source"] == "predicted" and detections
    tab.wait_for_function(f"() => document.querySelector('#preview').dataset.detections === '{len(detections)}'")
    tab.wait_for_selector(".card")
    assert f"({answer['query']['box_reason']})" in tab.inner_text("#query")
    assert tab.locator("#garments button.garment").count() == len(detections)
    scale = tab.evaluate("() => document.querySelector('#preview').width") / answer["query"]["width"]
    x1, y1 = detections[-1]["box"][:2]  # drawn last: its numbered label is on top
    label_pixel = tab.evaluate(f"() => [...document.querySelector('#preview').getContext('2d')"
                               f".getImageData({x1 * scale + 2:.0f}, {y1 * scale + 13:.0f}, 1, 1).data]")
    assert label_pixel == [37, 99, 235, 255]

    def area(d: dict) -> int:
        return (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1])

    chosen = min(range(len(detections)), key=lambda i: area(detections[i]))  # a click at its centre picks it
    bx1, by1, bx2, by2 = detections[chosen]["box"]
    canvas = tab.locator("#preview").bounding_box()
    css = canvas["width"] / answer["query"]["width"]
    with tab.expect_response(lambda r: r.url.endswith("/search")) as second:
        tab.mouse.click(canvas["x"] + (bx1 + bx2) / 2 * css, canvas["y"] + (by1 + by2) / 2 * css)
    picked = second.value.json()
    assert picked["query"]["bbox"] == detections[chosen]["box"] and picked["query"]["box_source"] == "user"
    tab.wait_for_function(f"() => document.querySelector('#query').textContent.includes('garment {chosen + 1}, box:')")
    shown = tab.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.itemId)")
    assert shown == [r["item_id"] for r in picked["results"]]
    assert tab.locator("#garments button.garment").nth(chosen).get_attribute("aria-pressed") == "true"
    assert tab.evaluate("() => document.querySelector('#preview').dataset.detections") == str(len(detections))
    assert errors == [] and outside == []
