"""The live catalogue: item endpoints of a real ``mmfl serve`` (token off / wrong / right), batch search,
searches running during updates, SIGKILLed updates, and Milvus Lite.

Searches during updates are checked by what they may see, not by timing: a search that started
after a DELETE returned (and before the next add began) must not return the item, one that started
after an add returned (and ended before the next DELETE began) must return it, and whenever the
item is returned it is returned whole (both of its photos are in: the photographed one scores 1).
"""
from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx
import numpy as np
import pytest

from mmfl import Catalog
from mmfl.checkpoint import load_model
from mmfl.data.formats import read_dataset
from mmfl.data.records import Record
from mmfl.index import Entry, build_index, open_store, read_manifest

from search_helpers import ITEMS, draw_item, make_served_index, start_server, stop_server

TOKEN = "test-token-0123456789abcdef"
LIVE_ITEM = "live_item"


class Live(NamedTuple):
    base: str  # a server with --admin-token TOKEN
    plain: str  # the same index served without a token
    root: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    index = make_served_index(root)
    plain_index = root / "plain-index"
    plain_index.mkdir()
    for path in index.iterdir():
        (plain_index / path.name).write_bytes(path.read_bytes())
    proc, base = start_server(index, root / "server.log", "--admin-token", TOKEN)
    try:
        plain_proc, plain = start_server(plain_index, root / "plain.log")
        try:
            yield Live(base, plain, root)
        finally:
            stop_server(plain_proc)
    finally:
        stop_server(proc)


def png(item: str, variant: int) -> bytes:
    buffer = io.BytesIO()
    draw_item(item, variant).save(buffer, format="PNG")
    return buffer.getvalue()


#: The new item's two photos: a look-alike of id_06 drawn at variants no gallery photo uses.
PHOTO_A, PHOTO_B = png("id_06", 5), png("id_06", 7)


def add_live_item(client: httpx.Client, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/items", headers=headers, data={"item_id": LIVE_ITEM, "category": "top", "attribute": ["denim"]},
                       files=[("photo", ("a.png", PHOTO_A, "image/png")), ("photo", ("b.png", PHOTO_B, "image/png"))])


def delete_live_item(client: httpx.Client, token: str | None = TOKEN) -> httpx.Response:
    return client.delete(f"/items/{LIVE_ITEM}", headers={"Authorization": f"Bearer {token}"} if token else {})


def top(client: httpx.Client, photo: bytes, k: int = 3) -> list[dict]:
    response = client.post("/search", files={"image": ("q.png", photo, "image/png")}, data={"k": k})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_item_endpoints_are_off_without_a_token(live: Live) -> None:
    with httpx.Client(base_url=live.plain, timeout=60) as client:
        for response in (add_live_item(client), delete_live_item(client, None)):
            assert response.status_code == 403 and "item updates are off" in response.json()["error"]
        assert client.get("/healthz").json()["item_updates"] is False
        assert all(r["item_id"] != LIVE_ITEM for r in top(client, PHOTO_A))


def test_item_endpoints_need_the_right_token(live: Live) -> None:
    with httpx.Client(base_url=live.base, timeout=60) as client:
        count = client.get("/healthz").json()["count"]
        for token in (None, "wrong-token-0123456789abcdef", TOKEN + "x"):
            for response in (add_live_item(client, token), delete_live_item(client, token)):
                assert response.status_code == 401, response.text
                assert response.headers["www-authenticate"] == "Bearer"
                assert "admin token" in response.json()["error"]
        assert client.get("/healthz").json()["count"] == count
        added = add_live_item(client)
        assert added.status_code == 200, added.text
        assert added.json() == {"item_id": LIVE_ITEM, "added": 2, "already_indexed": 0, "count": count + 2}
        first = top(client, PHOTO_B)[0]
        assert first["item_id"] == LIVE_ITEM and first["score"] == pytest.approx(1.0, abs=1e-4)
        assert first["attributes"] == ["denim"] and "image" not in first
        assert client.get(first["image_url"]).content == PHOTO_B
        assert client.get("/facets").json()["attributes"]["denim"] == 2
        gone = delete_live_item(client)
        assert gone.status_code == 200 and gone.json() == {"item_id": LIVE_ITEM, "removed": True, "count": count}
        assert all(r["item_id"] != LIVE_ITEM for r in top(client, PHOTO_B, k=len(ITEMS)))
        assert "denim" not in client.get("/facets").json()["attributes"]
        assert delete_live_item(client).status_code == 404
        bad = client.post("/items", headers={"Authorization": f"Bearer {TOKEN}"}, data={"item_id": "x"},
                          files={"photo": ("junk.png", b"not an image", "image/png")})
        assert bad.status_code == 400 and bad.json()["error"].startswith("uploaded image 'junk.png': ")


def test_an_item_id_holding_a_slash_is_deleted_over_http(live: Live) -> None:
    """A folder dataset's ids look like ``dresses/sku-1``: DELETE takes the id URL-encoded (``%2F``, as every
    ``image_url`` carries it) or with the raw slash; other methods on such paths stay 404."""
    slashed = "dresses/sku-1"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=live.base, timeout=60) as client:
        count = client.get("/healthz").json()["count"]
        for path in ("/items/dresses%2Fsku-1", "/items/dresses/sku-1"):
            added = client.post("/items", headers=auth, data={"item_id": slashed},
                                files={"photo": ("a.png", PHOTO_A, "image/png")})
            assert added.status_code == 200 and added.json()["count"] == count + 1, added.text
            first = top(client, PHOTO_A)[0]
            assert first["item_id"] == slashed and first["image_url"] == "/items/dresses%2Fsku-1/image?n=0"
            assert client.get(first["image_url"]).content == PHOTO_A
            gone = client.delete(path, headers=auth)
            assert gone.status_code == 200, gone.text
            assert gone.json() == {"item_id": slashed, "removed": True, "count": count}
            assert all(r["item_id"] != slashed for r in top(client, PHOTO_A, k=len(ITEMS)))
        again = client.delete("/items/dresses%2Fsku-1", headers=auth)
        assert again.status_code == 404 and again.json()["error"] == "item 'dresses/sku-1' is not in the catalogue"
        assert client.delete("/items/dresses%2Fsku-1").status_code == 401
        assert client.get("/items/dresses%2Fsku-1").status_code == 404
        assert client.get("/items/id_01/anything").status_code == 404


def test_batch_search_answers_each_photo(live: Live) -> None:
    gallery = live.root / "gallery"
    names = ["id_01_consumer_2.png", "id_04_shop_1.png", "id_07_consumer_2.png"]
    files = [("image", (n, (gallery / n).read_bytes(), "image/png")) for n in names]
    with httpx.Client(base_url=live.base, timeout=60) as client:
        response = client.post("/search/batch", files=files, data={"k": 2, "bbox": ["", "4,4,40,40", ""]})
        assert response.status_code == 200, response.text
        answers = response.json()["answers"]
        assert [a["results"][0]["item_id"] for a in answers] == ["id_01", "id_04", "id_07"]
        assert answers[1]["query"]["bbox"] == [4, 4, 40, 40] and all(len(a["results"]) == 2 for a in answers)
        single = client.post("/search", files={"image": files[1][1]}, data={"k": 2, "bbox": "4,4,40,40"}).json()
        assert [r["item_id"] for r in single["results"]] == [r["item_id"] for r in answers[1]["results"]]
        mismatch = client.post("/search/batch", files=files, data={"bbox": ["1,1,9,9"]})
        assert mismatch.status_code == 400 and "1 bbox fields for 3 photos" in mismatch.json()["error"]


def test_searches_during_updates_see_the_old_or_the_new_catalogue(live: Live) -> None:
    stop = threading.Event()
    seen: list[tuple[float, float, int, list[dict]]] = []
    lock = threading.Lock()

    def search_loop(n: int) -> None:
        with httpx.Client(base_url=live.base, timeout=60) as client:
            while not stop.is_set():
                photo = (PHOTO_A, PHOTO_B)[n % 2]
                n += 1
                start = time.monotonic()
                response = client.post("/search", files={"image": ("q.png", photo, "image/png")}, data={"k": 3})
                results = response.json().get("results", []) if response.status_code == 200 else []
                with lock:
                    seen.append((start, time.monotonic(), response.status_code, results))

    threads = [threading.Thread(target=search_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    updates: list[tuple[str, float, float]] = []
    try:
        with httpx.Client(base_url=live.base, timeout=60) as client:
            for _ in range(4):
                for kind, call in (("add", add_live_item), ("delete", delete_live_item)):
                    start = time.monotonic()
                    assert call(client).status_code == 200
                    updates.append((kind, start, time.monotonic()))
                    with lock:
                        target = len(seen) + 8
                    while len(seen) < target:  # let whole searches run against this state before the next update
                        time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen and all(status == 200 for _, _, status, _ in seen)
    checked = 0
    for start, end, _, results in seen:
        live_hits = [r for r in results if r["item_id"] == LIVE_ITEM]
        if live_hits:  # whole: the photographed image itself is in the catalogue with the other one
            assert live_hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        done = [u for u in updates if u[2] < start]  # updates that had returned when this search began
        running = [u for u in updates if u[1] < end and u not in done]  # updates overlapping it
        if done and not running:
            assert bool(live_hits) == (done[-1][0] == "add"), (start, end, updates)
            checked += 1
    assert checked > 0


def _kill_script(index: Path, when: str, action: str) -> str:
    """A process that opens the catalogue, then SIGKILLs itself just ``when`` ("before"/"after") its manifest rename."""
    return textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from mmfl.catalog import Catalog
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            commit = os.path.basename(str(dst)) == "manifest.json"
            if commit and {when!r} == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst, *args, **kwargs)
            if commit and {when!r} == "after":
                os.kill(os.getpid(), signal.SIGKILL)
        catalog = Catalog.open({str(index)!r}, with_model=False)
        os.replace = replace
        vectors = np.random.default_rng(0).normal(size=(2, catalog.manifest["embed_dim"])).astype(np.float32)
        {action}
    """)


def test_a_killed_update_leaves_the_old_or_the_new_catalogue(tmp_path: Path) -> None:
    index = make_served_index(tmp_path)
    base = read_manifest(index)
    runs = [("before", "catalog.add(vectors, 'killed')"), ("before", "catalog.remove(['id_01'])"),
            ("after", "catalog.add(vectors, 'kept')"), ("after", "catalog.remove(['id_02'])")]
    expected = [base["count"], base["count"], base["count"] + 2, base["count"]]
    for (when, action), count in zip(runs, expected):
        proc = subprocess.run([sys.executable, "-c", _kill_script(index, when, action)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        store = open_store(index)  # loads: the hashes and counts check out
        assert len(store) == count
        assert not store.images_of("killed") and bool(store.images_of("id_01")) and len(store.images_of("id_03")) == 2
    assert len(store.images_of("kept")) == 2 and not store.images_of("id_02")


def test_photos_of_a_removal_killed_after_its_commit_go_at_the_next_commit(tmp_path: Path) -> None:
    """SIGKILL between a removal's commit and the deletion of its uploads: the files stay (orphans, no row
    names them), the next commit deletes them, and an upload a live item shares is never deleted."""
    index = make_served_index(tmp_path)
    with Catalog.open(index) as catalog:
        catalog.add([PHOTO_A, PHOTO_B], "doomed")
        catalog.add([PHOTO_B], "kept")
        only, shared = catalog.images_of("doomed")
        assert catalog.images_of("kept") == [shared]
    proc = subprocess.run([sys.executable, "-c", _kill_script(index, "after", "catalog.remove(['doomed'])")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Path(only).is_file() and Path(shared).is_file()  # committed, not yet tidied
    with Catalog.open(index, with_model=False) as catalog:
        assert catalog.images_of("doomed") == [] and catalog.images_of("kept") == [shared]
        catalog.remove(["id_04"])  # the next commit
    assert not Path(only).exists() and Path(shared).read_bytes() == PHOTO_B


def test_an_update_loop_killed_at_a_random_moment_leaves_whole_items(tmp_path: Path) -> None:
    index = make_served_index(tmp_path)
    loop = textwrap.dedent(f"""
        import numpy as np
        from mmfl.catalog import Catalog
        catalog = Catalog.open({str(index)!r}, with_model=False)
        rng = np.random.default_rng(1)
        for i in range(100000):
            catalog.add(rng.normal(size=(2, catalog.manifest["embed_dim"])).astype(np.float32), f"v{{i}}")
            if i % 3 == 2:
                catalog.remove([f"v{{i - 1}}"])
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(5):  # a few updates committed, then a kill at a random moment of the next ones
        assert proc.stdout.readline(), proc.stderr.read()
    time.sleep(random.Random(7).uniform(0.0, 0.3))
    proc.kill()
    proc.wait()
    store = open_store(index)
    added = {e.item_id for e in store.entries if e.item_id.startswith("v")}
    assert len(added) >= 3 and all(len(store.images_of(item)) == 2 for item in added)
    with Catalog.open(index, with_model=False) as catalog:  # and it takes the next update
        catalog.remove(sorted(added))
        assert len(catalog) == 2 * len(ITEMS)


def writer_once_read(fifo: Path, reader: threading.Thread, timeout: float = 120.0) -> io.BufferedWriter:
    """The write end of named pipe ``fifo``, opened once a reader has opened it (failing, not hanging, when
    ``reader`` ends first or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads it
        except OSError:
            assert reader.is_alive() and time.monotonic() < deadline, f"nothing opened {fifo}"
            time.sleep(0.01)
            continue
        os.set_blocking(fd, True)
        return open(fd, "wb")


def test_index_add_embeds_without_holding_the_writer_lock(tmp_path: Path) -> None:
    """``mmfl index --add`` (build_index with add) in a thread, held mid-embedding by a photo that is a named
    pipe: meanwhile a live add and a removal commit at once (they used to wait for the whole embedding,
    then fail after 60 s), and the build then skips the photo the live add indexed before it."""
    index = make_served_index(tmp_path)
    model = load_model(tmp_path / "model.pt")
    fresh = {name: png(ITEMS[n], 6) for n, name in enumerate(("new_a.png", "new_b.png"))}
    for name, data in fresh.items():
        (tmp_path / name).write_bytes(data)
    gate = tmp_path / "gate.png"
    os.mkfifo(gate)
    records = [Record(str(tmp_path / name), name[:-4], "shop", "test") for name in ("gate.png", *fresh)]
    outcome: dict[str, object] = {}

    def add() -> None:
        try:
            outcome["report"] = build_index(model, records, index, add=True, progress=False)
        except BaseException as exc:  # re-raised by the test
            outcome["error"] = exc

    builder = threading.Thread(target=add)
    builder.start()
    with writer_once_read(gate, builder) as pipe:  # the build has opened the photo: it is embedding
        with Catalog.open(index) as catalog:
            start = time.monotonic()
            assert catalog.add([tmp_path / "new_a.png"], "added_live")["added"] == 1
            assert catalog.remove(["id_01"]) == 1
            assert time.monotonic() - start < 30 and builder.is_alive()
        pipe.write(png(ITEMS[3], 6))
    builder.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert (report.added, report.already_indexed, report.count) == (2, 1, 2 * len(ITEMS) - 2 + 3)
    store = open_store(index)
    assert len(store) == report.count and not store.images_of("id_01") and not store.images_of("new_a")
    assert store.images_of("added_live") == [str((tmp_path / "new_a.png").resolve())]
    assert store.images_of("gate") == [str(gate.resolve())] and len(store.images_of("new_b")) == 1


def release_milvus_lite(index: Path) -> None:
    """Stop this process' Milvus Lite server of ``index`` (it outlives its clients), so another process may open it."""
    from milvus_lite import server_manager_instance

    server_manager_instance.release_server(str(index / "milvus.db"))


def test_milvus_lite_catalogue_adds_and_removes_also_when_killed(tmp_path: Path) -> None:
    make_served_index(tmp_path)
    model = load_model(tmp_path / "model.pt")
    shop = read_dataset(tmp_path / "gallery", "csv").split("test", domain="shop")
    index = tmp_path / "milvus"
    build_index(model, shop, index, backend="milvus", progress=False)
    with Catalog.open(index) as catalog:
        assert catalog.add([PHOTO_A, PHOTO_B], LIVE_ITEM, category="top")["count"] == len(shop) + 2
        assert catalog.search(PHOTO_A, k=1)["results"][0]["item_id"] == LIVE_ITEM
        assert catalog.remove(["id_06"]) == 1
        assert all(r["item_id"] != "id_06" for r in catalog.search(PHOTO_A, k=len(ITEMS))["results"])
        # What an add killed before its commit leaves: rows in Milvus, the manifest not naming them.
        dim = catalog.manifest["embed_dim"]
        catalog.searcher.store.insert(np.full((1, dim), dim ** -0.5, np.float32), [Entry("ghost", "")])
    with Catalog.open(index) as catalog:
        assert len(catalog) == len(shop) and catalog.images_of("ghost") == []
        assert catalog.images_of("id_06") == [] and len(catalog.images_of(LIVE_ITEM)) == 2
        catalog.remove([LIVE_ITEM])
        assert catalog.search(PHOTO_A, k=1)["results"][0]["item_id"] != LIVE_ITEM
        assert catalog.manifest["facets"]["categories"] == {"dress": len(ITEMS) - 2, "top": len(ITEMS)}
    count = len(shop) - 2
    # Killed before the commit of an add, then after the commit of a removal (its rows not yet deleted).
    for (when, action), expected in zip((("before", "catalog.add(vectors, 'killed')"),
                                         ("after", "catalog.remove(['id_02'])")), (count, count - 2)):
        release_milvus_lite(index)
        proc = subprocess.run([sys.executable, "-c", _kill_script(index, when, action)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        with Catalog.open(index, with_model=False) as catalog:
            assert len(catalog) == expected and catalog.images_of("killed") == []
            assert (catalog.images_of("id_02") == []) == (when == "after")
            found = catalog.search_many(np.eye(catalog.manifest["embed_dim"], dtype=np.float32)[:4], k=len(ITEMS))
            gone = {"killed", "id_06"} | ({"id_02"} if when == "after" else set())
            assert not gone & {r["item_id"] for a in found for r in a["results"]}
    with Catalog.open(index, with_model=False) as catalog:  # the next writer clears what the kills left
        catalog.add(np.full((1, catalog.manifest["embed_dim"]), 0.1, np.float32), "after_kills")
        assert len(catalog) == count - 1 and catalog.manifest["milvus"]["dead_rows"] == []
