"""A live catalogue under search load: items added and removed over HTTP while clients search.

The catalogue is a flat FAISS index of ``--vectors`` rows: ``--items`` real items (3 drawn shop
photos each, ``bench/load.py``'s, embedded by an untrained resnet18 ``global`` model at 64 px) plus random unit
vectors for the bulk (item ids ``bulk_N``, no image), written as one generation. It is served by
``mmfl serve --admin-token`` (real uvicorn, one process, 127.0.0.1). Then, for ``--cycles``
rounds, one writer thread ``POST /items`` a new item (2 photos, embedded by the server) and
``DELETE /items/{id}`` it again, while ``--clients`` threads ``POST /search``: with the photo of
the item added most recently, or of a real catalogue item.

Reported: p50/p95/max client latency of add, remove and search, errors (any non-200), and
violations: a search that started after a DELETE returned and still returned the item, or one
that ran wholly between an add's return and the next DELETE's start and did not return it as
its best match. Prints a table, writes JSON (default ``docs/results/live_catalog.json``)::

    nice -n 5 python bench/live_catalog.py                        # 100k vectors, 16 clients, 30 cycles
    python bench/live_catalog.py --vectors 20000 --cycles 5 --json /tmp/live.json
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mmfl.serve.process import start_server, stop_server

sys.path.insert(0, str(Path(__file__).parent))
from load import build_index, draw_photo, machine  # noqa: E402  (the served-index recipe shared with the load bench)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-live-catalog-token-0123456789"
TOP_K = 10


def draw(item: int, variant: int) -> bytes:
    """PNG of item ``item`` (``bench/load.py``'s drawing: own colour, stripe spacing and ring), shifted by ``variant``."""
    out = io.BytesIO()
    draw_photo(item, variant).save(out, format="PNG")
    return out.getvalue()


def build_catalogue(work: Path, items: int, vectors: int) -> Path:
    """``work/index``: the real items indexed by ``bench/load.py`` (``mmfl index``), then grown with random unit
    vectors to ``vectors`` rows."""
    from mmfl.index import open_store
    from mmfl.index.build import commit_generation
    from mmfl.index.faiss_store import write_faiss_generation
    from mmfl.index.store import Entry, new_generation, utc_now

    index = build_index(work, items, 64)
    store = open_store(index)
    bulk = vectors - len(store)
    rng = np.random.default_rng(0)
    random = rng.normal(size=(bulk, store.manifest["embed_dim"])).astype(np.float32)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    gen = new_generation()
    written = write_faiss_generation(index, gen, random, [Entry(f"bulk_{i}", "") for i in range(bulk)], "flat", store)
    manifest = {**store.manifest, "generation": gen, "count": len(store) + bulk, "updated": utc_now(), **written}
    commit_generation(index, manifest, store.manifest)
    return index


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}


def run(base: str, items: int, clients: int, cycles: int) -> dict[str, Any]:
    import httpx

    stop = threading.Event()
    lock = threading.Lock()
    current: list[int] = []  # the live item whose photo searches use, once its add returned
    searches: list[tuple[float, float, int | None, int, list[str]]] = []  # start, end, live item queried, status, ids
    updates: list[tuple[str, int, float, float, int]] = []  # kind, item, start, end, status
    errors: list[str] = []

    def search_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, timeout=120) as client:
            while not stop.is_set():
                with lock:
                    live = current[-1] if current and rng.random() < 0.5 else None
                photo = draw(live, int(rng.integers(0, 2))) if live is not None else draw(int(rng.integers(0, items)), 0)
                start = time.monotonic()
                try:
                    r = client.post("/search", files={"image": ("q.png", photo, "image/png")}, data={"k": TOP_K})
                    status, ids = r.status_code, [x["item_id"] for x in r.json().get("results", [])]
                except httpx.HTTPError as exc:
                    status, ids = 0, []
                    errors.append(f"search: {exc!r}")
                with lock:
                    searches.append((start, time.monotonic(), live, status, ids))

    threads = [threading.Thread(target=search_loop, args=(i,)) for i in range(clients)]
    wall = time.monotonic()
    for t in threads:
        t.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=base, timeout=120, headers=headers) as client:
            time.sleep(2)  # let the searchers fill the server's queue first
            for cycle in range(cycles):
                item = 10_000 + cycle
                start = time.monotonic()
                r = client.post("/items", data={"item_id": f"item{item}", "category": "top"},
                                files=[("photo", (f"{item}_{v}.png", draw(item, v), "image/png")) for v in (0, 1)])
                updates.append(("add", item, start, time.monotonic(), r.status_code))
                with lock:
                    current.append(item)
                time.sleep(1)  # searches of the new item meanwhile
                start = time.monotonic()
                r = client.delete(f"/items/item{item}")
                updates.append(("remove", item, start, time.monotonic(), r.status_code))
                time.sleep(0.5)  # searches of the removed item keep coming until the next add returns
    finally:
        stop.set()
        for t in threads:
            t.join()
    wall = time.monotonic() - wall
    violations = []
    for start, end, live, status, ids in searches:
        if live is None or status != 200:
            continue
        add = next(u for u in updates if u[0] == "add" and u[1] == live)
        remove = next((u for u in updates if u[0] == "remove" and u[1] == live), None)
        if remove is not None and start > remove[3] and f"item{live}" in ids:
            violations.append(f"search started {start - remove[3]:.3f} s after DELETE item{live} returned and found it")
        if start > add[3] and (remove is None or end < remove[2]) and (not ids or ids[0] != f"item{live}"):
            violations.append(f"search between the add and the DELETE of item{live} did not find it first")
    statuses = [s[3] for s in searches] + [u[4] for u in updates]
    return {
        "wall_s": round(wall, 1), "clients": clients, "cycles": cycles,
        "add": percentiles([u[3] - u[2] for u in updates if u[0] == "add"]),
        "remove": percentiles([u[3] - u[2] for u in updates if u[0] == "remove"]),
        "search": percentiles([s[1] - s[0] for s in searches]),
        "searches_per_s": round(len(searches) / wall, 1),
        "searches_of_the_live_item": sum(1 for s in searches if s[2] is not None),
        "searches_after_a_delete_returned": sum(
            1 for s in searches if s[2] is not None and any(u[0] == "remove" and u[1] == s[2] and s[0] > u[3] for u in updates)),
        "errors": sum(1 for s in statuses if s != 200) + len(errors),
        "first_errors": errors[:5],
        "violations": len(violations), "first_violations": violations[:5],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=100_000, help="catalogue rows (default 100000)")
    p.add_argument("--items", type=int, default=40, help="real (photographed) items among them (default 40)")
    p.add_argument("--clients", type=int, default=16, help="searching threads (default 16)")
    p.add_argument("--cycles", type=int, default=30, help="add + remove rounds (default 30)")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "live_catalog.json", help="report file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmfl-live-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        index = build_catalogue(work, args.items, args.vectors)
        build_s = time.monotonic() - started
        proc, base = start_server(index, work / "server.log", "--admin-token", TOKEN)
        try:
            result = run(base, args.items, args.clients, args.cycles)
            import httpx

            health = httpx.get(f"{base}/healthz", timeout=60).json()
            alive = proc.poll() is None
        finally:
            stop_server(proc)
            tracebacks = (work / "server.log").read_text(errors="replace").count("Traceback")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("shared machine: clients and server on the same cores as other jobs"),
        "catalogue": f"flat FAISS, {args.vectors} rows: {args.items} drawn items x 3 photos (untrained resnet18 global, "
                     f"64 px, 512-d) + random unit vectors; built in {build_s:.0f} s",
        "server": "mmfl serve --admin-token (1 process, uvicorn, 127.0.0.1)",
        **result,
        "count_at_end": health["count"], "count_expected": args.vectors,
        "server_alive": alive, "server_log_tracebacks": tracebacks,
    }
    report["passed"] = (result["errors"] == 0 and result["violations"] == 0 and alive and tracebacks == 0
                        and health["count"] == args.vectors)
    print(f"\n{args.vectors} rows, {args.clients} searching clients, {args.cycles} add+remove cycles, {result['wall_s']} s")
    print(f"  {'operation':<10} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for op in ("add", "remove", "search"):
        r = result[op]
        print(f"  {op:<10} {r['n']:>6} {r.get('p50_ms', '-'):>9} {r.get('p95_ms', '-'):>9} {r.get('max_ms', '-'):>9}")
    print(f"  searches/s {result['searches_per_s']}; of the live item {result['searches_of_the_live_item']}, "
          f"{result['searches_after_a_delete_returned']} after its DELETE returned")
    print(f"  errors {result['errors']}, violations {result['violations']}, count at end {health['count']}, "
          f"server alive {alive}, tracebacks {tracebacks}; passed: {report['passed']}")
    for line in result["first_errors"] + result["first_violations"]:
        print(f"  {line}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
