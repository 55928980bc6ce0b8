"""Chat models' APIs: OpenAI ``POST /v1/chat/completions`` (streaming and not), seed 002's OCR service
(``POST /ocr``, ``GET /info``) and seed 003's SmolVLM2 tools (``POST /v1/ocr`` with a ``.txt`` download,
``POST /v1/describe_region``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from gateway.auth import require_api_key
from gateway.chat import (
    CHAT_TASK,
    REGION_PROMPT,
    ChatLimits,
    ChatService,
    Delta,
    Sampling,
    crop_region,
    normalize_stop,
    ocr_prompt,
    parse_box,
    run_cancellable,
    source_model,
)
from gateway.errors import APIError, about, error_body
from gateway.florence import oriented_size
from gateway.images import resolve_image, validate_image_bytes

log = logging.getLogger("vlmserve.gateway")

router = APIRouter(dependencies=[Depends(require_api_key)])

M = TypeVar("M", bound=BaseModel)

MAX_PROMPT_CHARS = 2000
MAX_LANGUAGE_CHARS = 64


def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


# --- OpenAI: /v1/chat/completions ----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI adds fields often (user, metadata, store, ...)

    model: str | None = Field(None, description="source model id, family or Triton name; default: first chat model")
    messages: list[Any] = Field(..., description="OpenAI messages; parts: text, image_url, video_url")
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    video_fps: float | None = Field(None, description="vlmserve extension: frames per second sampled from videos")
    video_max_frames: int | None = Field(None, description="vlmserve extension: at most this many frames per video")

    def check_supported(self) -> None:
        """400 for OpenAI features these models cannot honour (rather than silently ignoring them)."""
        if self.n not in (None, 1):
            raise APIError(400, f"only n=1 is supported, got n={self.n}", code="unsupported_parameter", param="n")
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs are not supported", code="unsupported_parameter", param="logprobs")
        if self.tools:
            raise APIError(400, "tool calling is not supported by these models", code="unsupported_parameter",
                           param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", code="unsupported_parameter",
                           param="response_format")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (send 0 or omit it)", code="unsupported_parameter",
                               param=name)

    def sampling(self) -> Sampling:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                           param="max_completion_tokens")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                        stop=normalize_stop(self.stop), seed=self.seed, video_fps=self.video_fps,
                        video_max_frames=self.video_max_frames)


@router.post("/v1/chat/completions", tags=["OpenAI"], response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           chat: ChatService = Depends(get_chat)) -> dict[str, Any] | StreamingResponse:
    """OpenAI chat completions; ``stream: true`` answers with server-sent ``chat.completion.chunk`` events."""
    body.check_supported()
    sampling = body.sampling()
    info = await chat.model(request, body.model)
    inputs = await chat.prepare(info, body.messages, sampling)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model_id = source_model(info)
    if not body.stream:
        result = await run_cancellable(request, chat.complete(request, info, inputs))
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": result.usage.as_openai(),
        }
    deltas = chat.stream(request, info, inputs)

    async def first_delta() -> Delta:
        try:
            return await deltas.__anext__()
        except StopAsyncIteration:
            raise APIError(502, f"{info.name} sent no response", code="inference_failed") from None

    # Waiting for the first response keeps errors found before any text (bad input the model rejected,
    # Triton down) ordinary HTTP errors with their status, instead of a 200 stream that carries an error.
    try:
        first = await run_cancellable(request, first_delta())
    except BaseException:
        await deltas.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse_events(first, deltas, completion_id=completion_id, created=created, model_id=model_id,
                         include_usage=include_usage, triton_name=info.name)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse_events(first: Delta, deltas: AsyncGenerator[Delta, None], *, completion_id: str, created: int,
                      model_id: str, include_usage: bool, triton_name: str) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None  # OpenAI sends null on every chunk but the last when usage is asked for
        return payload

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        delta = first
        while True:
            if delta.text:
                yield _sse(chunk({"content": delta.text}, None))
            if delta.finish_reason:
                break
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                raise APIError(502, f"{triton_name} ended its answer without a finish reason",
                               code="inference_failed") from None
        yield _sse(chunk({}, delta.finish_reason))
        if include_usage:
            usage = (delta.usage.as_openai() if delta.usage
                     else {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
            yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": model_id, "choices": [], "usage": usage})
    except APIError as exc:
        # Headers are gone already: the error becomes an event, so the client never takes a cut-off answer
        # for a whole one.
        log.warning("chat stream on %s failed mid-answer: %s", triton_name, exc.message)
        yield _sse(error_body(exc.status, exc.message, exc.code, exc.param))
    except Exception:  # noqa: BLE001 - anything else still has to end the stream visibly
        log.exception("chat stream on %s failed mid-answer", triton_name)
        yield _sse(error_body(500, "internal server error; see the gateway log", "internal_error"))
    finally:
        await deltas.aclose()
    yield "data: [DONE]\n\n"


# --- seed 002: /ocr and /info ------------------------------------------------------------------------------


class OcrRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(..., description="base64 of an image file, a data URI or an http(s) URL")
    language: str = Field("auto", description="'auto' or the text's language (e.g. 'russian'): a hint")
    model: str | None = Field(None, description="chat model; default: Qwen2-VL if loaded, else the first")
    max_tokens: int | None = Field(None, description="answer length cap; default: the model's (MAX_NEW_TOKENS)")


@router.post("/ocr", tags=["OCR (seed-compatible)"])
async def ocr(body: OcrRequest, request: Request, chat: ChatService = Depends(get_chat)) -> dict[str, Any]:
    """Seed 002: the text in an image, read by a chat model."""
    language = _check_language(body.language)
    image, _ = await _resolve(request, body.image, "image")
    info = await chat.model(request, body.model, surface="ocr")
    result = await chat.ask_about_image(request, info, image, ocr_prompt(language), body.max_tokens)
    return {"text": result.text.strip(), "language": language, "model": source_model(info),
            "latency_ms": result.latency_ms}


@router.get("/info", tags=["OCR (seed-compatible)"])
async def model_info(request: Request, chat: ChatService = Depends(get_chat)) -> dict[str, Any]:
    """Every client-facing model Triton serves (embeddings, Florence-2, chat) and the gateway's limits."""
    registry = await chat.registry()
    settings = request.app.state.settings
    models = []
    for m in registry.models.values():
        if m.params.get("role") != "client":
            continue
        limit = m.params.get("max_new_tokens_limit")
        models.append({
            "id": source_model(m),
            "triton_model": m.name,
            "family": m.family,
            "task": m.task,
            "weights": m.params.get("weights"),
            "ready": m.ready,
            "device": m.device,
            "runtime": m.params.get("runtime"),
            "precision": m.params.get("precision"),
            "supports_video": m.params.get("supports_video", "false").lower() == "true",
            "max_new_tokens_limit": int(limit) if limit and limit.isdigit() else None,
        })
    default = registry.default(CHAT_TASK, "ocr")
    return {
        "models": models,
        # Seed 002's /info described its one model: the one /ocr uses by default.
        "model": source_model(default) if default else None,
        "max_new_tokens": ChatLimits.of(default).default_max_new_tokens if default else None,
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_video_bytes": settings.max_video_bytes,
            "max_images_per_request": settings.max_images_per_request,
            "max_items": settings.max_items,
        },
        "version": request.app.version,
    }


# --- seed 003: /v1/ocr and /v1/describe_region ------------------------------------------------------------


class OcrV1Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(None, description="base64 of an image file, a data URI or an http(s) URL "
                                                "(or upload it as multipart 'file')")
    model: str | None = None
    language: str | None = Field(None, description="optional hint: the text's language")
    max_tokens: int | None = None


class DescribeRegionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(None, description="base64 of an image file, a data URI or an http(s) URL "
                                                "(or upload it as multipart 'file')")
    box: Any = Field(..., description="'x1,y1,x2,y2' in pixels of the (upright) image")
    model: str | None = None
    prompt: str | None = Field(None, description="what to ask about the region; default: describe the object")
    max_tokens: int | None = None


def _body_schema(model: type[BaseModel], form: dict[str, Any]) -> dict[str, Any]:
    # The routes read JSON or multipart themselves, so the OpenAPI page is told about both here.
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": form}},
    }}}


_FILE = {"type": "string", "format": "binary"}
_STR = {"type": "string"}


@router.post("/v1/ocr", tags=["SmolVLM2 (seed-compatible)"], response_model=None,
             openapi_extra=_body_schema(OcrV1Request, {"file": _FILE, "model": _STR, "language": _STR}))
async def ocr_v1(request: Request, fmt: Literal["json", "txt"] | None = Query(None, alias="format"),
                 chat: ChatService = Depends(get_chat)) -> dict[str, Any] | Response:
    """Seed 003's OCR: plain text (JSON, or ``?format=txt`` / ``Accept: text/plain`` for a .txt download)."""
    body, image, _ = await _image_request(request, OcrV1Request)
    language = _check_language(body.language) if body.language else None
    info = await chat.model(request, body.model)
    result = await chat.ask_about_image(request, info, image, ocr_prompt(language), body.max_tokens)
    text = result.text.strip()
    filename = f"ocr_result_{datetime.now().strftime('%Y%m%d_%H%M%S')}.txt"
    if _wants_text(request, fmt):
        return PlainTextResponse(text, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    return {"text": text, "model": source_model(info), "latency_ms": result.latency_ms, "filename": filename}


@router.post("/v1/describe_region", tags=["SmolVLM2 (seed-compatible)"],
             openapi_extra=_body_schema(DescribeRegionRequest, {"file": _FILE, "box": _STR, "model": _STR,
                                                                "prompt": _STR}))
async def describe_region(request: Request, chat: ChatService = Depends(get_chat)) -> dict[str, Any]:
    """Seed 003: describe the object inside ``box`` (``x1,y1,x2,y2``, strictly validated)."""
    body, image, size = await _image_request(request, DescribeRegionRequest)
    box = parse_box(body.box, size)
    prompt = (body.prompt or "").strip() or REGION_PROMPT
    if len(prompt) > MAX_PROMPT_CHARS:
        raise APIError(422, f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}", param="prompt")
    info = await chat.model(request, body.model)
    try:
        region = await asyncio.to_thread(crop_region, image, box)
    except OSError as exc:
        raise APIError(415, f"the image could not be decoded for cropping ({type(exc).__name__})",
                       code="invalid_image", param="image") from None
    result = await chat.ask_about_image(request, info, region, prompt, body.max_tokens)
    return {"description": result.text.strip(), "box": [_plain(v) for v in box], "model": source_model(info),
            "latency_ms": result.latency_ms}


# --- shared steps ------------------------------------------------------------------------------------------


def _plain(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _check_language(language: str) -> str:
    language = language.strip()
    # It goes into the prompt: a short single-line name, not a second instruction.
    if len(language) > MAX_LANGUAGE_CHARS or any(ch in language for ch in "\r\n"):
        raise APIError(422, f"language must be a language name of at most {MAX_LANGUAGE_CHARS} characters "
                            "on one line (or 'auto')", param="language")
    return language or "auto"


def _wants_text(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "txt"
    accept = request.headers.get("accept", "").lower()
    return "text/plain" in accept and "application/json" not in accept


async def _resolve(request: Request, ref: str, param: str) -> tuple[bytes, tuple[int, int]]:
    """An image reference (base64, data URI, URL) as validated bytes and upright (width, height)."""
    policy = request.app.state.settings.image_policy()
    with about(param):
        data = await resolve_image(ref, policy, request.app.state.chat.http)
        return data, oriented_size(data, validate_image_bytes(data, policy))


async def _image_request(request: Request, model: type[M]) -> tuple[M, bytes, tuple[int, int]]:
    """A JSON body (``image``) or a multipart form (``file`` upload, or ``image``): fields, image, size."""
    content_type = request.headers.get("content-type", "").lower()
    settings = request.app.state.settings
    fields: dict[str, Any] = {}
    upload: UploadFile | None = None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        # Text fields may carry a base64 image, so they get the body cap rather than Starlette's 1 MB default.
        form = await request.form(max_part_size=settings.max_body_bytes)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key == "file":
                    upload = value
            elif value != "":
                fields[key] = value  # browsers send empty strings for untouched fields
    else:
        try:
            raw = json.loads(await request.body() or b"null")
        except (UnicodeDecodeError, ValueError):
            raise APIError(400, "the body must be JSON (or a multipart form with 'file')", param="body") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the body must be a JSON object (or a multipart form with 'file')", param="body")
        fields = raw
    try:
        body = model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    ref = getattr(body, "image", None)
    if upload is not None:
        data = await upload.read()
        policy = settings.image_policy()
        with about("file"):
            size = oriented_size(data, validate_image_bytes(data, policy))
        return body, data, size
    if not ref:
        raise APIError(422, "send the image as JSON 'image' (base64, data URI or URL) or as a multipart 'file'",
                       param="image")
    image, size = await _resolve(request, ref, "image")
    return body, image, size
