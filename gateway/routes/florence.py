"""The Florence-2 services' APIs: the Florence-2 service (``/tasks``, ``/infer``, ``/infer/upload``) and the
Florence-2 v1 service (``/v1/tasks``,
``/v1/predict`` with ``store_image``), plus ``GET /files/{key}`` for images kept in the local object store.

Every route runs the model whose config says ``task: florence2`` (through the engine's
:class:`~vlmserve.gateway.engines.FlorenceRunner`); its config's ``tasks`` parameter is the task table served here.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from vlmserve.families.contract import FlorenceParams
from vlmserve.gateway.auth import require_api_key
from vlmserve.gateway.engines import FlorenceRequest, ModelInfo, live_registry, use_model
from vlmserve.gateway.errors import APIError, about
from vlmserve.gateway.florence import (
    FlorenceTask,
    TaskTable,
    annotate,
    check_generation_args,
    image_format,
    oriented_size,
    prepare_text,
    shape_response,
)
from vlmserve.gateway.images import EXAMPLE_IMAGE, IMAGE_REF_SCHEMA, decode_base64_image, validate_image_bytes
from vlmserve.gateway.limits import inflight_group
from vlmserve.gateway.storage import LocalStore, StorageError, media_type_for

log = logging.getLogger("vlmserve.gateway")

FLORENCE_TASK = "florence2"

router = APIRouter(tags=["Florence-2 service API"], dependencies=[Depends(require_api_key)])
# No API key on stored files: their names are random 128-bit ids handed out only in responses, which makes
# the URL itself the credential, as with the presigned URLs of the S3 store.
files_router = APIRouter(tags=["files"])


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore",
                              json_schema_extra={"examples": [{"image_base64": EXAMPLE_IMAGE, "task": "caption"}]})

    image_base64: str = Field(..., description="base64 of an image file, or a data:image/...;base64, URI",
                              json_schema_extra=IMAGE_REF_SCHEMA)
    task: str = Field("caption", description="task name (object_detection) or Florence token (<OD>)")
    text: str | None = Field(None, description="prompt for tasks that need one; region tasks take 'x1,y1,x2,y2'")
    text_input: str | None = Field(None, description="the Florence-2 service's name for 'text'")
    max_new_tokens: int | None = Field(None, ge=1, description="1..max_new_tokens_limit of the served model "
                                       "(GET /v1/models; 1024 by default)")
    num_beams: int | None = Field(None, ge=1, description="1..num_beams_limit of the served model (8 by default)")


@router.get("/tasks")
async def list_tasks(request: Request) -> dict[str, Any]:
    """The Florence-2 service's task list (names + descriptions) with the full served table under ``details``."""
    info = await _florence_model(request)
    table = TaskTable.of(info)
    return {
        "tasks": [t.name for t in table],
        "descriptions": {t.name: t.description for t in table},
        "details": [t.as_dict() for t in table],
        "model": _source_model(info),
    }


@router.get("/v1/tasks")
async def list_tasks_v1(request: Request) -> list[dict[str, Any]]:
    """Every served task: ``name``, ``token``, ``needs_text``, ``description``, ``text_hint``."""
    info = await _florence_model(request)
    return [t.as_dict() for t in TaskTable.of(info)]


@router.post("/infer", openapi_extra=inflight_group("florence"))
async def infer(body: InferRequest, request: Request) -> dict[str, Any]:
    """Run one task on a base64 image (the Florence-2 service)."""
    policy = request.app.state.settings.image_policy()
    with about("image_base64"):
        data = decode_base64_image(body.image_base64, policy)
        size = oriented_size(data, validate_image_bytes(data, policy))
    text = _one_text(body.text, body.text_input)
    response, _ = await _run(request, data, size, body.task, text, body.max_new_tokens, body.num_beams)
    return response


@router.post("/infer/upload", openapi_extra=inflight_group("florence"))
async def infer_upload(
    request: Request,
    file: UploadFile = File(..., description="the image file"),
    task: str = Form("caption"),
    text: str | None = Form(None),
    text_input: str | None = Form(None),
    max_new_tokens: int = Form(None, ge=1),  # absent: the model's default (a form has no null)
    num_beams: int = Form(None, ge=1),  # absent: the model's default (a form has no null)
) -> dict[str, Any]:
    """Run one task on an uploaded image (the Florence-2 service)."""
    data, size = await _read_upload(request, file)
    response, _ = await _run(request, data, size, task, _one_text(text, text_input), max_new_tokens, num_beams)
    return response


@router.post("/v1/predict", openapi_extra=inflight_group("florence"))
async def predict(
    request: Request,
    task: str = Form(..., description="Florence token (<OD>) or task name"),
    file: UploadFile = File(..., description="the image file"),
    text: str | None = Form(None),
    text_input: str | None = Form(None),
    store_image: bool = Form(True),
    max_new_tokens: int = Form(None, ge=1),  # absent: the model's default (a form has no null)
    num_beams: int = Form(None, ge=1),  # absent: the model's default (a form has no null)
) -> dict[str, Any]:
    """The Florence-2 v1 service: the /infer answer plus the annotated image, as base64 or as stored-object URLs."""
    data, size = await _read_upload(request, file)
    response, florence_task = await _run(request, data, size, task, _one_text(text, text_input), max_new_tokens,
                                         num_beams)
    try:
        annotated = await asyncio.to_thread(annotate, data, response["result"])
    except OSError as exc:
        raise APIError(415, f"file: the image could not be decoded for drawing ({type(exc).__name__})",
                       code="invalid_image", param="file") from None
    response["request_id"] = uuid.uuid4().hex
    response["store_image_enabled"] = store_image
    response["result_data"] = {florence_task.token: response["result"]}  # the v1 service's post-processed dict
    if not store_image:
        response["annotated_image"] = base64.b64encode(annotated).decode("ascii")
        return response
    store = request.app.state.storage
    base_url = str(request.base_url)
    try:
        stored_in, stored_out = await asyncio.gather(store.put(data, image_format(data), base_url),
                                                     store.put(annotated, "png", base_url))
    except StorageError as exc:
        raise APIError(502, f"storing the images failed: {exc}; retry, or send store_image=false",
                       code="storage_failed") from None
    response.update(
        input_image_url=stored_in.url,
        output_image_url=stored_out.url,
        # The Florence-2 v1 service's names for the same URLs.
        input_image=stored_in.url,
        output_visualized=[stored_out.url],
    )
    return response


@files_router.get("/files/{key}", response_class=FileResponse)
async def get_file(key: str, request: Request) -> FileResponse:
    """An image kept by ``/v1/predict`` in the local object store (404 for anything else)."""
    store = request.app.state.storage
    path = store.path_for(key) if isinstance(store, LocalStore) else None
    if path is None:
        raise APIError(404, f"no stored file {key!r}", code="file_not_found", param="key")
    return FileResponse(path, media_type=media_type_for(key), headers={"Cache-Control": "private, max-age=86400"})


# --- shared steps -----------------------------------------------------------------------------------------


async def _florence_model(request: Request) -> ModelInfo:
    settings = request.app.state.settings
    backend = request.app.state.backend
    registry = await live_registry(backend)
    retry = {"Retry-After": str(settings.retry_after_s)}
    candidates = registry.by_task(FLORENCE_TASK)
    ready = [m for m in candidates if m.ready]
    if not ready:
        broken = [f"{m.name}: {m.problem}" for m in registry.models.values() if m.problem and not candidates]
        if broken:
            raise APIError(502, f"no Florence-2 model can serve; models with broken configs: {'; '.join(broken)}",
                           code="bad_model_config")
        # Triton reads a model's config only once it is READY, so a loading model is known by name alone.
        loading = [m.name for m in registry.models.values() if not m.ready and FLORENCE_TASK in m.name]
        if loading:
            raise APIError(503, f"model {loading[0]} is not ready yet; retry later", code="model_not_ready",
                           headers=retry)
        raise APIError(503, "no Florence-2 model is loaded in Triton (no model config has parameter "
                            "task=florence2); export and load one, then retry", code="model_not_loaded",
                       headers=retry)
    return use_model(request, ready[0], settings.retry_after_s)


def _source_model(info: ModelInfo) -> str:
    return info.source


def _one_text(text: str | None, text_input: str | None) -> str | None:
    # Forms often send empty fields; an empty prompt means "no prompt".
    text = text if text and text.strip() else None
    text_input = text_input if text_input and text_input.strip() else None
    if text is not None and text_input is not None and text != text_input:
        raise APIError(422, "send the prompt as 'text' or 'text_input', not both", param="text")
    return text if text is not None else text_input


async def _read_upload(request: Request, file: UploadFile) -> tuple[bytes, tuple[int, int]]:
    policy = request.app.state.settings.image_policy()
    # The body cap (BodySizeLimit) already bounds this read; the per-image cap is checked right after.
    data = await file.read()
    with about("file"):
        return data, oriented_size(data, validate_image_bytes(data, policy))


async def _run(request: Request, image: bytes, size: tuple[int, int], task_key: str, text: str | None,
               max_new_tokens: int | None, num_beams: int | None) -> tuple[dict[str, Any], FlorenceTask]:
    settings = request.app.state.settings
    info = await _florence_model(request)
    table = TaskTable.of(info)
    task = table.find(task_key)
    max_new_tokens, num_beams = check_generation_args(max_new_tokens, num_beams, info.contract(FlorenceParams))
    send_text = prepare_text(task, text, size, settings.max_text_chars)
    start = time.perf_counter()
    payload = await request.app.state.backend.run_florence(
        info, FlorenceRequest(image, task.token, send_text, max_new_tokens, num_beams))
    latency_ms = (time.perf_counter() - start) * 1000
    request.app.state.metrics.items.labels(info.name).inc()
    response = shape_response(payload, task, model=_source_model(info), latency_ms=latency_ms, image_size=size)
    return response, task
