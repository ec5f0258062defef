"""Routes that serve the pages, their static files and the service worker.

The HTML, JS and CSS are package data (``web/html``, ``web/static``), read from disk
when asked for and cached by modification time, so nothing happens at import time.
Every response carries an ETag and ``Cache-Control: no-cache``: browsers revalidate
(a 304 costs one round trip) and never run a stale script after an upgrade.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request, Response

router = APIRouter(include_in_schema=False)

PAGES = ("mechanic", "customer", "admin", "probe")
SERVICE_WORKER_PATH = "/mechanic-sw.js"  # at the root, so its scope can cover /mechanic

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}

# The pages load nothing from elsewhere and run no inline script: a token kept in
# localStorage is only as safe as the scripts that can read it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; worker-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    etag: str
    mtime_ns: int


_cache: dict[Path, Asset] = {}


def _root() -> Path:
    return Path(str(resources.files("autodispatch.web")))


def _load(path: Path) -> Asset | None:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _cache.get(path)
    if cached is not None and cached.mtime_ns == mtime:
        return cached
    body = path.read_bytes()
    asset = Asset(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', mtime)
    _cache[path] = asset
    return asset


def _serve(request: Request, path: Path, extra: dict[str, str] | None = None) -> Response:
    asset = _load(path)
    if asset is None:
        return Response(status_code=404)
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **(extra or {})}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    media_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return Response(asset.body, media_type=media_type, headers=headers)


def _page(request: Request, name: str) -> Response:
    return _serve(request, _root() / "html" / f"{name}.html", PAGE_HEADERS)


@router.api_route(methods=["GET", "HEAD"], path="/")
async def index(request: Request) -> Response:
    return _page(request, "index")


@router.api_route(methods=["GET", "HEAD"], path="/mechanic")
async def mechanic(request: Request) -> Response:
    return _page(request, "mechanic")


@router.api_route(methods=["GET", "HEAD"], path="/customer")
async def customer(request: Request) -> Response:
    return _page(request, "customer")


@router.api_route(methods=["GET", "HEAD"], path="/admin")
async def admin(request: Request) -> Response:
    return _page(request, "admin")


@router.api_route(methods=["GET", "HEAD"], path="/probe")
async def probe(request: Request) -> Response:
    return _page(request, "probe")


@router.api_route(methods=["GET", "HEAD"], path=SERVICE_WORKER_PATH)
async def service_worker(request: Request) -> Response:
    return _serve(request, _root() / "static" / "sw.js")


@router.api_route(methods=["GET", "HEAD"], path="/static/{name:path}")
async def static(request: Request, name: str) -> Response:
    root = (_root() / "static").resolve()
    path = (root / name).resolve()
    # Only files inside static/ (no "..", no absolute paths, no directories).
    if not path.is_relative_to(root) or not path.is_file():
        return Response(status_code=404)
    return _serve(request, path)
