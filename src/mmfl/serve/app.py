"""The visual-search HTTP service: FastAPI over one :class:`~mmfl.index.search.Searcher`.

The model and the index are loaded once, when the app is created, and shared by all requests
(FastAPI runs the plain ``def`` endpoints in its thread pool; inference and index reads are
thread-safe). Uploads are bounded twice: by ``Content-Length`` and by counting the bytes that
actually arrive (a chunked upload has no length), both answered with 413 before any decoding.
Photos are decoded only through :func:`mmfl.data.images.open_crop` (``Searcher.search_photo``),
which refuses non-images and decompression bombs. Item images are served by looking the item
id up in the index, so a request can only ever reach a file the index recorded.
"""
from __future__ import annotations

import json
import mimetypes
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmfl import __version__
from mmfl.errors import CheckpointError, DataError, GalleryIndexError, MMFLError
from mmfl.index.search import MAX_K, Searcher, parse_bbox
from mmfl.index.store import parse_filters

STATIC_DIR = Path(__file__).parent / "static"
MIB = 1 << 20
#: Room for the multipart envelope and the small form fields around the image.
FORM_OVERHEAD = 64 * 1024
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable[[dict], Awaitable[None]]) -> None:
        payload = json.dumps({"error": f"upload larger than {self.max_bytes // MIB} MiB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def create_app(index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
               max_upload_mb: int = 10, onnx: str | Path | None = None) -> FastAPI:
    """The service for the index in ``index_dir`` (model from its manifest, or ``checkpoint`` with the same SHA-256,
    or ``onnx``: a graph exported from that checkpoint, run with ONNX Runtime on CPU)."""
    searcher = Searcher(index_dir, checkpoint, device, onnx)
    max_image_bytes = max_upload_mb * MIB

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        searcher.close()

    app = FastAPI(title="mmfl visual search", version=__version__, lifespan=lifespan,
                  description="Consumer-to-shop retrieval: upload a photo, get the matching shop items.")
    app.state.searcher = searcher
    app.add_middleware(BodyLimit, max_bytes=max_image_bytes + FORM_OVERHEAD)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(MMFLError)
    async def _user_error(_: Request, exc: MMFLError) -> JSONResponse:
        server_side = isinstance(exc, (GalleryIndexError, CheckpointError))
        return JSONResponse({"error": str(exc)}, status_code=500 if server_side else 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz", summary="liveness and what is loaded")
    def healthz() -> dict[str, Any]:
        m = searcher.manifest
        return {"status": "ok", "count": m["count"], "backend": m["backend"], "kind": m["kind"],
                "embed_dim": m["embed_dim"], "checkpoint_sha256": m["checkpoint_sha256"], "generation": m["generation"]}

    @app.get("/facets", summary="categories and attributes in the gallery, with image counts")
    def facets() -> dict[str, Any]:
        return searcher.manifest.get("facets", {"categories": {}, "attributes": {}})

    @app.post("/search", summary="find the shop items matching a photo")
    def search(
        image: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, ...)"),
        bbox: str | None = Form(None, description="optional box x1,y1,x2,y2 in the photo's pixels"),
        k: int = Form(20, ge=1, le=MAX_K, description="number of items to return"),
        filters: list[str] = Form([], alias="filter", description="repeatable: category=NAME or attribute=NAME"),
    ) -> dict[str, Any]:
        data = image.file.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise HTTPException(413, f"image larger than {max_upload_mb} MiB")
        if not data:
            raise DataError("uploaded image is empty")
        box = parse_bbox(bbox) if bbox and bbox.strip() else None
        flt = parse_filters(f for f in filters if f.strip())
        answer = searcher.search_photo(data, f"uploaded image '{image.filename or 'image'}'", k=k, bbox=box, flt=flt)
        for result in answer["results"]:
            images = searcher.store.images_of(result["item_id"])
            n = images.index(result["image"]) if result["image"] in images else 0
            result["image_url"] = f"/items/{quote(result['item_id'], safe='')}/image?n={n}"
        return answer

    @app.get("/items/{item_id:path}/image", summary="an indexed image of an item", response_class=FileResponse)
    def item_image(item_id: str, n: int = Query(0, ge=0, description="which of the item's images")) -> FileResponse:
        images = searcher.store.images_of(item_id)
        if n >= len(images):
            raise HTTPException(404, f"no image {n} for item {item_id!r}")
        path = images[n]
        if not os.path.isfile(path):
            raise HTTPException(404, f"image of item {item_id!r} is no longer on disk")
        return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: each worker process loads its own copy."""
    return create_app(
        os.environ["MMFL_SERVE_INDEX"], os.environ.get("MMFL_SERVE_CHECKPOINT") or None,
        os.environ.get("MMFL_SERVE_DEVICE", "cpu"), int(os.environ.get("MMFL_SERVE_MAX_UPLOAD_MB", "10")),
        os.environ.get("MMFL_SERVE_ONNX") or None,
    )
