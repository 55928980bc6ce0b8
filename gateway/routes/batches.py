"""OpenAI's Files and Batch APIs: ``/v1/files`` (``purpose=batch``) and ``/v1/batches``
(:mod:`vlmserve.gateway.batches`)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from vlmserve.gateway.auth import require_api_key
from vlmserve.gateway.batches import BatchStore, validate_input
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.routes.openai import OpenAIRoute

router = APIRouter(prefix="/v1", tags=["OpenAI batches"], dependencies=[Depends(require_api_key)],
                   route_class=OpenAIRoute)

_CHUNK = 1024 * 1024


def get_store(request: Request) -> BatchStore:
    return request.app.state.batches


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    shown = items[:limit]
    return {"object": "list", "data": shown, "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None, "has_more": len(items) > limit}


def _not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"no {kind} with id {ident!r}", code="not_found", param=f"{kind}_id")


async def _found(kind: str, lookup: Callable[[str], dict[str, Any] | None], ident: str) -> dict[str, Any]:
    """``lookup(ident)`` (a store call, in a thread), or 404 naming the ``kind`` of id."""
    found = await asyncio.to_thread(lookup, ident)
    if found is None:
        raise _not_found(kind, ident)
    return found


# --- files -------------------------------------------------------------------------------------------------

@router.post("/files")
async def upload_file(request: Request, file: UploadFile = File(...),
                      purpose: Literal["batch"] = Form(..., description="the only files this server keeps"),
                      store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    """Upload a JSONL of requests (``purpose=batch``), at most ``batch_max_file_bytes``."""
    limit = request.app.state.settings.batch_max_file_bytes
    store.root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store.root, prefix=".upload-")
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := await file.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the file is over the batch input limit of {limit} bytes",
                                   code="file_too_large", param="file")
                await asyncio.to_thread(out.write, chunk)
        max_age = request.app.state.settings.storage_max_age_s
        expires_at = None if max_age is None else int(time.time() + max_age)
        # Kept as text only (never a path): printable UTF-8, bounded.
        name = (file.filename or "upload.jsonl").encode("utf-8", "replace").decode("utf-8")[-255:]
        return await asyncio.to_thread(store.add_file, Path(tmp), name, purpose, expires_at)
    finally:
        Path(tmp).unlink(missing_ok=True)


@router.get("/files")
async def list_files(purpose: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                     order: Literal["asc", "desc"] = "desc", after: str | None = None,
                     store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    items = await asyncio.to_thread(store.files, purpose, order, limit + 1, after)
    return _page(items, limit)


@router.get("/files/{file_id}")
async def get_file(file_id: str, store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    return await _found("file", store.file, file_id)


@router.get("/files/{file_id}/content", response_model=None)
async def file_content(file_id: str, store: BatchStore = Depends(get_store)) -> FileResponse:
    found = await _found("file", store.file, file_id)
    if not store.file_path(file_id).is_file():
        raise _not_found("file", file_id)
    return FileResponse(store.file_path(file_id), media_type="application/jsonl", filename=found["filename"])


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    if not await asyncio.to_thread(store.delete_file, file_id):
        raise _not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# --- batches -----------------------------------------------------------------------------------------------

class BatchRequest(BaseModel):
    input_file_id: str = Field(description="an uploaded file's id (purpose batch)")
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


@router.post("/batches")
async def create_batch(body: BatchRequest, request: Request,
                       store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    """Validate the input file up front and queue the batch; a malformed file gives a ``failed`` batch whose
    ``errors`` name each bad line (nothing of it runs)."""
    found = await _found("file", store.file, body.input_file_id)
    if found["purpose"] != "batch":
        raise APIError(400, f"file {body.input_file_id} has purpose {found['purpose']!r}, not 'batch'",
                       code="invalid_value", param="input_file_id")
    settings = request.app.state.settings
    lines, errors = await asyncio.to_thread(validate_input, store.file_path(body.input_file_id), body.endpoint,
                                            settings.batch_max_requests)
    batch = await asyncio.to_thread(store.add_batch, body.endpoint, body.input_file_id, body.completion_window,
                                    body.metadata, len(lines), errors)
    runner = getattr(request.app.state, "batch_runner", None)
    if runner is not None:
        runner.wake.set()
    return batch


@router.get("/batches")
async def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None,
                       store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    return _page(await asyncio.to_thread(store.batches, limit + 1, after), limit)


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    return await _found("batch", store.batch, batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, store: BatchStore = Depends(get_store)) -> dict[str, Any]:
    """Stops new work at once; the lines already finished are kept, in the output and error files."""
    return await _found("batch", store.cancel, batch_id)
