"""What every client shares: image inputs, one HTTP exchange described without I/O (``_Call``), the sync and
async senders, and ``GET /info``. Nothing here is public API except what ``__init__`` re-exports.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar, Union

import httpx

from vlmserve_client.errors import VlmserveError, VlmserveUnavailable, error_from_response

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from typing_extensions import Self

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 120.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class ImageRef:
    """An image the gateway fetches or decodes itself, sent as is: an ``http(s)://`` URL, a ``data:`` URI,
    bare base64, or a path inside the gateway's local image folder (``VLMSERVE_GATEWAY_LOCAL_IMAGE_DIR``).

    Plain strings that start with ``http://``, ``https://`` or ``data:`` are taken as references anyway;
    other plain strings are files on *this* machine, read by the client.
    """

    ref: str


# A file path, encoded image bytes, or a PIL image (sent as PNG; needs the ``pillow`` extra).
ImageInput = Union[str, "os.PathLike[str]", bytes, "PILImage.Image"]

_REF_PREFIXES = ("http://", "https://", "data:")
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


def as_reference(image: object) -> str | None:
    """The string to send verbatim when ``image`` is a gateway-side reference, else ``None``."""
    if isinstance(image, ImageRef):
        return image.ref
    if isinstance(image, str) and image.lower().startswith(_REF_PREFIXES):
        return image
    return None


def image_file(image: ImageInput) -> tuple[str, bytes, str]:
    """A multipart ``file`` part for a local image: (filename, bytes, content type)."""
    name: str | None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        name = None
    elif isinstance(image, (str, os.PathLike)):
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


def image_reference(image: ImageInput | ImageRef) -> str:
    """What JSON routes take: a reference as is, or a local image as a ``data:`` URI."""
    ref = as_reference(image)
    if ref is not None:
        return ref
    assert not isinstance(image, ImageRef)
    _, data, content_type = image_file(image)
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def json_body(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; the mapped error for anything else."""
    if not response.is_success:
        raise error_from_response(response)
    try:
        return response.json()
    except ValueError as exc:
        raise VlmserveError(f"gateway sent invalid JSON: {response.text[:200]!r}",
                            status_code=response.status_code) from exc


def parse_object(response: httpx.Response, build: Callable[[dict[str, Any]], _T]) -> _T:
    """A 2xx JSON object turned into a result by ``build``; a malformed one is a :class:`VlmserveError`."""
    raw = json_body(response)
    if not isinstance(raw, dict):
        raise VlmserveError(f"unexpected answer from the gateway: {raw!r:.200}", status_code=response.status_code)
    try:
        return build(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise VlmserveError(f"malformed answer from the gateway ({exc!r}): {raw!r:.200}",
                            status_code=response.status_code) from exc


def optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- GET /info ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One client-facing model as listed by ``GET /info``. ``task`` is ``embed_image``, ``embed_text``,
    ``florence2`` or ``chat``; ``id`` is the source checkpoint (the name to pass as ``model=``)."""

    id: str
    triton_model: str
    family: str
    task: str
    ready: bool
    device: str | None = None
    runtime: str | None = None
    precision: str | None = None
    weights: str | None = None
    supports_video: bool = False
    max_new_tokens_limit: int | None = None


@dataclass(frozen=True)
class ServiceInfo:
    """``GET /info``: every model, the default OCR model (``model``), the gateway's limits and version."""

    models: list[ModelInfo]
    model: str | None
    max_new_tokens: int | None
    limits: dict[str, int]
    version: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def ready(self, task: str) -> bool:
        """True when a model for ``task`` is listed and ready."""
        return any(m.task == task and m.ready for m in self.models)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int_limits(limits: Any) -> dict[str, int]:
    # the numeric limits; anything else a newer gateway may add there (nested objects, strings) is left out
    if not isinstance(limits, Mapping):
        return {}
    return {str(k): int(v) for k, v in limits.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _service_info(raw: dict[str, Any]) -> ServiceInfo:
    models = [
        ModelInfo(id=str(m["id"]), triton_model=str(m.get("triton_model") or ""), family=str(m.get("family") or ""),
                  task=str(m.get("task") or ""), ready=m.get("ready") is True, device=_opt_str(m.get("device")),
                  runtime=_opt_str(m.get("runtime")), precision=_opt_str(m.get("precision")),
                  weights=_opt_str(m.get("weights")), supports_video=m.get("supports_video") is True,
                  max_new_tokens_limit=None if m.get("max_new_tokens_limit") is None
                  else int(m["max_new_tokens_limit"]))
        for m in raw.get("models") or [] if isinstance(m, dict)
    ]
    limits = raw.get("limits") or {}
    tokens = raw.get("max_new_tokens")
    return ServiceInfo(models=models, model=_opt_str(raw.get("model")),
                       max_new_tokens=None if tokens is None else int(tokens),
                       limits=_int_limits(limits),
                       version=str(raw.get("version") or ""), raw=raw)


def parse_info(response: httpx.Response) -> ServiceInfo:
    return parse_object(response, _service_info)


# --- one HTTP exchange, and the two ways to send it -------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[_T]):
    """What to send and how to read the answer. The clients build these; the sync and async bases send them."""

    method: str
    path: str
    parse: Callable[[httpx.Response], _T]
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    json: Any = None
    # What a transport error (connection refused, timeout, ...) turns into; default: VlmserveUnavailable.
    on_transport_error: Callable[[httpx.HTTPError], _T] | None = None


class _ClientBase:
    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "vlmserve-client"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def _failed(self, call: _Call[_T], exc: httpx.HTTPError) -> _T:
        if call.on_transport_error is not None:
            return call.on_transport_error(exc)
        timeout = isinstance(exc, httpx.TimeoutException)
        kind = "timed out" if timeout else "cannot reach"
        raise VlmserveUnavailable(f"{kind} the gateway at {self.base_url}: {exc}",
                                  code="timeout" if timeout else "connection_error") from exc

    def _info_call(self) -> _Call[ServiceInfo]:
        return _Call("GET", "/info", parse_info)


class _SyncClient(_ClientBase):
    """Sends calls with ``httpx.Client``. ``api_key`` is sent as ``Authorization: Bearer <api_key>``;
    ``timeout`` is in seconds (``None``: no limit); ``transport`` replaces httpx's network transport (tests use
    ``httpx.MockTransport``)."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                  transport=transport)

    def _execute(self, call: _Call[_T]) -> _T:
        try:
            response = self._http.request(call.method, call.path, data=call.data, files=call.files, json=call.json)
        except httpx.TransportError as exc:
            return self._failed(call, exc)
        return call.parse(response)

    def info(self) -> ServiceInfo:
        """``GET /info``: the models the gateway serves (with readiness) and its limits."""
        return self._execute(self._info_call())

    def close(self) -> None:
        """Close the underlying HTTP connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _AsyncClient(_ClientBase):
    """Sends calls with ``httpx.AsyncClient``; close it with ``await client.aclose()`` or ``async with``.
    Reading image files and encoding PIL images happen in the calling thread, before the request is sent."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                       transport=transport)

    async def _execute(self, call: _Call[_T]) -> _T:
        try:
            response = await self._http.request(call.method, call.path, data=call.data, files=call.files,
                                                json=call.json)
        except httpx.TransportError as exc:
            return self._failed(call, exc)
        return call.parse(response)

    async def info(self) -> ServiceInfo:
        """``GET /info``: the models the gateway serves (with readiness) and its limits."""
        return await self._execute(self._info_call())

    async def aclose(self) -> None:
        """Close the underlying HTTP connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
