"""OCR and region descriptions by the chat models: the Qwen2-VL OCR service's ``POST /ocr`` and the SmolVLM2 service's
``POST /v1/describe_region``.

Usage::

    from vlmserve_client import OcrClient

    with OcrClient("http://127.0.0.1:8080") as client:
        print(client.ocr("scan.png", language="russian").text)
        print(client.describe_region("photo.jpg", (10, 20, 200, 180)).description)

``ocr`` uses Qwen2-VL when it is loaded (the Qwen2-VL OCR service served it), else the first chat model;
``describe_region``
uses the first chat model; ``model=`` picks another (its source checkpoint, family or Triton name). Free-form
questions about images are chat: use the ``openai`` SDK against ``/v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from vlmserve_client._core import (
    ImageInput,
    ImageRef,
    _AsyncClient,
    _Call,
    _ClientBase,
    _SyncClient,
    as_reference,
    image_file,
    image_reference,
    optional_float,
    parse_object,
)
from vlmserve_client.errors import VlmserveError

__all__ = ["AsyncOcrClient", "OcrClient", "OcrResult", "RegionDescription"]

CHAT_TASK = "chat"  # the task /info reports for the chat models


@dataclass(frozen=True)
class OcrResult:
    """The text read from an image (``POST /ocr``); ``model`` is the chat model's source checkpoint."""

    text: str
    language: str
    model: str
    latency_ms: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RegionDescription:
    """What the chat model says about a box (``POST /v1/describe_region``); ``box`` is as the gateway read it."""

    description: str
    box: tuple[float, float, float, float]
    model: str
    latency_ms: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _ocr_result(raw: dict[str, Any]) -> OcrResult:
    return OcrResult(text=str(raw["text"]), language=str(raw.get("language") or ""), model=str(raw.get("model") or ""),
                     latency_ms=optional_float(raw.get("latency_ms")), raw=raw)


def _region(raw: dict[str, Any]) -> RegionDescription:
    x1, y1, x2, y2 = (float(v) for v in raw["box"])
    return RegionDescription(description=str(raw["description"]), box=(x1, y1, x2, y2),
                             model=str(raw.get("model") or ""), latency_ms=optional_float(raw.get("latency_ms")),
                             raw=raw)


def _parse_ocr(response: httpx.Response) -> OcrResult:
    return parse_object(response, _ocr_result)


def _parse_region(response: httpx.Response) -> RegionDescription:
    return parse_object(response, _region)


def _box_text(box: str | Sequence[float]) -> str:
    # The gateway parses "x1,y1,x2,y2" strictly and names the rule a bad box breaks; a string goes as is.
    if isinstance(box, str):
        return box
    return ",".join(repr(float(v)) for v in box)


class _OcrCalls(_ClientBase):
    def _ocr_call(self, image: ImageInput | ImageRef, language: str, model: str | None,
                  max_tokens: int | None) -> _Call[OcrResult]:
        body: dict[str, Any] = {"image": image_reference(image), "language": language}
        if model is not None:
            body["model"] = model
        if max_tokens is not None:
            body["max_tokens"] = int(max_tokens)
        return _Call("POST", "/ocr", _parse_ocr, json=body)

    def _region_call(self, image: ImageInput | ImageRef, box: str | Sequence[float], prompt: str | None,
                     model: str | None, max_tokens: int | None) -> _Call[RegionDescription]:
        fields = {"box": _box_text(box)}
        if prompt is not None:
            fields["prompt"] = prompt
        if model is not None:
            fields["model"] = model
        if max_tokens is not None:
            fields["max_tokens"] = str(int(max_tokens))
        ref = as_reference(image)
        if ref is not None:  # the gateway fetches it: JSON
            return _Call("POST", "/v1/describe_region", _parse_region, json={**fields, "image": ref})
        assert not isinstance(image, ImageRef)
        # a local image: a multipart upload (no base64 inflation)
        return _Call("POST", "/v1/describe_region", _parse_region, data=fields, files={"file": image_file(image)})


class OcrClient(_SyncClient, _OcrCalls):
    """Synchronous client for the chat models' OCR and region routes. Errors raise :class:`VlmserveError`
    (:class:`VlmserveBadRequest` for 4xx such as a box outside the image, :class:`VlmserveUnavailable` for 503)."""

    def is_ready(self) -> bool:
        """True when ``/info`` lists a ready chat model; never raises."""
        try:
            return self.info().ready(CHAT_TASK)
        except VlmserveError:
            return False

    def ocr(self, image: ImageInput | ImageRef, language: str = "auto", *, model: str | None = None,
            max_tokens: int | None = None) -> OcrResult:
        """All the text in the image (``POST /ocr``); ``language`` is a hint (``"auto"``, ``"russian"``, ...)."""
        return self._execute(self._ocr_call(image, language, model, max_tokens))

    def describe_region(self, image: ImageInput | ImageRef, box: str | Sequence[float], *,
                        prompt: str | None = None, model: str | None = None,
                        max_tokens: int | None = None) -> RegionDescription:
        """Describe what is inside ``box`` (``x1, y1, x2, y2`` in pixels of the upright image, or the
        ``"x1,y1,x2,y2"`` string); ``prompt`` replaces the default question."""
        return self._execute(self._region_call(image, box, prompt, model, max_tokens))


class AsyncOcrClient(_AsyncClient, _OcrCalls):
    """Asynchronous client with the same API as :class:`OcrClient`; await its methods."""

    async def is_ready(self) -> bool:
        """True when ``/info`` lists a ready chat model; never raises."""
        try:
            return (await self.info()).ready(CHAT_TASK)
        except VlmserveError:
            return False

    async def ocr(self, image: ImageInput | ImageRef, language: str = "auto", *, model: str | None = None,
                  max_tokens: int | None = None) -> OcrResult:
        """All the text in the image (``POST /ocr``); ``language`` is a hint (``"auto"``, ``"russian"``, ...)."""
        return await self._execute(self._ocr_call(image, language, model, max_tokens))

    async def describe_region(self, image: ImageInput | ImageRef, box: str | Sequence[float], *,
                              prompt: str | None = None, model: str | None = None,
                              max_tokens: int | None = None) -> RegionDescription:
        """Describe what is inside ``box`` (``x1, y1, x2, y2`` in pixels of the upright image, or the
        ``"x1,y1,x2,y2"`` string); ``prompt`` replaces the default question."""
        return await self._execute(self._region_call(image, box, prompt, model, max_tokens))
