"""The web UI: static files under ``/ui`` (shipped as package data, no network at run time), ``/`` redirecting
browsers there, and ``GET /ui/api/triton-stats``, Triton's per-model inference statistics for the Status panel.

The page itself talks only to the gateway's public APIs (OpenAI API and the old services' APIs); see docs/ui.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from vlmserve.gateway.auth import require_api_key
from vlmserve.gateway.errors import APIError, error_body

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# The browser enforces what the tests check: the page loads and calls nothing but this origin.
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; "
       "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}

router = APIRouter(include_in_schema=False)


def _files() -> dict[str, Path]:
    """The servable files by name: a fixed set, so no request path ever reaches the file system."""
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


@router.get("/")
async def root(request: Request) -> Response:
    """Browsers (``Accept: text/html``) go to the UI; API clients keep the JSON 404 they always got."""
    if "text/html" in request.headers.get("accept", "").lower():
        return RedirectResponse("/ui", status_code=307)
    return JSONResponse(error_body(404, "Not Found"), 404)


@router.get("/ui")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=MEDIA_TYPES[".html"], headers=HEADERS)


@router.get("/ui/api/triton-stats", dependencies=[Depends(require_api_key)])
async def triton_stats(request: Request) -> dict[str, Any]:
    """Triton's inference statistics per model version (counts and cumulative times), trimmed for a glance."""
    backend = request.app.state.backend
    stats = await backend.statistics()
    models = []
    for entry in stats.get("model_stats", []):
        inference = entry.get("inference_stats", {})

        def part(name: str, inference: dict[str, Any] = inference) -> dict[str, int]:
            item = inference.get(name, {})
            return {"count": int(item.get("count", 0)), "ns": int(item.get("ns", 0))}

        models.append({
            "name": entry.get("name"), "version": entry.get("version"),
            "inference_count": int(entry.get("inference_count", 0)),
            "execution_count": int(entry.get("execution_count", 0)),
            "success": part("success"), "fail": part("fail"), "queue": part("queue"),
            "compute_infer": part("compute_infer"),
        })
    return {"triton": backend.url, "models": models}


@router.get("/ui/{name}")
async def static_file(name: str) -> FileResponse:
    path = _files().get(name)
    if path is None:
        raise APIError(404, f"no UI file {name!r}", code="file_not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
