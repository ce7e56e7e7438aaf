"""The search service under load and abuse: a real ``mmfl serve`` on 127.0.0.1, hammered and probed.

1. Load: ``--requests`` uploads to ``POST /search`` from ``--clients`` concurrent clients (one
   asyncio + httpx process); every answer must be a 200 whose best item is the photographed one
   (a mixed-up answer under concurrency counts as an error). Reports errors, p50/p90/p99/max
   latency (client side) and throughput. While the load runs, ``--aborts`` raw-socket clients
   declare a large body, send part of it and hang up.
2. Limits: an upload over ``--max-upload-mb`` is a 413, with and without ``Content-Length``;
   malformed multipart bodies are 4xx; after all the hang-ups a normal request still succeeds.
3. Serving files: every ``image_url`` the answers carried returns bytes of a gallery photo, and
   path-traversal attempts (encoded ``..``, absolute paths, out-of-range image numbers) are 404.

Without ``--index`` a small gallery (``--items`` items, 3 shop photos each) is drawn and indexed with
an untrained resnet18 ``global`` model at ``--size`` px (weights do not change the service's
behaviour); with ``--index`` that index and its checkpoint are used and the query photos are its own
gallery images. Prints a table, writes JSON (default ``docs/results/load.json``)::

    python bench/load.py                                  # 64 clients, 2000 requests
    python bench/load.py --clients 8 --requests 200 --json /tmp/load.json
    python bench/load.py --index runs/index               # an existing index
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmfl.serve.process import start_server, stop_server

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOP_K = 5


def machine(note: str) -> dict[str, Any]:
    """Where a served-index bench ran: the load average at the end says how shared the cores were."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "note": note}


# ----------------------------------------------------------------------------- the served index

def draw_photo(item: int, variant: int, size: int = 96) -> Any:
    """Item ``item``'s photo: its own colour and stripe spacing, shifted by ``variant``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(item)
    colour = tuple(int(c) for c in rng.integers(30, 230, 3))
    img = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(img)
    step = 4 + item % 7
    for x in range(variant, size, step):
        line = [(x, 0), (x, size)] if item % 2 else [(0, x), (size, x)]
        draw.line(line, fill=(255, 255, 255), width=1 + item % 3)
    draw.ellipse([10 + 2 * variant, 10, 50 + 2 * variant, 60], outline=(0, 0, 0), width=3)
    return img


def build_index(work: Path, items: int, size: int) -> Path:
    """A CSV gallery of ``items`` x 3 shop photos and its flat FAISS index, built with ``mmfl index``."""
    from mmfl.checkpoint import atomic_save, model_payload
    from mmfl.config import config_to_dict, load_config
    from mmfl.models import build_model

    gallery = work / "gallery"
    gallery.mkdir(parents=True)
    rows = ["path,item_id,domain,split"]
    for item in range(items):
        for variant in range(3):
            name = f"item{item:03d}_{variant}.png"
            draw_photo(item, variant).save(gallery / name)
            rows.append(f"{name},item{item:03d},shop,test")
    (gallery / "dataset.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config("global", ["model.backbone=resnet18", "model.pretrained=none", f"input.size={size}", "data.format=csv"])
    model = build_model(cfg, items, 0, 0)
    checkpoint = work / "model.pt"
    atomic_save(model_payload(model, {"config": config_to_dict(cfg), "num_items": items, "num_attributes": 0,
                                      "num_categories": 0, "attribute_names": [], "category_names": []}), checkpoint)
    index = work / "index"
    subprocess.run([sys.executable, "-m", "mmfl.cli", "index", str(checkpoint), "--data", str(gallery), "--format",
                    "csv", "--out", str(index), "--no-progress", "--workers", "0", "--device", "cpu"],
                   check=True, capture_output=True, text=True)
    return index


def query_photos(index: Path, count: int) -> list[tuple[str, bytes]]:
    """(item id, JPEG bytes) of up to ``count`` gallery images, one per item: each must find its item first."""
    from PIL import Image

    seen: dict[str, str] = {}
    for entry in gallery_entries(index):
        seen.setdefault(entry.item_id, entry.image)
    out = []
    for item, path in list(seen.items())[:count]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, "JPEG", quality=95)
        out.append((item, buf.getvalue()))
    return out


def gallery_entries(index: Path) -> list[Any]:
    """The index's gallery rows (item id, image path); read from a FAISS index's metadata."""
    from mmfl.index import open_store

    store = open_store(index)
    try:
        entries = getattr(store, "entries", None)
    finally:
        store.close()
    if not entries:
        raise SystemExit(f"--index {index}: a FAISS index is needed (its metadata names the gallery photos)")
    return list(entries)


def gallery_hashes(index: Path) -> set[str]:
    """SHA-256 of every file the index records: the only bytes the service may ever send as an item image."""
    paths = {e.image for e in gallery_entries(index)}
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


# ----------------------------------------------------------------------------- the server

# ----------------------------------------------------------------------------- load

async def run_load(base: str, photos: list[tuple[str, bytes]], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` uploads shared by ``clients`` concurrent workers; latency of each, errors, answers."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    image_urls: set[str] = set()
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(session: httpx.AsyncClient) -> None:
        for n in counter:
            item, data = photos[n % len(photos)]
            t0 = time.perf_counter()
            try:
                resp = await session.post("/search", files={"image": (f"q{n}.jpg", data, "image/jpeg")},
                                          data={"k": str(TOP_K)})
            except httpx.HTTPError as exc:
                errors.append(f"request {n}: {type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                errors.append(f"request {n}: HTTP {resp.status_code}: {resp.text[:120]}")
                continue
            results = resp.json()["results"]
            if not results or results[0]["item_id"] != item:
                errors.append(f"request {n}: photo of {item} answered {results[0]['item_id'] if results else None}")
            image_urls.update(r["image_url"] for r in results)

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "clients": clients, "requests": requests, "ok": requests - len(errors), "errors": len(errors),
        "first_errors": errors[:5], "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
        "image_urls": sorted(image_urls),
    }


def abort_upload(port: int, declared: int = 512 * 1024, sent: int = 4096) -> str:
    """Declare a ``declared``-byte multipart upload, send ``sent`` bytes of it, hang up."""
    boundary = "mmflabort"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cut.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    request = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request + head + b"\xff\xd8\xff" + b"\0" * (sent - len(head) - 3))
        time.sleep(random.uniform(0.0, 0.3))
    return "sent part, closed"


def run_aborts(port: int, count: int) -> tuple[list[threading.Thread], list[str]]:
    """``count`` aborted uploads, one every half second from the start of the load, from background threads."""
    outcomes: list[str] = []

    def one(delay: float) -> None:
        time.sleep(delay)
        try:
            outcomes.append(abort_upload(port))
        except OSError as exc:
            outcomes.append(f"could not even connect: {exc}")

    threads = [threading.Thread(target=one, args=(i * 0.5,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads, outcomes


# ----------------------------------------------------------------------------- limits and serving files

def check_limits(base: str, photo: bytes, max_upload_mb: int) -> list[dict[str, Any]]:
    """Oversized and malformed uploads, each with the status it must get (a range for 4xx)."""
    import httpx

    over = b"\0" * (max_upload_mb * (1 << 20) + 200 * 1024)

    def chunks() -> Any:
        for _ in range(0, len(over), 128 * 1024):
            yield over[:128 * 1024]

    checks = [
        ("upload over the limit (Content-Length)", (413, 413),
         lambda c: c.post("/search", files={"image": ("big.jpg", over, "image/jpeg")})),
        ("upload over the limit (chunked, no length)", (413, 413),
         lambda c: c.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})),
        ("multipart body that is not multipart", (400, 499),
         lambda c: c.post("/search", content=b"garbage" * 100,
                          headers={"content-type": "multipart/form-data; boundary=x"})),
        ("multipart without a boundary", (400, 499),
         lambda c: c.post("/search", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"})),
        ("multipart cut before its closing boundary", (400, 499),
         lambda c: c.post("/search", content=b"--x\r\nContent-Disposition: form-data; name=\"image\"; "
                                             b"filename=\"a.jpg\"\r\n\r\n" + photo[:500],
                          headers={"content-type": "multipart/form-data; boundary=x"})),
        ("JSON instead of a form", (400, 499), lambda c: c.post("/search", json={"image": "x"})),
        ("form without the image field", (400, 499), lambda c: c.post("/search", data={"k": "3"})),
        ("image field that is not an image", (400, 499),
         lambda c: c.post("/search", files={"image": ("x.jpg", b"GIF89a not really", "image/jpeg")})),
    ]
    out = []
    for name, (low, high), send in checks:
        with httpx.Client(base_url=base, timeout=60) as client:  # a fresh connection each: 413 closes it
            try:
                status = send(client).status_code
            except httpx.HTTPError as exc:
                status = f"{type(exc).__name__}"
        out.append({"check": name, "status": status, "expected": f"{low}" if low == high else f"{low}-{high}",
                    "ok": isinstance(status, int) and low <= status <= high})
    return out


TRAVERSALS = [
    "/items/..%2F..%2F..%2F..%2Fetc%2Fpasswd/image",
    "/items/%2E%2E/image",
    "/items/%2Fetc%2Fpasswd/image",
    "/items/{item}/image?n=9999",
    "/items/{item}/image?n=-1",
    "/items/{item}/..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/../../../../etc/passwd",
    "/static/%2E%2E/%2E%2E/app.py",
    "/{index}/manifest.json",
]


def check_files(base: str, image_urls: list[str], allowed: set[str], item: str, index: Path) -> list[dict[str, Any]]:
    """Every served item image is a gallery file; every traversal attempt is refused."""
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as client:
        served_ok = 0
        for url in image_urls:
            resp = client.get(url)
            served_ok += resp.status_code == 200 and hashlib.sha256(resp.content).hexdigest() in allowed
        out.append({"check": f"{len(image_urls)} image_urls from the answers serve gallery files", "status": served_ok,
                    "expected": str(len(image_urls)), "ok": served_ok == len(image_urls) > 0})
        for template in TRAVERSALS:
            path = template.format(item=item, index=str(index).lstrip("/"))
            resp = client.get(path)
            leaked = resp.status_code == 200 and (b"root:" in resp.content or
                                                  hashlib.sha256(resp.content).hexdigest() not in allowed)
            out.append({"check": f"GET {path}", "status": resp.status_code, "expected": "404 or 422",
                        "ok": resp.status_code in (404, 422) and not leaked})
    return out


RAW_TRAVERSALS = ["/static/../../../../etc/passwd", "/items/../../../../etc/passwd/image", "/static/..%2f..%2fapp.py"]


def raw_get(port: int, path: str) -> int:
    """GET ``path`` sent byte for byte (HTTP clients normalise ``..`` away before sending)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    if status == 200 and b"root:" in data:
        return -200  # leaked a system file
    return status


def still_serving(base: str, photo: tuple[str, bytes]) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=base, timeout=60) as client:
        health = client.get("/healthz").status_code
        resp = client.post("/search", files={"image": ("after.jpg", photo[1], "image/jpeg")}, data={"k": "1"})
    ok = health == 200 and resp.status_code == 200 and resp.json()["results"][0]["item_id"] == photo[0]
    return {"check": "after aborted uploads and the load: /healthz and a search", "status": resp.status_code,
            "expected": "200", "ok": ok}


# ----------------------------------------------------------------------------- report

def print_report(report: dict[str, Any]) -> None:
    load = report["load"]
    print(f"\nload: {load['requests']} requests from {load['clients']} concurrent clients "
          f"(+{report['aborted_uploads']} aborted uploads) in {load['wall_s']} s")
    print(f"  {'ok':>6} {'errors':>7} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"  {load['ok']:>6} {load['errors']:>7} {load['requests_per_s']:>8} {load['p50_ms']:>8} "
          f"{load['p90_ms']:>8} {load['p99_ms']:>8} {load['max_ms']:>8}")
    for err in load["first_errors"]:
        print(f"  error: {err}")
    print(f"\n  {'check':<62} {'status':>7} {'expected':>10}  result")
    for c in report["checks"]:
        print(f"  {c['check'][:62]:<62} {str(c['status']):>7} {c['expected']:>10}  {'ok' if c['ok'] else 'FAIL'}")
    print(f"\nserver alive at the end: {report['server_alive']}; all passed: {report['passed']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--requests", type=int, default=2000, help="search requests in all (default 2000)")
    p.add_argument("--index", type=Path, help="an existing index (default: draw and index a small gallery)")
    p.add_argument("--items", type=int, default=40, help="items of the drawn gallery (default 40)")
    p.add_argument("--size", type=int, default=64, help="input size of the drawn gallery's model (default 64)")
    p.add_argument("--aborts", type=int, default=16, help="uploads cut off mid-body during the load (default 16)")
    p.add_argument("--max-upload-mb", type=int, default=2, help="the server's upload limit (default 2)")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "load.json", help="report file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmfl-load-") as tmp:
        work = Path(tmp)
        index = args.index.resolve() if args.index else build_index(work, args.items, args.size)
        photos = query_photos(index, 16)
        allowed = gallery_hashes(index)
        proc, base = start_server(index, work / "server.log", "--max-upload-mb", str(args.max_upload_mb))
        port = int(base.rsplit(":", 1)[1])
        try:
            threads, aborts = run_aborts(port, args.aborts)
            load = asyncio.run(run_load(base, photos, args.clients, args.requests))
            for t in threads:
                t.join(timeout=30)
            checks = [still_serving(base, photos[0])]
            checks += check_limits(base, photos[0][1], args.max_upload_mb)
            checks += check_files(base, load["image_urls"], allowed, photos[0][0], index)
            for path in RAW_TRAVERSALS:
                status = raw_get(port, path)
                checks.append({"check": f"raw GET {path}", "status": status, "expected": "404", "ok": status == 404})
            checks.append(still_serving(base, photos[-1]))
            alive = proc.poll() is None
        finally:
            stop_server(proc)
            tracebacks = (work / "server.log").read_text(errors="replace").count("Traceback")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("shared machine: client and server on the same cores as other jobs"),
        "index": str(args.index) if args.index else f"drawn: {args.items} items x 3 shop photos, untrained resnet18 "
                                                    f"global at {args.size} px, flat FAISS",
        "server": f"mmfl serve --max-upload-mb {args.max_upload_mb} (1 process)",
        "load": {k: v for k, v in load.items() if k != "image_urls"},
        "aborted_uploads": len(aborts),
        "checks": checks,
        "server_alive": alive,
        "server_log_tracebacks": tracebacks,
    }
    report["passed"] = (load["errors"] == 0 and all(c["ok"] for c in checks) and alive and tracebacks == 0)
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
