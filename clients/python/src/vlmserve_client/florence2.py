"""Florence-2 through the gateway: the Florence-2 service ``Florence2Client`` API, sync and async.

Usage::

    from vlmserve_client import Florence2Client

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

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, Union

import httpx

from vlmserve_client._core import (
    ImageInput,
    _AsyncClient,
    _Call,
    _ClientBase,
    _SyncClient,
    as_reference,
    image_file,
    json_body,
    optional_float,
    parse_object,
)
from vlmserve_client.errors import VlmserveError

__all__ = [
    "AsyncFlorence2Client",
    "BBox",
    "CaptionDetail",
    "DetectedObject",
    "Florence2Client",
    "Florence2Result",
    "TaskInfo",
]

MODEL_NAME = "florence2"  # Florence-2's Triton model name, as reported under /health's "models"

BBox = tuple[float, float, float, float]
CaptionDetail = Union[bool, Literal["detailed", "more_detailed"]]

_R = TypeVar("_R")


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


def _caption_task(detailed: CaptionDetail) -> str:
    if detailed is False:
        return "caption"
    if detailed is True or detailed == "more_detailed":
        return "more_detailed_caption"
    if detailed == "detailed":
        return "detailed_caption"
    raise ValueError(f"detailed must be a bool, 'detailed' or 'more_detailed', not {detailed!r}")


def _floats(value: Any) -> list[float]:
    return [float(v) for v in value]


def _bbox(value: Any) -> BBox:
    x1, y1, x2, y2 = _floats(value)
    return (x1, y1, x2, y2)


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key)
    return list(value) if isinstance(value, (list, tuple)) else []


def _parse_result(response: httpx.Response) -> Florence2Result:
    return parse_object(response, _result_from_json)


def _result_from_json(raw: dict[str, Any]) -> Florence2Result:
    bboxes = [_bbox(b) for b in _list(raw, "bboxes")]
    labels = [str(label) for label in _list(raw, "labels")]
    if "objects" in raw:
        objects = [DetectedObject(str(o.get("label", "")), _bbox(o["bbox"]))
                   for o in _list(raw, "objects") if isinstance(o, dict) and "bbox" in o]
    else:
        padded = labels + [""] * (len(bboxes) - len(labels))
        objects = [DetectedObject(label, box) for label, box in zip(padded, bboxes)]
    size = raw.get("image_size")
    image_size = (int(size["width"]), int(size["height"])) if isinstance(size, dict) and "width" in size else None
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
        latency_ms=optional_float(raw.get("latency_ms")),
        model=str(raw.get("model") or ""),
        raw=raw,
    )


def _parse_tasks(response: httpx.Response) -> list[TaskInfo]:
    body = json_body(response)
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


def _upload(image: ImageInput) -> tuple[str, bytes, str]:
    if as_reference(image) is not None:
        raise ValueError("Florence-2 takes the image itself (a path, bytes or a PIL image); download URLs first")
    return image_file(image)


class _FlorenceCalls(_ClientBase):
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
        return _Call("POST", "/infer/upload", _parse_result, data=data, files={"file": _upload(image)})


# The per-task shortcuts, written once for both clients: ``_R`` is what ``run`` returns (a result, or an
# awaitable of one). ``max_new_tokens`` and ``num_beams`` go to run().
class _TaskMethods(Generic[_R]):
    def run(self, task: str, image: ImageInput, text: str | None = None, *, max_new_tokens: int | None = None,
            num_beams: int | None = None) -> _R:
        raise NotImplementedError

    def caption(self, image: ImageInput, detailed: CaptionDetail = False, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """Caption the image: ``caption``; ``detailed=True`` → ``more_detailed_caption``;
        ``detailed="detailed"`` → ``detailed_caption``."""
        return self.run(_caption_task(detailed), image, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def detect_objects(self, image: ImageInput, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """Object detection (``<OD>``): ``.objects``, ``.bboxes`` and ``.labels``."""
        return self.run("object_detection", image, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def dense_region_caption(self, image: ImageInput, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """A caption per region (``<DENSE_REGION_CAPTION>``): ``.objects``, ``.bboxes`` and ``.labels``."""
        return self.run("dense_region_caption", image, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def ocr(self, image: ImageInput, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """The text in the image (``<OCR>``)."""
        return self.run("ocr", image, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def ocr_with_region(self, image: ImageInput, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """Text lines with their quadrilaterals (``<OCR_WITH_REGION>``): ``.quad_boxes`` and ``.labels``."""
        return self.run("ocr_with_region", image, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def phrase_grounding(self, image: ImageInput, text: str, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """Boxes for the phrases of ``text`` (``<CAPTION_TO_PHRASE_GROUNDING>``)."""
        return self.run("phrase_grounding", image, text, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def segment(self, image: ImageInput, text: str, *,
                max_new_tokens: int | None = None, num_beams: int | None = None) -> _R:
        """Polygons for the thing ``text`` describes (``<REFERRING_EXPRESSION_SEGMENTATION>``): ``.polygons``."""
        return self.run("referring_expression_segmentation", image, text, max_new_tokens=max_new_tokens,
                        num_beams=num_beams)


class Florence2Client(_SyncClient, _FlorenceCalls, _TaskMethods[Florence2Result]):
    """Synchronous client for the gateway's Florence-2 API.

    ``api_key`` is sent as ``Authorization: Bearer <api_key>``; ``timeout`` is in seconds (``None``: no
    limit). ``transport`` replaces httpx's network transport (tests use ``httpx.MockTransport``).
    Errors raise :class:`VlmserveError` (:class:`VlmserveUnavailable` for 503 and unreachable gateways,
    :class:`VlmserveBadRequest` for 4xx).
    """

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


class AsyncFlorence2Client(_AsyncClient, _FlorenceCalls, _TaskMethods[Awaitable[Florence2Result]]):
    """Asynchronous client with the same API as :class:`Florence2Client`; await its methods.

    Close it with ``await client.aclose()`` or use ``async with``. Reading image files and encoding PIL
    images happen in the calling thread, before the request is sent.
    """

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
