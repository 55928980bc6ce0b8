"""Typed Python client for the gateway's Florence-2 API (replaces seed 000's ``Florence2Client``).

Usage::

    from vlmserve.client import Florence2Client

    with Florence2Client("http://127.0.0.1:8080") as client:
        if client.is_ready():
            print(client.caption("photo.jpg").text)
            for obj in client.detect_objects("photo.jpg").objects:
                print(obj.label, obj.bbox)

The async client has the same methods; await them::

    async with AsyncFlorence2Client("http://127.0.0.1:8080", api_key="...") as client:
        result = await client.segment(image_bytes, "the red car")
        print(result.polygons)

Images can be a file path (``str`` or ``os.PathLike``), raw encoded ``bytes`` or a ``PIL.Image.Image``
(sent as PNG). Every request goes to ``POST /infer/upload`` as a multipart upload.
"""

from __future__ import annotations

import io
import math
import mimetypes
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, NoReturn, Self, TypeAlias, TypeVar

import httpx

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "AsyncFlorence2Client",
    "BBox",
    "DetectedObject",
    "Florence2Client",
    "Florence2Result",
    "ImageInput",
    "TaskInfo",
    "VlmserveBadRequest",
    "VlmserveError",
    "VlmserveUnavailable",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 120.0
MODEL_NAME = "florence2"  # Florence-2's Triton model name, as reported under /health's "models"

BBox: TypeAlias = tuple[float, float, float, float]
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | PILImage.Image"
CaptionDetail: TypeAlias = bool | Literal["detailed", "more_detailed"]

_T = TypeVar("_T")
_R = TypeVar("_R")


# --- errors --------------------------------------------------------------------------------------


class VlmserveError(Exception):
    """An error answer from the gateway (or no answer at all).

    ``status_code`` is the HTTP status (``None`` when the gateway could not be reached); ``message``,
    ``code``, ``error_type`` and ``param`` come from the ``{"error": {...}}`` body; ``retry_after`` is the
    ``Retry-After`` header in seconds, when the gateway sent one.
    """

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 error_type: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message if status_code is None else f"{status_code}: {message}")
        self.message = message
        self.status_code = status_code
        self.code = code
        self.error_type = error_type
        self.param = param
        self.retry_after = retry_after


class VlmserveUnavailable(VlmserveError):
    """The gateway answered 503 (models still loading, overloaded) or could not be reached."""


class VlmserveBadRequest(VlmserveError):
    """The gateway rejected the request (a 4xx answer: bad input, missing or invalid API key, ...)."""


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """One Florence-2 task as listed by ``GET /v1/tasks``."""

    name: str
    token: str
    needs_text: bool
    description: str = ""
    text_hint: str | None = None


@dataclass(frozen=True)
class DetectedObject:
    """A labelled box ``(x1, y1, x2, y2)`` in pixels of the original image."""

    label: str
    bbox: BBox


@dataclass(frozen=True)
class Florence2Result:
    """One Florence-2 answer.

    ``text`` is the raw generated text and ``result`` the parsed answer (a string for caption/OCR tasks,
    a dict for region tasks). The region fields are empty lists when the task has none. ``raw`` is the
    whole JSON answer.
    """

    task: str
    task_token: str
    text: str
    result: Any
    objects: list[DetectedObject] = field(default_factory=list)
    bboxes: list[BBox] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    polygons: list[Any] = field(default_factory=list)
    quad_boxes: list[list[float]] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    latency_ms: float | None = None
    model: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


# --- request building and response parsing (shared by both clients) ------------------------------

_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"GIF87a", "image/gif", ".gif"),
    (b"GIF89a", "image/gif", ".gif"),
    (b"BM", "image/bmp", ".bmp"),
    (b"II*\x00", "image/tiff", ".tif"),
    (b"MM\x00*", "image/tiff", ".tif"),
)
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def _sniff(data: bytes) -> tuple[str, str] | None:
    # (content type, extension) from the leading bytes of an encoded image
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", ".webp"
    for magic, content_type, ext in _MAGIC:
        if data.startswith(magic):
            return content_type, ext
    return None


def _encode_pil(image: PILImage.Image) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image_file(image: ImageInput) -> tuple[str, bytes, str]:
    # the multipart ``file`` part: (filename, bytes, content type)
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        name = None
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        data = path.read_bytes()
        name = path.name
    else:
        wrong_type = TypeError(f"image must be a path, bytes or a PIL.Image.Image, not {type(image).__name__}")
        try:
            from PIL import Image  # optional: only users who pass PIL images need Pillow
        except ImportError:
            raise wrong_type from None
        if not isinstance(image, Image.Image):
            raise wrong_type
        data = _encode_pil(image)
        name = "image.png"
    if not data:
        raise ValueError("image is empty")
    sniffed = _sniff(data)
    if sniffed is not None:
        content_type = sniffed[0]
    else:
        content_type = (mimetypes.guess_type(name)[0] if name else None) or "application/octet-stream"
    if name is None:
        name = "image" + (sniffed[1] if sniffed else "")
    return name, data, content_type


def _caption_task(detailed: CaptionDetail) -> str:
    if detailed is False:
        return "caption"
    if detailed is True or detailed == "more_detailed":
        return "more_detailed_caption"
    if detailed == "detailed":
        return "detailed_caption"
    raise ValueError(f"detailed must be a bool, 'detailed' or 'more_detailed', not {detailed!r}")


def _retry_after(value: str | None) -> float | None:
    # Retry-After is either delta-seconds or an HTTP date
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _error_from_response(response: httpx.Response) -> VlmserveError:
    message: str | None = None
    code = error_type = param = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = None if err.get("message") is None else str(err["message"])
            code, error_type, param = (None if err.get(k) is None else str(err[k]) for k in ("code", "type", "param"))
        elif isinstance(err, str):
            message = err
        elif body.get("detail") is not None:  # plain FastAPI/Starlette errors
            message = str(body["detail"])
    if not message:
        message = response.text.strip() or response.reason_phrase or "error"
    status = response.status_code
    cls = VlmserveUnavailable if status == 503 else VlmserveBadRequest if 400 <= status < 500 else VlmserveError
    return cls(message, status_code=status, code=code, error_type=error_type, param=param,
               retry_after=_retry_after(response.headers.get("retry-after")))


def _json(response: httpx.Response) -> Any:
    # the JSON body of a 2xx answer; the mapped error for anything else
    if not response.is_success:
        raise _error_from_response(response)
    try:
        return response.json()
    except ValueError as exc:
        raise VlmserveError(f"gateway sent invalid JSON: {response.text[:200]!r}",
                            status_code=response.status_code) from exc


def _floats(value: Any) -> list[float]:
    return [float(v) for v in value]


def _bbox(value: Any) -> BBox:
    x1, y1, x2, y2 = _floats(value)
    return (x1, y1, x2, y2)


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key)
    return list(value) if isinstance(value, list | tuple) else []


def _parse_result(response: httpx.Response) -> Florence2Result:
    raw = _json(response)
    if not isinstance(raw, dict):
        raise VlmserveError(f"unexpected answer from the gateway: {raw!r:.200}", status_code=response.status_code)
    try:
        return _result_from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise VlmserveError(f"malformed answer from the gateway ({exc!r}): {raw!r:.200}",
                            status_code=response.status_code) from exc


def _result_from_json(raw: dict[str, Any]) -> Florence2Result:
    bboxes = [_bbox(b) for b in _list(raw, "bboxes")]
    labels = [str(label) for label in _list(raw, "labels")]
    if "objects" in raw:
        objects = [DetectedObject(str(o.get("label", "")), _bbox(o["bbox"]))
                   for o in _list(raw, "objects") if isinstance(o, dict) and "bbox" in o]
    else:
        padded = labels + [""] * (len(bboxes) - len(labels))
        objects = [DetectedObject(label, box) for label, box in zip(padded, bboxes, strict=False)]
    size = raw.get("image_size")
    image_size = (int(size["width"]), int(size["height"])) if isinstance(size, dict) and "width" in size else None
    latency = raw.get("latency_ms")
    return Florence2Result(
        task=str(raw.get("task", "")),
        task_token=str(raw.get("task_token", "")),
        text=str(raw.get("text") or ""),
        result=raw.get("result"),
        objects=objects,
        bboxes=bboxes,
        labels=labels,
        polygons=_list(raw, "polygons"),
        quad_boxes=[_floats(q) for q in _list(raw, "quad_boxes")],
        image_size=image_size,
        latency_ms=None if latency is None else float(latency),
        model=str(raw.get("model") or ""),
        raw=raw,
    )


def _parse_tasks(response: httpx.Response) -> list[TaskInfo]:
    body = _json(response)
    items = body.get("details", []) if isinstance(body, dict) else body  # /tasks (seed shape) or /v1/tasks
    if not isinstance(items, list):
        raise VlmserveError(f"unexpected /tasks answer: {body!r:.200}", status_code=response.status_code)
    return [TaskInfo(name=str(t["name"]), token=str(t.get("token", "")), needs_text=bool(t.get("needs_text")),
                     description=str(t.get("description") or ""),
                     text_hint=None if t.get("text_hint") is None else str(t["text_hint"]))
            for t in items if isinstance(t, dict) and "name" in t]


def _parse_ready(response: httpx.Response) -> bool:
    # /health answers 503 while *any* model is loading; Florence-2 users only care about florence2 itself.
    if response.status_code not in (200, 503):
        return False
    try:
        models = response.json().get("models") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(models, dict) and models.get(MODEL_NAME) is True


def _not_ready(exc: httpx.HTTPError) -> bool:
    return False


# One HTTP exchange described without doing I/O: what to send and how to read the answer. The base class
# builds these; the sync and async clients only send them.
@dataclass(frozen=True)
class _Call(Generic[_T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], _T]
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    # What a transport error (connection refused, timeout, ...) turns into; default: VlmserveUnavailable.
    on_transport_error: Callable[[httpx.HTTPError], _T] | None = None


class _ClientBase:
    def __init__(self, base_url: str, api_key: str | None, timeout: float | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "vlmserve-client"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def _unreachable(self, exc: httpx.HTTPError) -> NoReturn:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "cannot reach"
        code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
        raise VlmserveUnavailable(f"{kind} the gateway at {self.base_url}: {exc}", code=code) from exc

    def _failed(self, call: _Call[_T], exc: httpx.HTTPError) -> _T:
        if call.on_transport_error is not None:
            return call.on_transport_error(exc)
        self._unreachable(exc)

    def _ready_call(self) -> _Call[bool]:
        return _Call("GET", "/health", _parse_ready, on_transport_error=_not_ready)

    def _tasks_call(self) -> _Call[list[TaskInfo]]:
        return _Call("GET", "/v1/tasks", _parse_tasks)

    def _infer_call(self, task: str, image: ImageInput, text: str | None, max_new_tokens: int | None,
                    num_beams: int | None) -> _Call[Florence2Result]:
        if not task:
            raise ValueError("task must be a task name (e.g. 'caption') or token (e.g. '<CAPTION>')")
        data = {"task": task}
        if text is not None:
            data["text"] = text
        if max_new_tokens is not None:
            data["max_new_tokens"] = str(int(max_new_tokens))
        if num_beams is not None:
            data["num_beams"] = str(int(num_beams))
        return _Call("POST", "/infer/upload", _parse_result, data=data, files={"file": _image_file(image)})


# The per-task shortcuts, written once for both clients: ``_R`` is what ``run`` returns (a result, or an
# awaitable of one).
class _TaskMethods(Generic[_R]):
    def run(self, task: str, image: ImageInput, text: str | None = None, *, max_new_tokens: int | None = None,
            num_beams: int | None = None) -> _R:
        raise NotImplementedError

    def caption(self, image: ImageInput, detailed: CaptionDetail = False) -> _R:
        """Caption the image: ``caption``; ``detailed=True`` → ``more_detailed_caption``;
        ``detailed="detailed"`` → ``detailed_caption``."""
        return self.run(_caption_task(detailed), image)

    def detect_objects(self, image: ImageInput) -> _R:
        """Object detection (``<OD>``): ``.objects``, ``.bboxes`` and ``.labels``."""
        return self.run("object_detection", image)

    def dense_region_caption(self, image: ImageInput) -> _R:
        """A caption per region (``<DENSE_REGION_CAPTION>``): ``.objects``, ``.bboxes`` and ``.labels``."""
        return self.run("dense_region_caption", image)

    def ocr(self, image: ImageInput) -> _R:
        """The text in the image (``<OCR>``)."""
        return self.run("ocr", image)

    def ocr_with_region(self, image: ImageInput) -> _R:
        """Text lines with their quadrilaterals (``<OCR_WITH_REGION>``): ``.quad_boxes`` and ``.labels``."""
        return self.run("ocr_with_region", image)

    def phrase_grounding(self, image: ImageInput, text: str) -> _R:
        """Boxes for the phrases of ``text`` (``<CAPTION_TO_PHRASE_GROUNDING>``)."""
        return self.run("phrase_grounding", image, text)

    def segment(self, image: ImageInput, text: str) -> _R:
        """Polygons for the thing ``text`` describes (``<REFERRING_EXPRESSION_SEGMENTATION>``): ``.polygons``."""
        return self.run("referring_expression_segmentation", image, text)


class Florence2Client(_ClientBase, _TaskMethods[Florence2Result]):
    """Synchronous client for the gateway's Florence-2 API.

    ``api_key`` is sent as ``Authorization: Bearer <api_key>``; ``timeout`` is in seconds (``None``: no
    limit). ``transport`` replaces httpx's network transport (tests use ``httpx.MockTransport``).
    Errors raise :class:`VlmserveError` (:class:`VlmserveUnavailable` for 503 and unreachable gateways,
    :class:`VlmserveBadRequest` for 4xx).
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                  transport=transport)

    def _execute(self, call: _Call[_T]) -> _T:
        try:
            response = self._http.request(call.method, call.path, data=call.data, files=call.files)
        except httpx.TransportError as exc:
            return self._failed(call, exc)
        return call.parse(response)

    def is_ready(self) -> bool:
        """True when ``/health`` reports the ``florence2`` model ready (other models may still load); never raises."""
        return self._execute(self._ready_call())

    def tasks(self) -> list[TaskInfo]:
        """The tasks the gateway serves (``GET /v1/tasks``)."""
        return self._execute(self._tasks_call())

    def run(self, task: str, image: ImageInput, text: str | None = None, *, max_new_tokens: int | None = None,
            num_beams: int | None = None) -> Florence2Result:
        """Run any task, by name (``"object_detection"``) or token (``"<OD>"``), with optional ``text``."""
        return self._execute(self._infer_call(task, image, text, max_new_tokens, num_beams))

    def close(self) -> None:
        """Close the underlying HTTP connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncFlorence2Client(_ClientBase, _TaskMethods[Awaitable[Florence2Result]]):
    """Asynchronous client with the same API as :class:`Florence2Client`; await its methods.

    Close it with ``await client.aclose()`` or use ``async with``. Reading image files and encoding PIL
    images happen in the calling thread, before the request is sent.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                       transport=transport)

    async def _execute(self, call: _Call[_T]) -> _T:
        try:
            response = await self._http.request(call.method, call.path, data=call.data, files=call.files)
        except httpx.TransportError as exc:
            return self._failed(call, exc)
        return call.parse(response)

    async def is_ready(self) -> bool:
        """True when ``/health`` reports the ``florence2`` model ready (other models may still load); never raises."""
        return await self._execute(self._ready_call())

    async def tasks(self) -> list[TaskInfo]:
        """The tasks the gateway serves (``GET /v1/tasks``)."""
        return await self._execute(self._tasks_call())

    async def run(self, task: str, image: ImageInput, text: str | None = None, *,
                  max_new_tokens: int | None = None, num_beams: int | None = None) -> Florence2Result:
        """Run any task, by name (``"object_detection"``) or token (``"<OD>"``), with optional ``text``."""
        return await self._execute(self._infer_call(task, image, text, max_new_tokens, num_beams))

    async def aclose(self) -> None:
        """Close the underlying HTTP connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
