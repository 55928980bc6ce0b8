"""vlmserve_client's Florence-2 clients against httpx.MockTransport: the requests they build, how they read answers.

Most tests run twice, once through the sync client and once through the async one (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import socket
import time
from collections.abc import Callable
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from vlmserve_client import (
    AsyncFlorence2Client,
    DetectedObject,
    Florence2Client,
    Florence2Result,
    TaskInfo,
    VlmserveBadRequest,
    VlmserveError,
    VlmserveUnavailable,
)

Handler = Callable[[httpx.Request], httpx.Response]

PNG_1X1 = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82"
)
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32

OD_ANSWER: dict[str, Any] = {
    "task": "object_detection",
    "task_token": "<OD>",
    "text": "</s><s>car<loc_1><loc_2><loc_3><loc_4>wheel<loc_5><loc_6><loc_7><loc_8></s>",
    "result": {"bboxes": [[1.5, 2, 30, 40.25], [5, 6, 7, 8]], "labels": ["car", "wheel"]},
    "image_size": {"width": 640, "height": 480},
    "latency_ms": 12.5,
    "model": "florence2",
    "bboxes": [[1.5, 2, 30, 40.25], [5, 6, 7, 8]],
    "labels": ["car", "wheel"],
}
CAPTION_ANSWER: dict[str, Any] = {
    "task": "caption",
    "task_token": "<CAPTION>",
    "text": "A red car.",
    "result": "A red car.",
    "image_size": {"width": 1, "height": 1},
    "latency_ms": 3,
    "model": "florence2",
}


# --- helpers -------------------------------------------------------------------------------------


class Recorder:
    """A MockTransport handler that records every request and answers with ``answer``."""

    def __init__(self, answer: httpx.Response | Handler | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer if answer is not None else httpx.Response(200, json=CAPTION_ANSWER)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if callable(self.answer):
            return self.answer(request)
        # A fresh copy each time: a response object can be sent once (and parametrized ones are shared).
        return httpx.Response(self.answer.status_code, headers=self.answer.headers, content=self.answer.content)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def call(kind: str, handler: Handler, method: str, *args: Any, client_kwargs: dict[str, Any] | None = None,
         **kwargs: Any) -> Any:
    """Call ``method`` on a fresh sync or async client whose transport is ``handler``."""
    transport = httpx.MockTransport(handler)
    options = {"base_url": "http://gw.test", **(client_kwargs or {})}
    if kind == "sync":
        with Florence2Client(**options, transport=transport) as client:
            return getattr(client, method)(*args, **kwargs)

    async def go() -> Any:
        async with AsyncFlorence2Client(**options, transport=transport) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(go())


def multipart(request: httpx.Request) -> dict[str, Message]:
    """The parts of a multipart/form-data request, by field name."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.content)
    parts: dict[str, Message] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str) and name not in parts
        parts[name] = part
    return parts


def payload(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def form_fields(request: httpx.Request) -> dict[str, str]:
    return {name: payload(part).decode() for name, part in multipart(request).items() if part.get_filename() is None}


def uploaded_file(request: httpx.Request) -> tuple[str | None, str, bytes]:
    part = multipart(request)["file"]
    return part.get_filename(), part.get_content_type(), payload(part)


def error_answer(status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


kinds = pytest.mark.parametrize("kind", ["sync", "async"])


# --- requests ------------------------------------------------------------------------------------


@kinds
def test_upload_from_path(kind: str, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(PNG_1X1)
    rec = Recorder(httpx.Response(200, json=OD_ANSWER))

    call(kind, rec, "detect_objects", str(image))

    request = rec.last
    assert request.method == "POST"
    assert str(request.url) == "http://gw.test/infer/upload"
    assert form_fields(request) == {"task": "object_detection"}  # no text/max_new_tokens/num_beams
    assert set(multipart(request)) == {"task", "file"}
    assert uploaded_file(request) == ("photo.png", "image/png", PNG_1X1)
    assert "authorization" not in request.headers


@kinds
def test_upload_from_pathlike_uses_the_sniffed_type(kind: str, tmp_path: Path) -> None:
    image = tmp_path / "weird.bin"
    image.write_bytes(JPEG_HEAD)
    rec = Recorder()

    call(kind, rec, "caption", image)

    assert uploaded_file(rec.last) == ("weird.bin", "image/jpeg", JPEG_HEAD)


@kinds
@pytest.mark.parametrize(("data", "filename", "content_type"), [
    (PNG_1X1, "image.png", "image/png"),
    (JPEG_HEAD, "image.jpg", "image/jpeg"),
    (b"GIF89a" + b"\x00" * 16, "image.gif", "image/gif"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8, "image.webp", "image/webp"),
    (b"not an image", "image", "application/octet-stream"),
])
def test_upload_from_bytes(kind: str, data: bytes, filename: str, content_type: str) -> None:
    rec = Recorder()

    call(kind, rec, "caption", data)

    assert uploaded_file(rec.last) == (filename, content_type, data)


@kinds
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_upload_from_pil_is_png(kind: str, mode: str) -> None:
    original = Image.new("RGB", (3, 2), (200, 10, 30)).convert(mode)
    rec = Recorder()

    call(kind, rec, "caption", original)

    filename, content_type, data = uploaded_file(rec.last)
    assert (filename, content_type) == ("image.png", "image/png")
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.size == (3, 2)
    expected_mode = "RGB" if mode == "CMYK" else mode
    assert decoded.mode == expected_mode
    assert decoded.convert("RGB").getpixel((0, 0)) == original.convert("RGB").getpixel((0, 0))


@kinds
def test_api_key_is_sent_as_bearer(kind: str) -> None:
    rec = Recorder()

    call(kind, rec, "caption", PNG_1X1, client_kwargs={"api_key": "s3cret"})

    assert rec.last.headers["authorization"] == "Bearer s3cret"


@kinds
def test_run_sends_text_and_generation_options(kind: str) -> None:
    rec = Recorder()

    call(kind, rec, "run", "<OPEN_VOCABULARY_DETECTION>", PNG_1X1, "a cat", max_new_tokens=64, num_beams=1)

    assert form_fields(rec.last) == {"task": "<OPEN_VOCABULARY_DETECTION>", "text": "a cat",
                                     "max_new_tokens": "64", "num_beams": "1"}


@kinds
@pytest.mark.parametrize(("method", "args", "fields"), [
    ("caption", (), {"task": "caption"}),
    ("caption", (False,), {"task": "caption"}),
    ("caption", (True,), {"task": "more_detailed_caption"}),
    ("caption", ("detailed",), {"task": "detailed_caption"}),
    ("caption", ("more_detailed",), {"task": "more_detailed_caption"}),
    ("detect_objects", (), {"task": "object_detection"}),
    ("dense_region_caption", (), {"task": "dense_region_caption"}),
    ("ocr", (), {"task": "ocr"}),
    ("ocr_with_region", (), {"task": "ocr_with_region"}),
    ("phrase_grounding", ("a dog and a ball",), {"task": "phrase_grounding", "text": "a dog and a ball"}),
    ("segment", ("the red car",), {"task": "referring_expression_segmentation", "text": "the red car"}),
])
def test_task_shortcuts(kind: str, method: str, args: tuple[Any, ...], fields: dict[str, str]) -> None:
    rec = Recorder()

    call(kind, rec, method, PNG_1X1, *args)

    assert form_fields(rec.last) == fields
    assert rec.last.url.path == "/infer/upload"


@kinds
@pytest.mark.parametrize(("method", "args"), [
    ("caption", ("detailed",)), ("detect_objects", ()), ("dense_region_caption", ()), ("ocr", ()),
    ("ocr_with_region", ()), ("phrase_grounding", ("a dog",)), ("segment", ("the car",)),
])
def test_task_shortcuts_pass_generation_options(kind: str, method: str, args: tuple[Any, ...]) -> None:
    rec = Recorder()

    call(kind, rec, method, PNG_1X1, *args, max_new_tokens=8, num_beams=2)

    fields = form_fields(rec.last)
    assert (fields["max_new_tokens"], fields["num_beams"]) == ("8", "2")


def test_caption_detailed_keyword_and_bad_value() -> None:
    rec = Recorder()
    with Florence2Client("http://gw.test", transport=httpx.MockTransport(rec)) as client:
        client.caption(PNG_1X1, detailed=True)
        assert form_fields(rec.last)["task"] == "more_detailed_caption"
        with pytest.raises(ValueError, match="detailed"):
            client.caption(PNG_1X1, detailed="verbose")  # type: ignore[arg-type]
    assert len(rec.requests) == 1


def test_bad_images_fail_before_any_request(tmp_path: Path) -> None:
    rec = Recorder()
    with Florence2Client("http://gw.test", transport=httpx.MockTransport(rec)) as client:
        with pytest.raises(TypeError, match="PIL.Image.Image"):
            client.caption(12345)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            client.caption(b"")
        with pytest.raises(FileNotFoundError):
            client.caption(tmp_path / "missing.png")
        with pytest.raises(ValueError, match="task"):
            client.run("", PNG_1X1)
    assert rec.requests == []


@pytest.mark.parametrize("base_url", ["http://gw.test/api", "http://gw.test/api/"])
def test_base_url_with_a_path_prefix(base_url: str) -> None:
    rec = Recorder()

    call("sync", rec, "caption", PNG_1X1, client_kwargs={"base_url": base_url})

    assert str(rec.last.url) == "http://gw.test/api/infer/upload"


def test_timeout_is_passed_to_httpx() -> None:
    rec = Recorder()
    with Florence2Client("http://gw.test", timeout=7.5, transport=httpx.MockTransport(rec)) as client:
        client.caption(PNG_1X1)
    assert rec.last.extensions["timeout"] == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5}


# --- results -------------------------------------------------------------------------------------


@kinds
def test_object_detection_result(kind: str) -> None:
    result = call(kind, Recorder(httpx.Response(200, json=OD_ANSWER)), "detect_objects", PNG_1X1)

    assert isinstance(result, Florence2Result)
    assert (result.task, result.task_token, result.text) == ("object_detection", "<OD>", OD_ANSWER["text"])
    assert result.result == OD_ANSWER["result"]
    assert result.bboxes == [(1.5, 2.0, 30.0, 40.25), (5.0, 6.0, 7.0, 8.0)]
    assert result.labels == ["car", "wheel"]
    assert result.objects == [DetectedObject("car", (1.5, 2.0, 30.0, 40.25)), DetectedObject("wheel", (5, 6, 7, 8))]
    assert all(isinstance(v, float) for o in result.objects for v in o.bbox)
    assert result.polygons == [] and result.quad_boxes == []
    assert result.image_size == (640, 480)
    assert result.latency_ms == 12.5
    assert result.model == "florence2"
    assert result.raw == OD_ANSWER


def test_caption_result_has_empty_region_fields() -> None:
    result = call("sync", Recorder(httpx.Response(200, json=CAPTION_ANSWER)), "caption", PNG_1X1)

    assert result.text == result.result == "A red car."
    assert (result.objects, result.bboxes, result.labels, result.polygons, result.quad_boxes) == ([], [], [], [], [])
    assert result.image_size == (1, 1)
    assert result.latency_ms == 3.0 and isinstance(result.latency_ms, float)


def test_objects_from_the_answer_win_over_bboxes_and_labels() -> None:
    answer = {**OD_ANSWER, "objects": [{"label": "truck", "bbox": [0, 0, 1, 1]}]}

    result = call("sync", Recorder(httpx.Response(200, json=answer)), "detect_objects", PNG_1X1)

    assert result.objects == [DetectedObject("truck", (0.0, 0.0, 1.0, 1.0))]
    assert result.labels == ["car", "wheel"]


def test_boxes_without_labels_get_empty_labels() -> None:
    answer = {**CAPTION_ANSWER, "task": "region_proposal", "task_token": "<REGION_PROPOSAL>",
              "bboxes": [[0, 0, 2, 2], [1, 1, 3, 3]]}

    result = call("sync", Recorder(httpx.Response(200, json=answer)), "run", "region_proposal", PNG_1X1)

    assert result.objects == [DetectedObject("", (0, 0, 2, 2)), DetectedObject("", (1, 1, 3, 3))]
    assert result.labels == []


def test_ocr_with_region_and_segmentation_fields() -> None:
    quad = [1, 2, 3, 2, 3, 4, 1, 4]
    polygons = [[[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]]]
    answer = {**CAPTION_ANSWER, "quad_boxes": [quad], "labels": ["HELLO"], "polygons": polygons}

    result = call("sync", Recorder(httpx.Response(200, json=answer)), "ocr_with_region", PNG_1X1)

    assert result.quad_boxes == [[1.0, 2.0, 3.0, 2.0, 3.0, 4.0, 1.0, 4.0]]
    assert result.labels == ["HELLO"]
    assert result.polygons == polygons
    assert result.objects == []


def test_minimal_answer_parses_with_defaults() -> None:
    result = call("sync", Recorder(httpx.Response(200, json={"task": "ocr", "result": "HI"})), "ocr", PNG_1X1)

    assert (result.task, result.task_token, result.text, result.result) == ("ocr", "", "", "HI")
    assert (result.image_size, result.latency_ms, result.model) == (None, None, "")
    assert result.objects == result.bboxes == result.labels == result.polygons == result.quad_boxes == []


def test_non_json_or_non_object_success_is_an_error() -> None:
    with pytest.raises(VlmserveError, match="invalid JSON") as exc:
        call("sync", Recorder(httpx.Response(200, text="<html>")), "caption", PNG_1X1)
    assert exc.value.status_code == 200
    with pytest.raises(VlmserveError, match="unexpected"):
        call("sync", Recorder(httpx.Response(200, json=[1, 2])), "caption", PNG_1X1)


@pytest.mark.parametrize("extra", [{"bboxes": [[1, 2, 3]]}, {"bboxes": [["a", 0, 0, 0]]}, {"bboxes": [None]},
                                   {"image_size": {"width": 3}}, {"objects": [{"label": "x", "bbox": 5}]}])
def test_malformed_region_fields_are_an_error(extra: dict[str, Any]) -> None:
    answer = httpx.Response(200, json={**CAPTION_ANSWER, **extra})

    with pytest.raises(VlmserveError, match="malformed answer") as exc:
        call("sync", Recorder(answer), "detect_objects", PNG_1X1)

    assert exc.value.status_code == 200


@kinds
def test_tasks(kind: str) -> None:
    body = [
        {"name": "caption", "token": "<CAPTION>", "needs_text": False, "description": "short caption",
         "text_hint": None},
        {"name": "phrase_grounding", "token": "<CAPTION_TO_PHRASE_GROUNDING>", "needs_text": True,
         "description": "boxes for phrases", "text_hint": "a caption"},
    ]
    rec = Recorder(httpx.Response(200, json=body))

    tasks = call(kind, rec, "tasks", client_kwargs={"api_key": "k"})

    assert (rec.last.method, rec.last.url.path) == ("GET", "/v1/tasks")
    assert rec.last.headers["authorization"] == "Bearer k"
    assert tasks == [
        TaskInfo("caption", "<CAPTION>", False, "short caption", None),
        TaskInfo("phrase_grounding", "<CAPTION_TO_PHRASE_GROUNDING>", True, "boxes for phrases", "a caption"),
    ]


# --- errors --------------------------------------------------------------------------------------


@kinds
def test_bad_request_error(kind: str) -> None:
    answer = error_answer(422, "text is required for phrase_grounding", code="invalid_request", param="text")

    with pytest.raises(VlmserveBadRequest) as exc:
        call(kind, Recorder(answer), "run", "phrase_grounding", PNG_1X1)

    err = exc.value
    assert (err.status_code, err.message, err.code, err.param) == (
        422, "text is required for phrase_grounding", "invalid_request", "text")
    assert err.error_type == "invalid_request_error"
    assert err.retry_after is None
    assert "422" in str(err) and "phrase_grounding" in str(err)


def test_auth_error_is_a_bad_request() -> None:
    answer = error_answer(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    with pytest.raises(VlmserveBadRequest) as exc:
        call("sync", Recorder(answer), "caption", PNG_1X1, client_kwargs={"api_key": "wrong"})

    assert (exc.value.status_code, exc.value.code) == (401, "invalid_api_key")


@kinds
def test_unavailable_with_retry_after_seconds(kind: str) -> None:
    answer = error_answer(503, "model florence2 is not ready", code="model_not_ready", headers={"Retry-After": "5"})

    with pytest.raises(VlmserveUnavailable) as exc:
        call(kind, Recorder(answer), "caption", PNG_1X1)

    assert (exc.value.status_code, exc.value.code, exc.value.retry_after) == (503, "model_not_ready", 5.0)
    assert exc.value.message == "model florence2 is not ready"


def test_retry_after_as_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    answer = error_answer(503, "busy", headers={"Retry-After": when})

    with pytest.raises(VlmserveUnavailable) as exc:
        call("sync", Recorder(answer), "caption", PNG_1X1)

    assert exc.value.retry_after is not None and 100 < exc.value.retry_after <= 121


@pytest.mark.parametrize("header", ["soon", "-3"])
def test_odd_retry_after(header: str) -> None:
    with pytest.raises(VlmserveUnavailable) as exc:
        call("sync", Recorder(error_answer(503, "busy", headers={"Retry-After": header})), "caption", PNG_1X1)
    assert exc.value.retry_after == (None if header == "soon" else 0.0)


def test_error_without_json_body_uses_the_text() -> None:
    with pytest.raises(VlmserveError) as exc:
        call("sync", Recorder(httpx.Response(502, text="Bad Gateway from the proxy")), "caption", PNG_1X1)

    assert type(exc.value) is VlmserveError
    assert (exc.value.status_code, exc.value.message, exc.value.code) == (502, "Bad Gateway from the proxy", None)


def test_error_with_empty_body_uses_the_reason_phrase() -> None:
    with pytest.raises(VlmserveUnavailable) as exc:
        call("sync", Recorder(httpx.Response(503)), "caption", PNG_1X1)
    assert exc.value.message == "Service Unavailable"


def test_fastapi_detail_errors() -> None:
    with pytest.raises(VlmserveBadRequest, match="Not Found") as exc:
        call("sync", Recorder(httpx.Response(404, json={"detail": "Not Found"})), "tasks")
    assert exc.value.status_code == 404


@kinds
def test_connection_error_is_unavailable(kind: str) -> None:
    with pytest.raises(VlmserveUnavailable) as exc:
        call(kind, refuse, "caption", PNG_1X1)

    assert exc.value.status_code is None
    assert exc.value.code == "connection_error"
    assert "http://gw.test" in exc.value.message
    assert isinstance(exc.value.__cause__, httpx.ConnectError)


@kinds
def test_timeout_is_unavailable(kind: str) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(VlmserveUnavailable) as exc:
        call(kind, slow, "tasks")

    assert exc.value.code == "timeout"


# --- is_ready ------------------------------------------------------------------------------------


def health(status: int, models: dict[str, bool] | None) -> httpx.Response:
    body: dict[str, Any] = {"status": "ok" if status == 200 else "degraded"}
    if models is not None:
        body["models"] = models
    return httpx.Response(status, json=body, headers={} if status == 200 else {"Retry-After": "5"})


@kinds
@pytest.mark.parametrize(("answer", "ready"), [
    (health(200, {"florence2": True, "siglip_embed_image": True}), True),
    (health(200, {"florence2": False}), False),
    (health(200, {"siglip_embed_image": True}), False),
    (health(200, None), False),
    (health(503, {"florence2": True, "siglip_embed_image": False}), True),  # another model still loading
    (health(503, {"florence2": False}), False),
    (httpx.Response(200, text="ok"), False),
    (httpx.Response(200, json=["florence2"]), False),
    (error_answer(401, "missing API key"), False),
])
def test_is_ready(kind: str, answer: httpx.Response, ready: bool) -> None:
    rec = Recorder(answer)

    assert call(kind, rec, "is_ready") is ready
    assert (rec.last.method, rec.last.url.path) == ("GET", "/health")


@kinds
def test_is_ready_is_false_when_the_gateway_is_down(kind: str) -> None:
    assert call(kind, refuse, "is_ready") is False


def test_is_ready_against_a_closed_port() -> None:
    # A real connection attempt, no mock: a port that was just free refuses the connection.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Florence2Client(f"http://127.0.0.1:{port}", timeout=2) as client:
        assert client.is_ready() is False
        with pytest.raises(VlmserveUnavailable):
            client.tasks()


# --- lifecycle -----------------------------------------------------------------------------------


def test_sync_context_manager_and_close() -> None:
    with Florence2Client("http://gw.test", transport=httpx.MockTransport(Recorder())) as client:
        assert not client._http.is_closed
    assert client._http.is_closed

    other = Florence2Client()
    assert other.base_url == "http://127.0.0.1:8080"
    assert repr(other) == "Florence2Client('http://127.0.0.1:8080')"
    other.close()
    assert other._http.is_closed


def test_async_context_manager_aclose_and_concurrency() -> None:
    rec = Recorder(lambda request: httpx.Response(200, json={**CAPTION_ANSWER, "text": form_fields(request)["task"]}))

    async def go() -> tuple[AsyncFlorence2Client, list[Florence2Result]]:
        async with AsyncFlorence2Client("http://gw.test/", transport=httpx.MockTransport(rec)) as client:
            results = await asyncio.gather(client.caption(PNG_1X1), client.ocr(PNG_1X1),
                                           client.caption(PNG_1X1, detailed="detailed"))
            assert not client._http.is_closed
        return client, list(results)

    client, results = asyncio.run(go())
    assert client._http.is_closed
    assert [r.text for r in results] == ["caption", "ocr", "detailed_caption"]

    async def explicit() -> bool:
        other = AsyncFlorence2Client(transport=httpx.MockTransport(rec))
        await other.aclose()
        return other._http.is_closed

    assert asyncio.run(explicit())
