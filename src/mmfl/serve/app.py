"""The visual-search HTTP service: FastAPI over one :class:`~mmfl.catalog.Catalog`.

The model and the index are loaded once, when the app is created, and shared by all requests
(FastAPI runs the plain ``def`` endpoints in its thread pool; inference and index reads are
thread-safe, and a search answers from one committed state of the catalogue, old or new, while
``POST /items`` / ``DELETE /items/{id}`` change it; an id holding ``/`` is sent as ``%2F``). The
item endpoints are off unless the app has an admin token (``--admin-token`` or ``MMFL_ADMIN_TOKEN``):
without one they answer 403 saying so; a request without ``Authorization: Bearer <token>`` or with
another token gets 401 (compared in constant time). Uploads are bounded twice: by ``Content-Length`` and by counting
the bytes that actually arrive (a chunked upload has no length), both answered with 413 before
any decoding; the bound is the whole request's, so a batch search or an add of several photos
shares one ``--max-upload-mb``.
Photos are decoded only through :func:`mmfl.data.images.open_crop` (``mmfl.retriever.model_input``),
which refuses non-images and decompression bombs. Item images are served by looking the item
id up in the index, so a request can only ever reach a file the index recorded, and answers name
images by URL only: no response carries a path of the server's disk.

The model is warmed up with one search when the app is created (an ONNX Runtime session's first
run is a second or more slower than the next ones). The API docs (/docs, Swagger UI) are served
with their script and style from this process (``fastapi-offline``), so they work with no network
beyond the machine. Each request is logged once, on the ``mmfl.serve`` logger: method, path,
status, milliseconds.
"""
from __future__ import annotations

import copy
import hmac
import json
import logging
import mimetypes
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Literal
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmfl import __version__
from mmfl.catalog import MAX_ADD_PHOTOS, Catalog
from mmfl.errors import CheckpointError, DataError, GalleryIndexError, MMFLError
from mmfl.index.search import MAX_K, parse_bbox
from mmfl.index.store import IndexBusyError, parse_filters
from mmfl.model_input import model_input_size

STATIC_DIR = Path(__file__).parent / "static"
MIB = 1 << 20
#: Room for the multipart envelope and the small form fields around the image.
FORM_OVERHEAD = 64 * 1024
#: Most photos one ``POST /search/batch`` takes.
MAX_BATCH = 64
#: Shortest admin token accepted (a guessable one would open the catalogue to anyone).
MIN_TOKEN_CHARS = 16
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
log = logging.getLogger("mmfl.serve")


def log_config() -> dict[str, Any]:
    """uvicorn's logging setup plus the ``mmfl.serve`` logger on its stderr handler (same look as its lines).

    Apply it (``logging.config.dictConfig``) before :func:`create_app`, so the warm-up line is
    printed too, and pass it to ``uvicorn.run`` with ``access_log=False``: :class:`RequestLog`
    writes the one line per request.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["mmfl.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


class RequestLog:
    """ASGI middleware: one log line per HTTP request when it ends: method, path, status, duration in ms.

    Outermost, so refusals by :class:`BodyLimit` (413) are logged too. The path is percent-encoded
    as it came in (a decoded one could hold a newline and forge a log line); the query string is
    left out. A request that ends with no response (the client went away) logs status ``-``.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), "-"

        async def send_and_note_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:
            status = "500"  # Starlette's outer error middleware answers it
            raise
        finally:
            path = quote(scope["path"], safe="/:@!$&'()*+,;=-._~")
            log.info("%s %s %s %.1f ms", scope["method"], path, status, (time.perf_counter() - start) * 1000)


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


def check_admin_token(token: str | None) -> str | None:
    """``token`` if usable (None: item updates off); a short one is a one-line MMFLError."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise MMFLError(f"admin token: {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def create_app(index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
               max_upload_mb: int = 10, onnx: str | Path | None = None, admin_token: str | None = None) -> FastAPI:
    """The service for the index in ``index_dir`` (model from its manifest, or ``checkpoint`` with the same SHA-256,
    or ``onnx``: a graph exported from that checkpoint, run with ONNX Runtime on CPU). ``admin_token`` turns on
    ``POST /items`` and ``DELETE /items/{id}``."""
    if max_upload_mb < 1:
        raise ValueError(f"max_upload_mb={max_upload_mb}: must be at least 1")
    admin_token = check_admin_token(admin_token)
    catalog = Catalog.open(index_dir, checkpoint, device, onnx)
    try:
        warmup_ms = warm_up(catalog)
    except BaseException:
        catalog.close()
        raise
    max_image_bytes = max_upload_mb * MIB

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        catalog.close()

    # /redoc is off: its page fetches a logo from outside whatever the options; /docs (Swagger UI) needs nothing.
    app = FastAPIOffline(
        redoc_url=None, title="mmfl visual search", version=__version__, lifespan=lifespan,
        description="Consumer-to-shop retrieval: upload a photo, get the matching shop items. A `score` is the cosine "
                    "similarity of the photo's and the item image's embeddings: 1 for the same picture, higher is "
                    "closer; it is not a probability.")
    app.state.catalog = catalog
    app.add_middleware(BodyLimit, max_bytes=max_image_bytes + FORM_OVERHEAD)
    app.add_middleware(RequestLog)  # added last: outermost
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(MMFLError)
    async def _user_error(request: Request, exc: MMFLError) -> JSONResponse:
        if isinstance(exc, IndexBusyError):
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            return JSONResponse({"error": "the catalogue is being changed by another process; try again"},
                                status_code=503, headers={"Retry-After": "5"})
        if isinstance(exc, (GalleryIndexError, CheckpointError)):
            # The message names files on the server's disk: for its log, not for the client.
            log.error("%s %s: %s", request.method, request.url.path, exc)
            return JSONResponse({"error": "the server's index or model failed; its log has the details"},
                                status_code=500)
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz", summary="liveness and what is loaded")
    def healthz() -> dict[str, Any]:
        catalog.refresh()
        m = catalog.manifest
        return {"status": "ok", "count": m["count"], "backend": m["backend"], "kind": m["kind"],
                "embed_dim": m["embed_dim"], "checkpoint_sha256": m["checkpoint_sha256"], "generation": m["generation"],
                "runtime": "onnxruntime" if onnx else "pytorch", "warmup_ms": warmup_ms,
                "box_head": catalog.has_box_head,
                "item_updates": admin_token is not None}

    @app.get("/facets", summary="categories and attributes in the gallery, with image counts")
    def facets() -> dict[str, Any]:
        catalog.refresh()
        return catalog.manifest.get("facets", {"categories": {}, "attributes": {}})

    def read_upload(upload: UploadFile, label: str = "uploaded image") -> bytes:
        data = upload.file.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise HTTPException(413, f"image larger than {max_upload_mb} MiB")
        if not data:
            raise DataError(f"{label} is empty")
        return data

    def with_urls(answer: dict[str, Any]) -> dict[str, Any]:
        rows = answer["results"] + [r for g in answer.get("garments", ()) if g["results"] is not answer["results"]
                                    for r in g["results"]]
        for result in rows:
            path = result.pop("image")  # a server path: the client gets the URL instead
            images = catalog.images_of(result["item_id"])
            n = images.index(path) if path in images else 0
            result["image_url"] = f"/items/{quote(result['item_id'], safe='')}/image?n={n}"
        return answer

    def require_admin(request: Request) -> None:
        if admin_token is None:
            raise HTTPException(403, "item updates are off: start mmfl serve with --admin-token or MMFL_ADMIN_TOKEN")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), admin_token.encode()):
            raise HTTPException(401, "missing or wrong admin token (send Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/search", summary="find the shop items matching a photo",
              description="Results are items, best first, each with its best-matching image as `image_url` and "
                          "`score`: the cosine similarity of the embeddings (1 = same picture, higher is closer; "
                          "not a probability). A box around the garment leaves the background out and usually "
                          "improves the results. Without `bbox`, a model with a box head searches the best "
                          "predicted garment box (`whole_image=true` turns that off); `query` says which box was "
                          "searched (`bbox`, `box_source` user|predicted|whole, `box_reason`) and lists the "
                          "`detections`. `garments=all` adds `garments`: the results for each detected garment.")
    def search(
        image: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, ...)"),
        bbox: str | None = Form(None, description="optional box x1,y1,x2,y2 in the photo's pixels; always wins"),
        k: int = Form(20, ge=1, le=MAX_K, description="number of items to return"),
        filters: list[str] = Form([], alias="filter", description="repeatable: category=NAME or attribute=NAME"),
        whole_image: bool = Form(False, description="search the whole photo, not the predicted garment box"),
        garments: Literal["best", "all"] = Form("best", description="best: one search (the best garment); "
                                                "all: also one per detected garment, under `garments`"),
    ) -> dict[str, Any]:
        data = read_upload(image)
        box = parse_bbox(bbox) if bbox and bbox.strip() else None
        flt = parse_filters(f for f in filters if f.strip())
        name = f"uploaded image '{image.filename or 'image'}'"
        if garments == "all":
            if box is not None or whole_image:
                raise DataError("garments=all searches each detected garment: leave out bbox and whole_image")
            return with_urls(catalog.search_garments(data, k=k, filter=flt, name=name))
        return with_urls(catalog.search(data, k=k, box=box, filter=flt, name=name, whole_image=whole_image))

    @app.post("/search/batch", summary="find the shop items matching each of several photos",
              description=f"Up to {MAX_BATCH} photos in one request, embedded together: `answers` holds one "
                          "`/search` answer per photo, in order. `bbox` is repeatable: none, or one per photo "
                          "(empty for a whole photo). The request as a whole is bounded by the upload limit.")
    def search_batch(
        images: list[UploadFile] = File(..., alias="image", description="repeatable: the photos"),
        bboxes: list[str] = Form([], alias="bbox", description="repeatable: x1,y1,x2,y2 per photo, or empty"),
        k: int = Form(20, ge=1, le=MAX_K, description="number of items per photo"),
        filters: list[str] = Form([], alias="filter", description="repeatable: category=NAME or attribute=NAME"),
        whole_image: bool = Form(False, description="search whole photos, not their predicted garment boxes"),
    ) -> dict[str, Any]:
        if len(images) > MAX_BATCH:
            raise DataError(f"{len(images)} photos: a batch takes at most {MAX_BATCH}")
        if bboxes and len(bboxes) != len(images):
            raise DataError(f"{len(bboxes)} bbox fields for {len(images)} photos: give none or one per photo")
        boxes = [parse_bbox(b) if b.strip() else None for b in bboxes] or None
        flt = parse_filters(f for f in filters if f.strip())
        names = [f"uploaded image '{im.filename or 'image'}'" for im in images]
        data = [read_upload(im, name) for im, name in zip(images, names)]
        answers = catalog.search_many(data, k=k, boxes=boxes, filter=flt, names=names, whole_image=whole_image)
        return {"answers": [with_urls(a) for a in answers]}

    @app.post("/items", summary="add an item's photos to the catalogue (admin token)",
              description="Needs `Authorization: Bearer <token>` (the server's --admin-token). The photos are "
                          "embedded and committed durably before the answer; searches see the item from then on. "
                          "Without `attribute` fields the model's predicted attributes are stored.")
    def add_item(
        request: Request,
        photos: list[UploadFile] = File(..., alias="photo", description=f"repeatable, at most {MAX_ADD_PHOTOS}"),
        item_id: str = Form(..., description="the shop's item id (new, or an item to give more photos)"),
        category: str | None = Form(None, description="category name; predicted when left out"),
        attributes: list[str] = Form([], alias="attribute", description="repeatable: attribute names"),
        bboxes: list[str] = Form([], alias="bbox", description="repeatable: x1,y1,x2,y2 per photo, or empty"),
    ) -> dict[str, Any]:
        require_admin(request)
        if bboxes and len(bboxes) != len(photos):
            raise DataError(f"{len(bboxes)} bbox fields for {len(photos)} photos: give none or one per photo")
        boxes = [parse_bbox(b) if b.strip() else None for b in bboxes] or None
        names = [f"uploaded image '{p.filename or 'image'}'" for p in photos]
        data = [read_upload(p, name) for p, name in zip(photos, names)]
        return catalog.add(data, item_id, category=category or None, attributes=attributes or None, boxes=boxes,
                           names=names)

    # The id may hold "/" (a folder dataset's "dresses/sku-1"): clients send it URL-encoded ("%2F", as the
    # image_url of every answer is), which reaches the route decoded, so the id is a path parameter.
    @app.delete("/items/{item_id:path}", summary="remove an item from the catalogue (admin token)",
                description="Needs `Authorization: Bearer <token>`. Removes every image of the item, durably, "
                            "before the answer; no search started after it returns the item. An id holding `/` "
                            "is sent URL-encoded (`%2F`).")
    def remove_item(request: Request, item_id: str) -> dict[str, Any]:
        require_admin(request)
        if not catalog.remove([item_id], missing_ok=True):
            raise HTTPException(404, f"item {item_id!r} is not in the catalogue")
        return {"item_id": item_id, "removed": True, "count": len(catalog)}

    @app.get("/items/{item_id:path}/image", summary="an indexed image of an item", response_class=FileResponse)
    def item_image(item_id: str, n: int = Query(0, ge=0, description="which of the item's images")) -> FileResponse:
        images = catalog.images_of(item_id)
        if n >= len(images):
            raise HTTPException(404, f"no image {n} for item {item_id!r}")
        path = images[n]
        if not path:
            raise HTTPException(404, f"item {item_id!r} was added as a vector, without an image")
        if not os.path.isfile(path):
            raise HTTPException(404, f"image of item {item_id!r} is no longer on disk")
        return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    # After the DELETE route above, a GET of any other /items/<...> would match its path but not its
    # method and be answered 405; it names no page, so it is a 404 like every unknown path.
    @app.get("/items/{rest:path}", include_in_schema=False)
    def no_item_page(rest: str) -> None:
        raise HTTPException(404, "Not Found")

    return app


def warm_up(catalog: Catalog) -> float:
    """Run one search on a blank image so the first request does not pay for first-run setup; its ms.

    An ONNX Runtime session's first run is slow (1.3 s against 8 ms after, measured on the
    service); PyTorch and the index warm up less, but it is the same one cheap call.
    """
    side = model_input_size(catalog.model)
    start = time.perf_counter()
    catalog.search(Image.new("RGB", (side, side), (128, 128, 128)), k=1)
    took = round((time.perf_counter() - start) * 1000, 1)
    log.info("warmed up with one search in %.0f ms", took)
    return took


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: each worker process loads its own copy."""
    return create_app(
        os.environ["MMFL_SERVE_INDEX"], os.environ.get("MMFL_SERVE_CHECKPOINT") or None,
        os.environ.get("MMFL_SERVE_DEVICE", "cpu"), int(os.environ.get("MMFL_SERVE_MAX_UPLOAD_MB", "10")),
        os.environ.get("MMFL_SERVE_ONNX") or None, os.environ.get("MMFL_ADMIN_TOKEN") or None,
    )
