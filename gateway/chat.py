"""Chat logic behind ``/v1/chat/completions`` and the chat models' service routes (``/ocr``, ``/v1/ocr``,
``/v1/describe_region``).

It turns OpenAI-style requests into a conversation (media fetched, checked, inlined) and the model's
``GenerationParameters``, hands them to the engine's :class:`~vlmserve.gateway.engines.Generator`, and checks
everything a client can get wrong before the engine sees it, so mistakes come back as 4xx with the offending field
named.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import Request
from PIL import Image, ImageOps

from vlmserve.api.openai import GenerationParameters, max_tokens_for
from vlmserve.families.contract import ChatParams
from vlmserve.gateway.engines import (
    Delta,
    Generator,
    ModelInfo,
    ModelRegistry,
    Registry,
    Usage,
    live_registry,
    use_model,
)
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.images import ImageInputError, ImagePolicy, resolve_image
from vlmserve.gateway.limits import batch_priority
from vlmserve.gateway.media import resolve_video, video_policy
from vlmserve.gateway.settings import GatewaySettings

__all__ = [
    "BOX_PATTERN",
    "CHAT_TASK",
    "ChatJob",
    "Choice",
    "ChatService",
    "Completion",
    "Delta",
    "OCR_INSTRUCTION",
    "REGION_PROMPT",
    "Usage",
    "crop_region",
    "ocr_prompt",
    "parse_box",
    "run_cancellable",
    "with_priority",
    "source_model",
    "translate_messages",
]

log = logging.getLogger("vlmserve.gateway")

CHAT_TASK = "chat"
# OpenAI's "developer" role is its newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
OCR_INSTRUCTION = "Extract all text from this image. Return only the text, no commentary."
REGION_PROMPT = "Describe the object shown in this image region in one or two sentences."
# Vision processors refuse very small or very thin images (Qwen2-VL needs 28 px per side); crops are upscaled or
# padded to at least this size so any valid box can be described.
MIN_CROP_SIDE = 64
MAX_CROP_UPSCALE_SIDE = 1024

T = TypeVar("T")


# --- messages ---------------------------------------------------------------------------------------------


@dataclass
class _Media:
    kind: str  # "image" | "video"
    ref: str
    where: str


async def translate_messages(
    messages: Any,
    *,
    image_policy: ImagePolicy,
    video_policy: ImagePolicy,
    http: httpx.AsyncClient | None,
    limits: ChatParams,
    max_media: int,
    model_name: str,
) -> list[dict[str, Any]]:
    """OpenAI chat ``messages`` as the conversation the chat models take: media fetched, checked, base64'd.

    Content is a string or a list of parts: ``text``, ``image_url`` (``{"url": data URI | http(s) URL}``) and
    ``video_url`` (same, a video). Raises APIError (400/413/415) naming the offending message and part.
    """
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out: list[dict[str, Any]] = []
    media: list[tuple[dict[str, Any], _Media]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role {role!r} is not supported; use system, user or assistant",
                           param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": ROLES[role], "content": content})
            continue
        if content is None:
            raise APIError(400, f"{where}.content is missing (tool calls are not supported)",
                           param=f"{where}.content")
        if not isinstance(content, list) or not content:
            raise APIError(400, f"{where}.content must be a string or a non-empty list of parts",
                           param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            part_where = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")  # type: ignore[union-attr]
                if not isinstance(text, str):
                    raise APIError(400, f"{part_where}.text must be a string", param=f"{part_where}.text")
                parts.append({"type": "text", "text": text})
            elif kind in ("image_url", "video_url"):
                assert isinstance(part, dict)
                kind_name = "image" if kind == "image_url" else "video"
                if ROLES[role] != "user":
                    raise APIError(400, f"{part_where}: {kind_name}s are only accepted in user messages",
                                   param=part_where)
                if kind_name == "video" and not limits.supports_video:
                    raise APIError(400, f"{part_where}: model {model_name} does not accept video "
                                        "(supports_video is false); send frames as images instead",
                                   code="video_not_supported", param=part_where)
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url.strip():
                    raise APIError(400, f"{part_where}.{kind}.url must be a data URI or an http(s) URL",
                                   param=f"{part_where}.{kind}.url")
                slot: dict[str, Any] = {"type": kind_name}
                parts.append(slot)
                media.append((slot, _Media(kind_name, url, f"{part_where}.{kind}.url")))
            else:
                shown = f"type {kind!r}" if kind is not None else "a part without 'type'"
                raise APIError(400, f"{part_where}: {shown} is not supported; parts are text, image_url or "
                                    "video_url", param=f"{part_where}.type")
        out.append({"role": ROLES[role], "content": parts})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must be from the user or system, not the assistant",
                       param=f"messages[{len(out) - 1}].role")
    # Counted before anything is fetched, so an oversized request costs no downloads.
    if len(media) > max_media:
        raise APIError(413, f"{len(media)} images/videos in the request; at most {max_media} "
                            "(max_images_per_request)", code="too_many_images", param="messages")

    async def load(item: _Media) -> str:
        try:
            if item.kind == "image":
                data = await resolve_image(item.ref, image_policy, http)
            else:
                data = await resolve_video(item.ref, video_policy, http)
        except ImageInputError as exc:
            raise ImageInputError(f"{item.where}: {exc.message}", exc.status, item.where,
                                  f"invalid_{item.kind}") from None
        return base64.b64encode(data).decode("ascii")

    encoded = await asyncio.gather(*(load(m) for _, m in media))
    for (slot, _), data in zip(media, encoded, strict=True):
        slot["data"] = data
    return out


@dataclass
class Choice:
    """One choice of a whole answer."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Completion:
    """A whole answer (every choice), aggregated from the stream."""

    model: ModelInfo
    choices: list[Choice]
    usage: Usage
    latency_ms: float = 0.0

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason or ""


# --- service-route helpers: OCR and regions -----------------------------------------------------------------------


def ocr_prompt(language: str | None) -> str:
    """The OCR instruction, with a language hint unless ``language`` is empty or ``auto``."""
    if language and language.strip().lower() != "auto":
        return f"{OCR_INSTRUCTION} The text is in {language.strip()}."
    return OCR_INSTRUCTION


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# What parse_box accepts as text, as one regular expression (the OpenAPI schema states it).
BOX_PATTERN = "^" + ",".join([rf"\s*{_NUMBER_RE.pattern}\s*"] * 4) + "$"


def parse_box(box: Any, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Strictly parse ``"x1,y1,x2,y2"`` (pixels, spaces allowed) inside an image of ``size`` (width, height).

    A list of four numbers is accepted too. Raises APIError 422 (param ``box``) whose message names the rule
    that failed: four comma-separated values, each a number, x1 < x2, y1 < y2, inside the image.
    """
    hint = "expected four numbers separated by commas: x1,y1,x2,y2 (pixels)"
    if isinstance(box, str):
        raw = [v.strip() for v in box.split(",")]
        if len(raw) != 4:
            count = 0 if not box.strip() else len(raw)
            raise _box_error(f"box must have exactly four values, got {count}; {hint}")
        values = []
        for name, text in zip(("x1", "y1", "x2", "y2"), raw, strict=True):
            if not _NUMBER_RE.fullmatch(text):
                raise _box_error(f"box value {name}={text!r} is not a number; {hint}")
            values.append(float(text))
    elif isinstance(box, list | tuple):
        if len(box) != 4:
            raise _box_error(f"box must have exactly four values, got {len(box)}; {hint}")
        values = []
        for name, value in zip(("x1", "y1", "x2", "y2"), box, strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _box_error(f"box value {name}={value!r} is not a number; {hint}")
            values.append(float(value))
    else:
        raise _box_error(f"box must be a string; {hint}")
    x1, y1, x2, y2 = values
    if not x1 < x2:
        raise _box_error(f"box x1 must be less than x2 (got x1={x1:g}, x2={x2:g})")
    if not y1 < y2:
        raise _box_error(f"box y1 must be less than y2 (got y1={y1:g}, y2={y2:g})")
    width, height = size
    for name, value, low, high in (("x1", x1, 0, width), ("y1", y1, 0, height), ("x2", x2, 0, width),
                                   ("y2", y2, 0, height)):
        if not low <= value <= high:
            axis = "width" if name[0] == "x" else "height"
            raise _box_error(f"box must lie inside the {width}x{height} image: {name}={value:g} is outside "
                             f"0..{high} (the image {axis})")
    return x1, y1, x2, y2


def _box_error(message: str) -> APIError:
    return APIError(422, message, code="invalid_box", param="box")


def crop_region(image: bytes, box: tuple[float, float, float, float]) -> bytes:
    """The region of the upright (EXIF-applied) image as PNG, enlarged/padded so a model can read it."""
    with Image.open(io.BytesIO(image)) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")
    x1, y1, x2, y2 = box
    # floor/ceil keep every pixel the box touches, so a valid box never collapses to zero width.
    left, top = math.floor(x1), math.floor(y1)
    right, bottom = max(math.ceil(x2), left + 1), max(math.ceil(y2), top + 1)
    crop = upright.crop((left, top, right, bottom))
    short = min(crop.size)
    if short < MIN_CROP_SIDE:
        scale = min(MIN_CROP_SIDE / short, MAX_CROP_UPSCALE_SIDE / max(crop.size))
        if scale > 1:
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                               Image.Resampling.BICUBIC)
    if min(crop.size) < MIN_CROP_SIDE:
        canvas = Image.new("RGB", (max(crop.width, MIN_CROP_SIDE), max(crop.height, MIN_CROP_SIDE)), (255, 255, 255))
        canvas.paste(crop, ((canvas.width - crop.width) // 2, (canvas.height - crop.height) // 2))
        crop = canvas
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return buf.getvalue()


# --- the service -------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    start: float = field(default_factory=time.perf_counter)

    def ms(self) -> float:
        return round((time.perf_counter() - self.start) * 1000, 3)


@dataclass(frozen=True)
class ChatJob:
    """One generation, ready for the engine: a conversation (media inline) or a raw prompt, and its parameters."""

    params: GenerationParameters
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None

    @property
    def choices(self) -> int:
        return self.params.n


class ChatService:
    """Finds chat models in the engine's registry and runs requests on them (streamed or aggregated)."""

    def __init__(self, settings: GatewaySettings, registry: ModelRegistry, generator: Generator,
                 http: httpx.AsyncClient | None) -> None:
        self.settings = settings
        self.engine = registry
        self.generator = generator
        self.http = http

    async def registry(self) -> Registry:
        return await live_registry(self.engine)

    async def model(self, request: Request, name: str | None, surface: str = "chat") -> ModelInfo:
        """The chat model ``name`` (source id, family or engine name); None = the ``surface``'s default family's.

        404 lists the served chat models; 503 while it is loading.
        """
        registry = await self.registry()
        return use_model(request, registry.find(CHAT_TASK, name, surface), self.settings.retry_after_s)

    async def prepare(self, info: ModelInfo, messages: Any, params: GenerationParameters,
                      prompt: str | None = None) -> ChatJob:
        """Validate and translate a request for ``info`` (``messages``, or a raw text ``prompt``)."""
        if prompt is not None:
            return ChatJob(params, prompt=prompt)
        limits = info.contract(ChatParams)
        image_policy = self.settings.image_policy()
        translated = await translate_messages(
            messages, image_policy=image_policy,
            video_policy=video_policy(image_policy, self.settings.max_video_bytes),
            http=self.http, limits=limits, max_media=min(self.settings.max_images_per_request, limits.max_images),
            model_name=source_model(info),
        )
        return ChatJob(params, messages=translated)

    async def stream(self, request: Request, info: ModelInfo, job: ChatJob) -> AsyncGenerator[Delta, None]:
        """The answer as deltas; it ends after every one of the job's choices has had its ``finish_reason`` (the
        last delta usually has ``usage``).

        Close it (``aclose``) to abandon the answer: the engine ends the request.
        """
        request.app.state.metrics.items.labels(info.name).inc()
        responses = self.generator.generate(info, with_priority(job.params), messages=job.messages, prompt=job.prompt)
        finished: set[int] = set()
        try:
            async for delta in responses:
                yield delta
                if delta.finish_reason:
                    finished.add(delta.index)
                if len(finished) >= job.choices or delta.usage is not None:
                    return
        finally:
            # Closed here, not left to garbage collection, so an abandoned answer is cancelled right away.
            await responses.aclose()

    async def complete(self, request: Request, info: ModelInfo, job: ChatJob) -> Completion:
        """The whole answer (the stream aggregated, per choice)."""
        timer = _Timer()
        choices = job.choices
        answers = [Choice(i) for i in range(choices)]
        texts: list[list[str]] = [[] for _ in range(choices)]
        usage = None
        deltas = self.stream(request, info, job)
        try:
            async for delta in deltas:
                if not 0 <= delta.index < choices:
                    raise APIError(502, f"{info.name} answered for choice {delta.index} of {choices}",
                                   code="inference_failed")
                answer = answers[delta.index]
                texts[delta.index].append(delta.text)
                if delta.logprobs is not None:
                    answer.logprobs = (answer.logprobs or []) + delta.logprobs
                answer.finish_reason = delta.finish_reason or answer.finish_reason
                usage = delta.usage or usage
        finally:
            await deltas.aclose()
        if any(a.finish_reason is None for a in answers):
            raise APIError(502, f"{info.name} ended its answer without a finish reason", code="inference_failed")
        for answer, parts in zip(answers, texts, strict=True):
            answer.text = "".join(parts)
        return Completion(info, answers, usage or Usage(), timer.ms())

    async def ask_about_image(self, request: Request, info: ModelInfo, image: bytes, prompt: str,
                              max_tokens: int | None = None,
                              response_format: dict[str, Any] | None = None) -> Completion:
        """One user turn: ``image`` then ``prompt``; used by the OCR and region routes (``response_format``: the
        model's grammar spec, for JSON answers)."""
        params = GenerationParameters(max_tokens=max_tokens_for(max_tokens, info.contract(ChatParams)),
                                      response_format=response_format)
        messages = [{"role": "user", "content": [
            {"type": "image", "data": base64.b64encode(image).decode("ascii")},
            {"type": "text", "text": prompt},
        ]}]
        return await run_cancellable(request, self.complete(request, info, ChatJob(params, messages=messages)))


def with_priority(params: GenerationParameters) -> GenerationParameters:
    """``params`` of a Batch API request (``batch_priority``) marked ``batch``: the model admits its rows after
    the interactive ones."""
    return params.model_copy(update={"priority": "batch"}) if batch_priority.get() else params


def source_model(info: ModelInfo) -> str:
    """The id clients know a model by: its checkpoint (``source_model``), else its Triton name."""
    return info.source


async def run_cancellable(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the HTTP client disconnects first; then cancel it (and so the Triton request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        # Nobody reads this answer; the status makes the abandoned request visible in the metrics.
        raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # Only called after the body has been read, so every further message is about the connection.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
