"""Chat models' APIs: OpenAI ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming and not;
request models in ``vlmserve.api.openai``), the Qwen2-VL OCR service
(``POST /ocr``, ``GET /info``) and the SmolVLM2 service's tools (``POST /v1/ocr`` with a ``.txt`` download,
``POST /v1/describe_region``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import JsonDict
from starlette.datastructures import UploadFile

from vlmserve.api.openai import ChatCompletionRequest, CompletionRequest, StreamOptions
from vlmserve.families.contract import ChatParams, FlorenceParams
from vlmserve.gateway.auth import require_api_key
from vlmserve.gateway.chat import (
    BOX_PATTERN,
    CHAT_TASK,
    REGION_PROMPT,
    ChatJob,
    ChatService,
    Completion,
    Delta,
    Usage,
    crop_region,
    ocr_prompt,
    parse_box,
    run_cancellable,
    source_model,
)
from vlmserve.gateway.engines import ModelInfo
from vlmserve.gateway.errors import APIError, about, error_body
from vlmserve.gateway.florence import oriented_size
from vlmserve.gateway.images import EXAMPLE_IMAGE, IMAGE_REF_SCHEMA, resolve_image, validate_image_bytes
from vlmserve.gateway.limits import inflight_group
from vlmserve.gateway.routes.openai import OpenAIRoute

log = logging.getLogger("vlmserve.gateway")

router = APIRouter(dependencies=[Depends(require_api_key)])

M = TypeVar("M", bound=BaseModel)

MAX_PROMPT_CHARS = 2000
MAX_LANGUAGE_CHARS = 64


def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


# --- OpenAI: /v1/chat/completions and /v1/completions ----------------------------------------------------

# Validation errors on these routes are OpenAI's 400 invalid_request_error, with the field as ``param``.
openai_router = APIRouter(dependencies=[Depends(require_api_key)], route_class=OpenAIRoute)


@openai_router.post("/v1/chat/completions", tags=["OpenAI"], response_model=None,
                    openapi_extra=inflight_group("chat"))
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           chat: ChatService = Depends(get_chat)) -> dict[str, Any] | StreamingResponse:
    """OpenAI chat completions; ``stream: true`` answers with server-sent ``chat.completion.chunk`` events.

    ``n`` choices share the prompt's prefill; ``logprobs``/``top_logprobs``, ``presence_penalty``,
    ``frequency_penalty``, ``repetition_penalty`` and ``response_format`` (``json_object``, ``json_schema``) act
    per choice, inside the running batch.
    """
    info = await chat.model(request, body.model)
    params = body.to_generation_parameters(info.contract(ChatParams))
    messages = [m.model_dump(mode="json", exclude_none=True) for m in body.messages]
    job = await chat.prepare(info, messages, params)
    answer = Answer(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), source_model(info), "chat.completion",
                    bool(body.logprobs))
    if not body.stream:
        return answer.whole(await run_cancellable(request, chat.complete(request, info, job)))
    return await _stream(request, chat, info, job, answer, body.stream_options)


@openai_router.post("/v1/completions", tags=["OpenAI"], response_model=None, openapi_extra=inflight_group("chat"))
async def completions(body: CompletionRequest, request: Request,
                      chat: ChatService = Depends(get_chat)) -> dict[str, Any] | StreamingResponse:
    """OpenAI legacy text completions on the chat models: the prompt goes in as is (no chat template), as
    ``lm-eval``-style harnesses expect. A list of prompts gives ``len(prompt) x n`` choices."""
    if body.echo:
        raise APIError(400, "echo is not supported", code="unsupported_parameter", param="echo")
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported by these models", code="unsupported_parameter",
                       param="suffix")
    if body.best_of not in (None, 1, body.n or 1):
        raise APIError(400, "best_of must equal n (server-side reranking is not supported)",
                       code="unsupported_parameter", param="best_of")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if any(not p for p in prompts):
        raise APIError(400, "prompt must be non-empty text", param="prompt")
    info = await chat.model(request, body.model)
    params = body.to_generation_parameters(info.contract(ChatParams))
    jobs = [await chat.prepare(info, None, params, prompt=p) for p in prompts]
    answer = Answer(f"cmpl-{uuid.uuid4().hex}", int(time.time()), source_model(info), "text_completion",
                    body.logprobs is not None)
    n = params.n
    if len(prompts) == 1:
        if body.stream:
            return await _stream(request, chat, info, jobs[0], answer, body.stream_options)
        return answer.whole(await run_cancellable(request, chat.complete(request, info, jobs[0])))
    if body.stream:
        raise APIError(400, "stream with a list of prompts is not supported; send one prompt per request",
                       code="unsupported_parameter", param="stream")
    # Several prompts: one request each, all at once (they join the same running batch).
    results = await run_cancellable(request, asyncio.gather(*(chat.complete(request, info, job) for job in jobs)))
    merged = Completion(info, [], Usage(), max(r.latency_ms for r in results))
    prompt_tokens = completion_tokens = 0
    for p, result in enumerate(results):
        for choice in result.choices:
            choice.index += p * n
            merged.choices.append(choice)
        prompt_tokens += result.usage.prompt_tokens
        completion_tokens += result.usage.completion_tokens
    merged.usage = Usage(prompt_tokens, completion_tokens)
    return answer.whole(merged)


@dataclass
class Answer:
    """How one OpenAI response is written: chat (``message``/``delta``, logprobs ``{"content": [...]}``) or legacy
    completions (``text``, logprobs ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``)."""

    id: str
    created: int
    model: str
    kind: str  # chat.completion | text_completion
    logprobs: bool

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def _logprobs(self, entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        entries = entries or []
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def whole(self, result: Completion) -> dict[str, Any]:
        choices = []
        for c in result.choices:
            body: dict[str, Any] = {"index": c.index}
            if self.chat:
                body["message"] = {"role": "assistant", "content": c.text}
            else:
                body["text"] = c.text
            body["logprobs"] = self._logprobs(c.logprobs)
            body["finish_reason"] = c.finish_reason
            choices.append(body)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": result.usage.as_openai()}

    def chunk(self, index: int, text: str | None, finish: str | None, logprobs: list[dict[str, Any]] | None = None,
              role: bool = False, offset: int = 0) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(logprobs, offset) if logprobs is not None else None
        choice["finish_reason"] = finish
        return {"id": self.id, "object": f"{self.kind}.chunk" if self.chat else self.kind, "created": self.created,
                "model": self.model, "choices": [choice]}


async def _stream(request: Request, chat: ChatService, info: ModelInfo, job: ChatJob, answer: Answer,
                  options: StreamOptions | None) -> StreamingResponse:
    deltas = chat.stream(request, info, job)
    choices = job.choices

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
    include_usage = bool(options and options.include_usage)
    events = _sse_events(first, deltas, answer=answer, choices=choices, include_usage=include_usage,
                         triton_name=info.name)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse_events(first: Delta, deltas: AsyncGenerator[Delta, None], *, answer: Answer, choices: int,
                      include_usage: bool, triton_name: str) -> AsyncIterator[str]:
    def event(payload: dict[str, Any]) -> str:
        if include_usage:
            payload["usage"] = None  # OpenAI sends null on every chunk but the last when usage is asked for
        return _sse(payload)

    try:
        if answer.chat:
            for index in range(choices):  # each choice opens with its role, as OpenAI and vLLM send it
                yield event(answer.chunk(index, None, None, role=True))
        offsets = [0] * choices
        finished: set[int] = set()
        delta, usage = first, None
        while True:
            if delta.text or delta.logprobs:
                yield event(answer.chunk(delta.index, delta.text, None, delta.logprobs,
                                         offset=offsets[delta.index] if 0 <= delta.index < choices else 0))
                if 0 <= delta.index < choices:
                    offsets[delta.index] += len(delta.text)
            if delta.finish_reason:
                finished.add(delta.index)
                yield event(answer.chunk(delta.index, None, delta.finish_reason))
            usage = delta.usage or usage
            if len(finished) >= choices or delta.usage is not None:
                break
            try:
                delta = await deltas.__anext__()
            except StopAsyncIteration:
                raise APIError(502, f"{triton_name} ended its answer without a finish reason",
                               code="inference_failed") from None
        if include_usage:
            totals = usage.as_openai() if usage else {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            yield _sse({"id": answer.id, "object": f"{answer.kind}.chunk" if answer.chat else answer.kind,
                        "created": answer.created, "model": answer.model, "choices": [], "usage": totals})
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


router.include_router(openai_router)


# --- the Qwen2-VL OCR service: /ocr and /info -------------------------------------------------------------------------


SCHEMA_HELP = ("vlmserve extension: a JSON Schema; the text is then read into JSON that matches it (constrained "
               "decoding), returned as 'json' (null when max_tokens cut it off; see finish_reason)")


class OcrRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"image": EXAMPLE_IMAGE}]})

    image: str = Field(..., description="base64 of an image file, a data URI or an http(s) URL",
                       json_schema_extra=IMAGE_REF_SCHEMA)
    language: str = Field("auto", description="'auto' or the text's language (e.g. 'russian'): a hint")
    model: str | None = Field(None, description="chat model; default: Qwen2-VL if loaded, else the first")
    max_tokens: int | None = Field(None, description="answer length cap; default: the model's (MAX_NEW_TOKENS)")
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description=SCHEMA_HELP)


async def _read_text(request: Request, chat: ChatService, info: ModelInfo, image: bytes, language: str | None,
                     max_tokens: int | None, schema: dict[str, Any] | None) -> tuple[Completion, dict[str, Any]]:
    """OCR through a chat model; with ``schema``, constrained to JSON matching it (``json``/``finish_reason``)."""
    prompt = ocr_prompt(language)
    if schema is None:
        return await chat.ask_about_image(request, info, image, prompt, max_tokens), {}
    prompt = (f"{prompt} Put what you read into one JSON object that matches this JSON schema: "
              f"{json.dumps(schema)}")
    result = await chat.ask_about_image(request, info, image, prompt, max_tokens,
                                        response_format={"type": "json_schema", "schema": schema})
    try:
        parsed = json.loads(result.text) if result.finish_reason == "stop" else None
    except ValueError:
        parsed = None  # only a stop string can cut a constrained answer short of its closing brace
    return result, {"json": parsed, "finish_reason": result.finish_reason}


@router.post("/ocr", tags=["OCR service API"], openapi_extra=inflight_group("chat"))
async def ocr(body: OcrRequest, request: Request, chat: ChatService = Depends(get_chat)) -> dict[str, Any]:
    """The Qwen2-VL OCR service: the text in an image, read by a chat model (``schema``: as JSON matching it)."""
    language = _check_language(body.language)
    image, _ = await _resolve(request, body.image, "image")
    info = await chat.model(request, body.model, surface="ocr")
    result, structured = await _read_text(request, chat, info, image, language, body.max_tokens, body.json_schema)
    return {"text": result.text.strip(), "language": language, "model": source_model(info),
            "latency_ms": result.latency_ms, **structured}


@router.get("/info", tags=["OCR service API"])
async def model_info(request: Request, chat: ChatService = Depends(get_chat)) -> dict[str, Any]:
    """Every client-facing model Triton serves (embeddings, Florence-2, chat) and the gateway's limits."""
    registry = await chat.registry()
    settings = request.app.state.settings
    models = []
    for m in registry.models.values():
        p = m.params
        if p is None or p.role != "client":
            continue
        models.append({
            "id": source_model(m),
            "triton_model": m.name,
            "family": m.family,
            "task": m.task,
            "weights": m.declared("weights"),
            "ready": m.ready,
            "device": m.device,
            "runtime": m.declared("runtime"),
            "precision": m.declared("precision"),
            "supports_video": isinstance(p, ChatParams) and p.supports_video,
            "max_new_tokens_limit": p.max_new_tokens_limit if isinstance(p, ChatParams | FlorenceParams) else None,
        })
    default = registry.default(CHAT_TASK, "ocr")
    return {
        "models": models,
        # The Qwen2-VL OCR service's /info described its one model: the one /ocr uses by default.
        "model": source_model(default) if default else None,
        "max_new_tokens": default.contract(ChatParams).default_max_new_tokens if default else None,
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_video_bytes": settings.max_video_bytes,
            "max_images_per_request": settings.max_images_per_request,
            "max_items": settings.max_items,
            # In-flight caps per route group (beyond them 429): bulk clients size their concurrency from them.
            **{f"max_inflight_{group}": cap for group, cap in settings.inflight_caps().items()},
        },
        "version": request.app.version,
    }


# --- the SmolVLM2 service: /v1/ocr and /v1/describe_region ------------------------------------------------------------


class OcrV1Request(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"image": EXAMPLE_IMAGE}]})

    image: str | None = Field(None, description="base64 of an image file, a data URI or an http(s) URL "
                                                "(or upload it as multipart 'file')")
    model: str | None = None
    language: str | None = Field(None, description="optional hint: the text's language")
    max_tokens: int | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description=SCHEMA_HELP)


_BOX_TEXT: JsonDict = {"type": "string", "pattern": BOX_PATTERN}
BOX_SCHEMA: JsonDict = {"anyOf": [_BOX_TEXT, {"type": "array", "items": {"type": "number"}, "minItems": 4,
                                               "maxItems": 4}]}


class DescribeRegionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore",
                              json_schema_extra={"examples": [{"image": EXAMPLE_IMAGE, "box": "4,4,28,28"}]})

    image: str | None = Field(None, description="base64 of an image file, a data URI or an http(s) URL "
                                                "(or upload it as multipart 'file')")
    box: Any = Field(..., description="'x1,y1,x2,y2' in pixels of the (upright) image, x1 < x2, y1 < y2, inside "
                     "the image (or a list of the four numbers)", json_schema_extra=BOX_SCHEMA)
    model: str | None = None
    prompt: str | None = Field(None, description="what to ask about the region; default: describe the object")
    max_tokens: int | None = None


def _body_schema(model: type[BaseModel], form: dict[str, Any], *required: str) -> dict[str, Any]:
    # The routes read JSON or multipart themselves, so the OpenAPI page is told about both here. The model's
    # 'image' is optional only for the form (which may upload 'file' instead): a JSON body needs it.
    json_schema = model.model_json_schema()
    json_schema["properties"]["image"] = {**json_schema["properties"]["image"], "type": "string",
                                          **IMAGE_REF_SCHEMA}
    json_schema["properties"]["image"].pop("anyOf", None)
    json_schema["required"] = ["image", *json_schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_schema},
        "multipart/form-data": {"schema": {"type": "object", "properties": form, "required": ["file", *required]}},
    }}}


_FILE = {"type": "string", "format": "binary", "description": "the image file"}
_STR = {"type": "string"}


@router.post("/v1/ocr", tags=["SmolVLM2 service API"], response_model=None,
             openapi_extra=_body_schema(OcrV1Request, {"file": _FILE, "model": _STR, "language": _STR})
             | inflight_group("chat"))
async def ocr_v1(request: Request, fmt: Literal["json", "txt"] | None = Query(None, alias="format"),
                 chat: ChatService = Depends(get_chat)) -> dict[str, Any] | Response:
    """The SmolVLM2 service's OCR: plain text (JSON, or ``?format=txt`` / ``Accept: text/plain`` for a .txt
    download)."""
    body, image, _ = await _image_request(request, OcrV1Request)
    language = _check_language(body.language) if body.language else None
    info = await chat.model(request, body.model)
    result, structured = await _read_text(request, chat, info, image, language, body.max_tokens, body.json_schema)
    text = result.text.strip()
    filename = f"ocr_result_{datetime.now().strftime('%Y%m%d_%H%M%S')}.txt"
    if _wants_text(request, fmt):
        return PlainTextResponse(text, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    return {"text": text, "model": source_model(info), "latency_ms": result.latency_ms, "filename": filename,
            **structured}


@router.post("/v1/describe_region", tags=["SmolVLM2 service API"],
             openapi_extra=_body_schema(DescribeRegionRequest, {"file": _FILE, "box": _BOX_TEXT,
                                                                "model": _STR, "prompt": _STR}, "box")
             | inflight_group("chat"))
async def describe_region(request: Request, chat: ChatService = Depends(get_chat)) -> dict[str, Any]:
    """The SmolVLM2 service: describe the object inside ``box`` (``x1,y1,x2,y2``, strictly validated)."""
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
