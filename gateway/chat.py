"""Chat logic behind ``/v1/chat/completions`` and the chat models' service routes (``/ocr``, ``/v1/ocr``,
``/v1/describe_region``).

It turns OpenAI-style requests into the chat models' Triton contract (``MESSAGES`` or ``PROMPT``, and
``PARAMETERS`` as JSON; answers streamed back as ``TEXT`` / ``FINISH_REASON`` / ``USAGE`` / ``INDEX`` /
``LOGPROBS``), and checks everything a client can get wrong before Triton sees it, so mistakes come back as 4xx
with the offending field named.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
from fastapi import Request
from PIL import Image, ImageOps

from vlmserve.families.contract import ChatParams
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.images import ImageInputError, ImagePolicy, resolve_image
from vlmserve.gateway.limits import batch_priority
from vlmserve.gateway.media import resolve_video, video_policy
from vlmserve.gateway.settings import GatewaySettings
from vlmserve.gateway.triton import InferenceBackend, ModelInfo, Registry, live_registry, use_model

__all__ = [
    "BOX_PATTERN",
    "CHAT_TASK",
    "ChatLimits",
    "Choice",
    "ChatService",
    "Completion",
    "Delta",
    "OCR_INSTRUCTION",
    "REGION_PROMPT",
    "Sampling",
    "Usage",
    "build_inputs",
    "crop_region",
    "ocr_prompt",
    "parse_box",
    "parse_delta",
    "run_cancellable",
    "source_model",
    "translate_messages",
]

log = logging.getLogger("vlmserve.gateway")

CHAT_TASK = "chat"
OUTPUTS = ["TEXT", "FINISH_REASON", "USAGE", "INDEX", "LOGPROBS"]
# The request's last response carries USAGE (with n > 1 each choice ends with a FINISH_REASON first).
FINAL_OUTPUT = "USAGE"
# OpenAI's "developer" role is its newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # what the chat models accept (model_repository/chat.py), and OpenAI's own limit
MAX_VIDEO_FPS = 30.0
OCR_INSTRUCTION = "Extract all text from this image. Return only the text, no commentary."
REGION_PROMPT = "Describe the object shown in this image region in one or two sentences."
# Vision processors refuse very small or very thin images (Qwen2-VL needs 28 px per side); crops are upscaled or
# padded to at least this size so any valid box can be described.
MIN_CROP_SIDE = 64
MAX_CROP_UPSCALE_SIDE = 1024

T = TypeVar("T")


# --- limits and sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatLimits:
    """What one served chat model accepts, from its Triton config ``parameters``."""

    max_new_tokens_limit: int = 1024
    default_max_new_tokens: int | None = None
    supports_video: bool = False
    max_video_frames: int = 8
    max_images: int | None = None
    max_batch: int = 8

    @classmethod
    def of(cls, info: ModelInfo) -> ChatLimits:
        params = info.contract(ChatParams)
        return cls(max_new_tokens_limit=params.max_new_tokens_limit,
                   default_max_new_tokens=params.default_max_new_tokens, supports_video=params.supports_video,
                   max_video_frames=params.max_video_frames, max_images=params.max_images,
                   max_batch=params.max_batch)


@dataclass
class Sampling:
    """Generation settings sent as ``PARAMETERS`` (None = the model's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    video_fps: float | None = None
    video_max_frames: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None  # vlmserve.api.openai.grammar_spec

    @property
    def choices(self) -> int:
        return self.n or 1

    def check(self, limits: ChatLimits) -> None:
        """Raise APIError 400 naming the field that is out of range."""
        if self.max_tokens is not None and not 1 <= self.max_tokens <= limits.max_new_tokens_limit:
            raise APIError(400, f"max_tokens must be 1..{limits.max_new_tokens_limit} for this model, "
                                f"got {self.max_tokens}", code="invalid_value", param="max_tokens")
        if self.temperature is not None and not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise APIError(400, f"temperature must be 0..2, got {self.temperature}", code="invalid_value",
                           param="temperature")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise APIError(400, f"top_p must be in (0, 1], got {self.top_p}", code="invalid_value", param="top_p")
        if self.stop is not None:
            if len(self.stop) > MAX_STOP:
                raise APIError(400, f"stop takes at most {MAX_STOP} sequences, got {len(self.stop)}",
                               code="invalid_value", param="stop")
            if any(not s for s in self.stop):
                raise APIError(400, "stop sequences must be non-empty strings", code="invalid_value", param="stop")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise APIError(400, "seed must fit in a signed 64-bit integer", code="invalid_value", param="seed")
        if self.video_fps is not None and not (math.isfinite(self.video_fps)
                                               and 0 < self.video_fps <= MAX_VIDEO_FPS):
            raise APIError(400, f"video_fps must be in (0, {MAX_VIDEO_FPS:g}], got {self.video_fps}",
                           code="invalid_value", param="video_fps")
        if self.video_max_frames is not None and not 1 <= self.video_max_frames <= limits.max_video_frames:
            raise APIError(400, f"video_max_frames must be 1..{limits.max_video_frames} for this model, "
                                f"got {self.video_max_frames}", code="invalid_value", param="video_max_frames")
        if self.n is not None and not 1 <= self.n <= limits.max_batch:
            raise APIError(400, f"n must be 1..{limits.max_batch} for this model (each choice is a row of its batch), "
                                f"got {self.n}", code="invalid_value", param="n")

    def to_json(self) -> dict[str, Any]:
        values = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
            "seed": self.seed, "video_fps": self.video_fps, "video_max_frames": self.video_max_frames,
            "n": self.n if self.n != 1 else None, "presence_penalty": self.presence_penalty or None,
            "frequency_penalty": self.frequency_penalty or None,
            "repetition_penalty": self.repetition_penalty if self.repetition_penalty not in (None, 1.0) else None,
            "logprobs": self.logprobs or None, "top_logprobs": self.top_logprobs or None,
            "response_format": self.response_format,
        }
        return {k: v for k, v in values.items() if v is not None}


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
    limits: ChatLimits,
    max_media: int,
    model_name: str,
) -> list[dict[str, Any]]:
    """OpenAI chat ``messages`` as the Triton ``MESSAGES`` list: images and videos fetched, checked, base64'd.

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


def cancel_request(request_id: str) -> dict[str, np.ndarray]:
    """The inputs of a request that makes a chat model end its request ``request_id`` (model_repository/chat.py:
    no MESSAGES/PROMPT, ``PARAMETERS`` ``{"cancel": id}``; answered with a final flag only)."""
    return {"PARAMETERS": _bytes_tensor(json.dumps({"cancel": request_id}))}


def build_inputs(messages: list[dict[str, Any]] | None, sampling: Sampling | None = None,
                 prompt: str | None = None) -> dict[str, np.ndarray]:
    """The Triton inputs: ``MESSAGES`` (or ``PROMPT``, raw text) and, when any setting is given, ``PARAMETERS``
    (BYTES [1], JSON)."""
    if prompt is not None:
        inputs = {"PROMPT": _bytes_tensor(prompt)}
    else:
        inputs = {"MESSAGES": _bytes_tensor(json.dumps(messages, ensure_ascii=False))}
    params = sampling.to_json() if sampling is not None else {}
    if batch_priority.get():
        params["priority"] = "batch"  # the model admits this request's rows after the interactive ones
    if params:
        inputs["PARAMETERS"] = _bytes_tensor(json.dumps(params))
    return inputs


def _bytes_tensor(text: str) -> np.ndarray:
    return np.array([text.encode("utf-8")], dtype=np.object_)


# --- responses --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Token counts from the model's final ``USAGE``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Delta:
    """One streamed response of choice ``index``: new text (and its tokens' log probabilities when asked); when
    the choice ends, its finish reason; on the request's last response, the usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None


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


def parse_delta(values: Mapping[str, np.ndarray]) -> Delta:
    """One Triton response (``TEXT``, ``FINISH_REASON``, ``USAGE``, ``INDEX``, ``LOGPROBS``) as a :class:`Delta`."""
    text = _first_str(values.get("TEXT"))
    index_array = values.get("INDEX")
    index = int(index_array.reshape(-1)[0]) if index_array is not None and index_array.size else 0
    raw_logprobs = _first_str(values.get("LOGPROBS"))
    logprobs = None
    if raw_logprobs:
        try:
            logprobs = json.loads(raw_logprobs)
        except ValueError:
            log.warning("chat model sent unreadable LOGPROBS: %.200r", raw_logprobs)
    finish = _first_str(values.get("FINISH_REASON")) or None
    raw_usage = _first_str(values.get("USAGE"))
    usage = None
    if raw_usage:
        try:
            data = json.loads(raw_usage)
            usage = Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0)),
                          int(data["batch_size"]) if data.get("batch_size") is not None else None)
        except (ValueError, TypeError, AttributeError):
            # Token counts are bookkeeping; a malformed USAGE must not throw away the answer itself.
            log.warning("chat model sent an unreadable USAGE: %.200r", raw_usage)
            usage = Usage()
    return Delta(text, finish, usage, index, logprobs)


def _first_str(array: np.ndarray | None) -> str:
    if array is None or array.size == 0:
        return ""
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


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


class ChatService:
    """Finds chat models in Triton's registry and runs requests on them (streamed or aggregated)."""

    def __init__(self, settings: GatewaySettings, backend: InferenceBackend, http: httpx.AsyncClient | None) -> None:
        self.settings = settings
        self.backend = backend
        self.http = http

    async def registry(self) -> Registry:
        return await live_registry(self.backend)

    async def model(self, request: Request, name: str | None, surface: str = "chat") -> ModelInfo:
        """The chat model ``name`` (source id, family or Triton name); None = the ``surface``'s default family's.

        404 lists the served chat models; 503 while it is loading.
        """
        registry = await self.registry()
        return use_model(request, registry.find(CHAT_TASK, name, surface), self.settings.retry_after_s)

    async def prepare(self, info: ModelInfo, messages: Any, sampling: Sampling,
                      prompt: str | None = None) -> dict[str, np.ndarray]:
        """Validate and translate a request for ``info`` (``messages``, or a raw text ``prompt``): the Triton
        inputs to send."""
        limits = ChatLimits.of(info)
        sampling.check(limits)
        if prompt is not None:
            return build_inputs(None, sampling, prompt=prompt)
        max_media = self.settings.max_images_per_request
        if limits.max_images is not None:
            max_media = min(max_media, limits.max_images)
        image_policy = self.settings.image_policy()
        translated = await translate_messages(
            messages, image_policy=image_policy,
            video_policy=video_policy(image_policy, self.settings.max_video_bytes),
            http=self.http, limits=limits, max_media=max_media, model_name=source_model(info),
        )
        return build_inputs(translated, sampling)

    async def stream(self, request: Request, info: ModelInfo, inputs: dict[str, np.ndarray],
                     choices: int = 1) -> AsyncGenerator[Delta, None]:
        """The answer as deltas; it ends after every one of the ``choices`` has had its ``finish_reason`` (the
        last delta usually has ``usage``).

        Close it (``aclose``) to abandon the answer: the model ends the request at its next step (a
        ``{"cancel": request id}`` request down the same stream, :func:`cancel_request`).
        """
        request.app.state.metrics.items.labels(info.name).inc()
        responses = self.backend.stream(info.name, inputs, OUTPUTS, final_output=FINAL_OUTPUT,
                                        cancel_inputs=cancel_request)
        finished: set[int] = set()
        try:
            async for values in responses:
                delta = parse_delta(values)
                yield delta
                if delta.finish_reason:
                    finished.add(delta.index)
                if len(finished) >= choices or delta.usage is not None:
                    return
        finally:
            # Closed here, not left to garbage collection, so an abandoned answer is cancelled right away.
            await responses.aclose()

    async def complete(self, request: Request, info: ModelInfo, inputs: dict[str, np.ndarray],
                       choices: int = 1) -> Completion:
        """The whole answer (the stream aggregated, per choice)."""
        timer = _Timer()
        answers = [Choice(i) for i in range(choices)]
        texts: list[list[str]] = [[] for _ in range(choices)]
        usage = None
        deltas = self.stream(request, info, inputs, choices)
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
        sampling = Sampling(max_tokens=max_tokens, response_format=response_format)
        sampling.check(ChatLimits.of(info))
        messages = [{"role": "user", "content": [
            {"type": "image", "data": base64.b64encode(image).decode("ascii")},
            {"type": "text", "text": prompt},
        ]}]
        return await run_cancellable(request, self.complete(request, info, build_inputs(messages, sampling)))


def source_model(info: ModelInfo) -> str:
    """The id clients know a model by: its checkpoint (``source_model``), else its Triton name."""
    return info.params.get("source_model") or info.name


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
