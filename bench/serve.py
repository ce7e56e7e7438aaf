"""CPU serving benchmark: one customer photo -> top-k, PyTorch eager vs ONNX Runtime, then over HTTP.

Part 1, in process: the query path of ``mmfl search`` / ``mmfl serve`` taken apart: JPEG decode
(``mmfl.data.images.open_crop``, at the reduced JPEG scale the service uses), resize to the
serving size (``eval_transform``), embedding (PyTorch eager or the ``mmfl export`` graph in
ONNX Runtime) and exact FAISS search over a gallery of ``--gallery`` vectors; p50/p99 per stage
and in total, one query at a time.

Part 2, over HTTP: a real ``mmfl serve`` on 127.0.0.1 (index built by ``mmfl index`` from a small
generated gallery), N concurrent clients posting the photo to ``/search`` for ``--duration``
seconds each: requests/s and client-side p50/p99. When ``mmfl serve`` has ``--onnx``, both
engines are measured.

Weights do not change speed, so without ``--checkpoint`` an untrained model of ``--preset`` /
``--backbone`` is used. Usage::

    python bench/serve.py                          # mmfl preset, resnet50, its input.size
    python bench/serve.py --skip-http --repeats 20
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmfl.atomic import atomic_write_text
from mmfl.serve.process import start_server, stop_server

import numpy as np

PHOTO_SIZE = (1024, 768)  # a phone photo after the usual client-side downscale
TOP_K = 20


def make_photo(seed: int = 0) -> bytes:
    """A JPEG (quality 90) of a drawn scene: smooth background, a garment-like shape, some texture."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = PHOTO_SIZE
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 60 * np.sin(x / 97.0), 140 + 50 * np.cos(y / 71.0), 160 + 40 * np.sin((x + y) / 131.0)], -1)
    img = Image.fromarray((base + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.polygon([(380, 150), (640, 150), (760, 300), (690, 330), (660, 700), (360, 700), (330, 330), (260, 300)],
                 fill=(180, 40, 60), outline=(40, 10, 20))
    for i in range(0, 500, 23):
        draw.line([(360, 180 + i), (660, 180 + i)], fill=(230, 200, 210), width=3)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/mean in milliseconds."""
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": len(samples)}


def untrained_checkpoint(path: Path, preset: str, backbone: str) -> Path:
    """A checkpoint of an untrained model (speed does not depend on the weights)."""
    from mmfl.checkpoint import atomic_save, model_payload
    from mmfl.config import config_to_dict, load_config
    from mmfl.models import build_model

    cfg = load_config(preset, [f"model.backbone={backbone}", "model.pretrained=none"])
    items, attrs = 1000, 303
    model = build_model(cfg, items, attrs, 0)
    atomic_save(model_payload(model, {
        "config": config_to_dict(cfg), "num_items": items, "num_attributes": attrs, "num_categories": 0,
        "attribute_names": [f"attribute_{i}" for i in range(attrs)], "category_names": [],
    }), path)
    return path


def random_gallery(n: int, dim: int, seed: int = 0) -> Any:
    """An exact inner-product FAISS index over ``n`` random unit vectors (flat search cost is data-independent)."""
    import faiss
    import torch

    index = faiss.IndexFlatIP(dim)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, 16384):
        rows = torch.nn.functional.normalize(torch.randn(min(16384, n - start), dim, generator=gen), dim=1)
        index.add(rows.numpy())
    return index


def query_latency(engines: dict[str, Callable[[Any], Any]], photo: bytes, size: int, index: Any, repeats: int,
                  warmup: int) -> dict[str, Any]:
    """Per-stage and total latency of single-photo queries (decode, resize, embed, search) for each engine.

    The engines take turns query by query, so a busy neighbour on a shared machine slows both alike.
    """
    import torch

    from mmfl.data.images import open_crop
    from mmfl.data.transforms import eval_transform

    transform = eval_transform(size)
    names = ("decode", "preprocess", "embed", "search", "total")
    stages = {engine: {name: [] for name in names} for engine in engines}
    for i in range(warmup + repeats):
        for engine, predict in engines.items():
            t0 = time.perf_counter()
            image = open_crop(photo, None, "benchmark photo", min_size=size)[0]  # as Searcher.search_photo
            t1 = time.perf_counter()
            x = transform(image).unsqueeze(0)
            t2 = time.perf_counter()
            with torch.inference_mode():
                vector = torch.nn.functional.normalize(predict(x).embedding.float(), dim=1).numpy()
            t3 = time.perf_counter()
            index.search(vector, TOP_K)
            t4 = time.perf_counter()
            if i >= warmup:
                for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    stages[engine][name].append(dt)
    return {engine: {name: percentiles(v) for name, v in by_stage.items()} for engine, by_stage in stages.items()}


# ---------------------------------------------------------------- HTTP


def build_served_index(workdir: Path, checkpoint: Path, items: int) -> Path:
    """A generated gallery embedded by ``mmfl index`` (the real CLI) into ``workdir/index``."""
    from mmfl.synth import generate

    data = workdir / "synth"
    generate(data, items, seed=0, size=256)
    index = workdir / "index"
    subprocess.run([sys.executable, "-m", "mmfl.cli", "index", str(checkpoint), "--data", str(data),
                    "--format", "deepfashion-c2s", "--out", str(index), "--device", "cpu", "--no-progress"],
                   check=True, capture_output=True, text=True)
    return index


def http_load(base: str, photo: bytes, clients: int, duration_s: float) -> dict[str, Any]:
    """``clients`` threads posting the photo to /search back to back for ``duration_s``."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as session:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                resp = session.post("/search", files={"image": ("photo.jpg", photo, "image/jpeg")},
                                    data={"k": str(TOP_K)})
                dt = time.perf_counter() - t0
                with lock:
                    if resp.status_code == 200 and resp.json().get("results") is not None:
                        latencies.append(dt)
                    else:
                        errors.append(f"{resp.status_code}: {resp.text[:100]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    out = {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
           "requests_per_s": len(latencies) / wall}
    if latencies:
        out.update(percentiles(latencies))
    if errors:
        out["first_error"] = errors[0]
    return out


def serve_supports_onnx() -> bool:
    proc = subprocess.run([sys.executable, "-m", "mmfl.cli", "serve", "--help"], capture_output=True, text=True)
    return "--onnx" in proc.stdout


# ---------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: an untrained --preset model)")
    p.add_argument("--preset", default="mmfl")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, help="serving size (default: the checkpoint's input.size)")
    p.add_argument("--gallery", type=int, default=100_000, help="vectors in the in-process FAISS gallery")
    p.add_argument("--repeats", type=int, default=50, help="timed queries per engine")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for both engines")
    p.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4],
                   help="concurrent HTTP clients to try (default 1,2,4)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per HTTP load level")
    p.add_argument("--served-items", type=int, default=30, help="items in the served index's generated gallery")
    p.add_argument("--skip-http", action="store_true", help="in-process latency only")
    p.add_argument("--out", type=Path, default=Path("docs/results/serve_bench.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import faiss
    import torch

    from mmfl.checkpoint import load_model
    from mmfl.export import OnnxEmbedder, export_onnx

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    photo = make_photo()
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "loadavg_before": os.getloadavg()},
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
        "photo": {"width": PHOTO_SIZE[0], "height": PHOTO_SIZE[1], "jpeg_bytes": len(photo)},
    }
    with tempfile.TemporaryDirectory(prefix="mmfl-serve-bench-") as tmp:
        work = Path(tmp)
        ckpt = args.checkpoint or untrained_checkpoint(work / "model.pt", args.preset, args.backbone)
        model = load_model(ckpt, "cpu")
        size = args.size or int(model.meta["config"]["input"]["size"])
        onnx_path = work / "model.onnx"
        t0 = time.perf_counter()
        parity = export_onnx(model, onnx_path, size)
        report["export"] = {"seconds": time.perf_counter() - t0, "max_abs_diff": parity["max_abs_diff"],
                            "bytes": parity["bytes"]}
        print(f"exported {onnx_path.name} in {report['export']['seconds']:.1f}s; parity {parity['checked']}",
              flush=True)
        index = random_gallery(args.gallery, model.embed_dim)
        report["settings"] = {"size": size, "embed_dim": model.embed_dim, "gallery": args.gallery, "k": TOP_K,
                              "repeats": args.repeats, "checkpoint": str(args.checkpoint or f"untrained {args.preset}"
                                                                          f"/{args.backbone}")}
        engines = {"pytorch-eager": model.predict, "onnxruntime": OnnxEmbedder(onnx_path, args.threads).predict}
        print(f"latency: {', '.join(engines)}, {args.repeats} queries each, taking turns ...", flush=True)
        report["latency"] = query_latency(engines, photo, size, index, args.repeats, args.warmup)
        for name, lat in report["latency"].items():
            print(f"  {name}: total p50 {lat['total']['p50_ms']:.1f} ms, p99 {lat['total']['p99_ms']:.1f} ms "
                  f"(decode p50 {lat['decode']['p50_ms']:.1f}, resize {lat['preprocess']['p50_ms']:.1f}, "
                  f"embed {lat['embed']['p50_ms']:.1f}, search {lat['search']['p50_ms']:.1f})", flush=True)
        del index
        if not args.skip_http:
            report["http"] = http_part(args, work, ckpt, onnx_path, photo)
    report["machine"]["loadavg_after"] = os.getloadavg()
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def http_part(args: argparse.Namespace, work: Path, ckpt: Path, onnx_path: Path, photo: bytes) -> dict[str, Any]:
    print("http: building the served index ...", flush=True)
    index_dir = build_served_index(work, ckpt, args.served_items)
    variants = {"pytorch-eager": []}
    if serve_supports_onnx():
        variants["onnxruntime"] = ["--onnx", str(onnx_path)]
    out: dict[str, Any] = {"served_images": json.loads((index_dir / "manifest.json").read_text()).get("count")}
    for name, extra in variants.items():
        proc, base = start_server(index_dir, work / f"serve-{name}.log", *extra)
        try:
            levels = []
            for clients in args.clients:
                print(f"http: {name}, {clients} client(s) for {args.duration:.0f}s ...", flush=True)
                levels.append(http_load(base, photo, clients, args.duration))
                last = levels[-1]
                print(f"  {last['requests_per_s']:.2f} req/s, p50 {last.get('p50_ms', float('nan')):.0f} ms, "
                      f"p99 {last.get('p99_ms', float('nan')):.0f} ms, errors {last['errors']}", flush=True)
            out[name] = levels
        finally:
            stop_server(proc)
    return out


if __name__ == "__main__":
    sys.exit(main())
