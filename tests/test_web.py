"""The search page in a real headless Chromium (Debian's, driven by Playwright's Python package)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from search_helpers import make_served_index, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

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
def page(site):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 720})
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(site[0] + "/")
            yield tab
            assert errors == []
        finally:
            browser.close()


def test_upload_shows_result_cards(page, site, tmp_path: Path) -> None:
    url = page.url
    page.set_input_files("#file", str(site[1] / "id_05_shop_0.png"))
    page.wait_for_selector(".card")
    cards = page.locator(".card")
    assert cards.count() == 8  # every item of the gallery (k=20 > 8 items), one card each
    first = cards.first
    assert first.get_attribute("data-item-id") == "id_05"
    assert "id_05" in first.inner_text() and "1.000" in first.inner_text()
    page.wait_for_function("() => [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
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
