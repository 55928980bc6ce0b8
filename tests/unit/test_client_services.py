"""vlmserve_client's embeddings, OCR/region and /info calls against httpx.MockTransport (sync and async)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from vlmserve_client import (
    AsyncEmbeddingsClient,
    AsyncFlorence2Client,
    AsyncOcrClient,
    EmbeddingsClient,
    Florence2Client,
    ImageRef,
    ModelInfo,
    OcrClient,
    OcrResult,
    RegionDescription,
    VlmserveBadRequest,
    VlmserveError,
    VlmserveUnavailable,
)

from tests.unit.test_client_florence2 import PNG_1X1, Recorder, error_answer, form_fields, kinds, refuse, uploaded_file

CLIENTS = {"embeddings": (EmbeddingsClient, AsyncEmbeddingsClient), "ocr": (OcrClient, AsyncOcrClient),
           "florence2": (Florence2Client, AsyncFlorence2Client)}
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG_1X1).decode()
INFO = {
    "models": [
        {"id": "google/siglip-base-patch16-224", "triton_model": "siglip_embed_image", "family": "siglip",
         "task": "embed_image", "weights": "random", "ready": True, "device": "cpu", "runtime": "onnxruntime",
         "precision": "fp32", "supports_video": False, "max_new_tokens_limit": None},
        {"id": "google/siglip-base-patch16-224", "triton_model": "siglip_embed_text", "family": "siglip",
         "task": "embed_text", "weights": "random", "ready": False, "device": "cpu", "runtime": None,
         "precision": None, "supports_video": False, "max_new_tokens_limit": None},
        {"id": "Qwen/Qwen2-VL-2B-Instruct", "triton_model": "qwen2vl", "family": "qwen2vl", "task": "chat",
         "weights": "random", "ready": True, "device": "cpu", "runtime": "onnxruntime", "precision": "fp32",
         "supports_video": True, "max_new_tokens_limit": 1024},
    ],
    "model": "Qwen/Qwen2-VL-2B-Instruct",
    "max_new_tokens": 256,
    "limits": {"max_body_bytes": 4194304, "max_items": 64},
    "version": "0.1.0",
}


def call(kind: str, family: str, handler: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``method`` on a fresh sync or async client of ``family`` whose transport is ``handler``."""
    sync_cls, async_cls = CLIENTS[family]
    transport = httpx.MockTransport(handler)
    if kind == "sync":
        with sync_cls("http://gw.test", api_key="k", transport=transport) as client:
            return getattr(client, method)(*args, **kwargs)

    async def go() -> Any:
        async with async_cls("http://gw.test", api_key="k", transport=transport) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(go())


def sent_json(request: httpx.Request) -> Any:
    assert request.headers["content-type"] == "application/json"
    return json.loads(request.content)


# --- embeddings ----------------------------------------------------------------------------------


@kinds
def test_embed_images_sends_seed_004_shape(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG_1X1)
    rec = Recorder(httpx.Response(200, json=[[0.6, 0.8], [1, 0], [0, 1], [0.0, -1.0]]))
    images = [str(path), PNG_1X1, "https://img.test/cat.jpg", ImageRef("cat.png")]

    vectors = call(kind, "embeddings", rec, "embed_images", images)

    assert (rec.last.method, rec.last.url.path) == ("POST", "/embed")
    assert rec.last.headers["authorization"] == "Bearer k"
    assert sent_json(rec.last) == {"images": [PNG_URI, PNG_URI, "https://img.test/cat.jpg", "cat.png"]}
    assert vectors == [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    assert all(isinstance(x, float) for v in vectors for x in v)


@kinds
def test_embed_texts_and_model(kind: str) -> None:
    rec = Recorder(httpx.Response(200, json=[[1.0, 0.0], [0.0, 1.0]]))

    vectors = call(kind, "embeddings", rec, "embed_texts", ("a cat", "a dog"), model="siglip")

    assert rec.last.url.path == "/embed_text"
    assert sent_json(rec.last) == {"texts": ["a cat", "a dog"], "model": "siglip"}
    assert vectors == [[1.0, 0.0], [0.0, 1.0]]


@kinds
def test_single_item_helpers(kind: str) -> None:
    rec = Recorder(httpx.Response(200, json=[[0.5, 0.5]]))

    assert call(kind, "embeddings", rec, "embed_text", "hello") == [0.5, 0.5]
    assert sent_json(rec.last) == {"texts": ["hello"]}
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert call(kind, "embeddings", rec, "embed_image", image) == [0.5, 0.5]
    (ref,) = sent_json(rec.last)["images"]
    assert ref.startswith("data:image/png;base64,")
    assert base64.b64decode(ref.split(",", 1)[1]).startswith(b"\x89PNG")


def test_single_item_helper_rejects_a_wrong_count() -> None:
    with pytest.raises(VlmserveError, match="expected one vector"):
        call("sync", "embeddings", Recorder(httpx.Response(200, json=[[1.0], [2.0]])), "embed_text", "x")


def test_a_bare_string_is_not_a_list() -> None:
    rec = Recorder()
    with EmbeddingsClient("http://gw.test", transport=httpx.MockTransport(rec)) as client:
        with pytest.raises(TypeError, match="embed_text"):
            client.embed_texts("a cat")
        with pytest.raises(TypeError, match="embed_image"):
            client.embed_images("https://img.test/cat.jpg")
    assert rec.requests == []


@pytest.mark.parametrize("body", [{"data": []}, [1.0, 2.0], [["x"]]])
def test_malformed_vectors_are_an_error(body: Any) -> None:
    with pytest.raises(VlmserveError, match="malformed"):
        call("sync", "embeddings", Recorder(httpx.Response(200, json=body)), "embed_texts", ["x"])


@kinds
def test_embedding_errors_are_typed(kind: str) -> None:
    answer = error_answer(415, "images[0]: not an image", code="invalid_image", param="images[0]")

    with pytest.raises(VlmserveBadRequest) as exc:
        call(kind, "embeddings", Recorder(answer), "embed_images", [b"nope"])

    assert (exc.value.status_code, exc.value.code, exc.value.param) == (415, "invalid_image", "images[0]")


# --- OCR and regions -----------------------------------------------------------------------------


@kinds
def test_ocr_sends_seed_002_shape(kind: str) -> None:
    answer = {"text": "HELLO", "language": "russian", "model": "Qwen/Qwen2-VL-2B-Instruct", "latency_ms": 41}
    rec = Recorder(httpx.Response(200, json=answer))

    result = call(kind, "ocr", rec, "ocr", PNG_1X1, "russian", max_tokens=32)

    assert (rec.last.method, rec.last.url.path) == ("POST", "/ocr")
    assert sent_json(rec.last) == {"image": PNG_URI, "language": "russian", "max_tokens": 32}
    assert result == OcrResult("HELLO", "russian", "Qwen/Qwen2-VL-2B-Instruct", 41.0, answer)


def test_ocr_passes_references_and_model() -> None:
    rec = Recorder(httpx.Response(200, json={"text": "", "language": "auto", "model": "m"}))

    result = call("sync", "ocr", rec, "ocr", ImageRef("aGk="), model="smolvlm2")

    assert sent_json(rec.last) == {"image": "aGk=", "language": "auto", "model": "smolvlm2"}
    assert (result.text, result.latency_ms) == ("", None)


@kinds
def test_describe_region_uploads_a_local_image(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    path.write_bytes(PNG_1X1)
    answer = {"description": "a red square", "box": [0, 0, 1, 1.5], "model": "m", "latency_ms": 7.5}
    rec = Recorder(httpx.Response(200, json=answer))

    result = call(kind, "ocr", rec, "describe_region", path, (0, 0, 1, 1.5), prompt="What colour?", max_tokens=8)

    assert (rec.last.method, rec.last.url.path) == ("POST", "/v1/describe_region")
    assert form_fields(rec.last) == {"box": "0.0,0.0,1.0,1.5", "prompt": "What colour?", "max_tokens": "8"}
    assert uploaded_file(rec.last) == ("scene.png", "image/png", PNG_1X1)
    assert result == RegionDescription("a red square", (0.0, 0.0, 1.0, 1.5), "m", 7.5, answer)


def test_describe_region_sends_urls_and_box_strings_as_json() -> None:
    rec = Recorder(httpx.Response(200, json={"description": "d", "box": [1, 2, 3, 4], "model": "m"}))

    call("sync", "ocr", rec, "describe_region", "https://img.test/a.png", " 1, 2,3,4", model="qwen2vl")

    assert sent_json(rec.last) == {"image": "https://img.test/a.png", "box": " 1, 2,3,4", "model": "qwen2vl"}


@kinds
def test_region_errors_are_typed(kind: str) -> None:
    answer = error_answer(422, "box: x1 must be less than x2", param="box")

    with pytest.raises(VlmserveBadRequest, match="x1 must be less than x2") as exc:
        call(kind, "ocr", Recorder(answer), "describe_region", PNG_1X1, "5,0,1,1")

    assert exc.value.param == "box"


@pytest.mark.parametrize("body", [{"language": "auto"}, {"description": "d", "box": [1, 2]}])
def test_malformed_ocr_and_region_answers(body: dict[str, Any]) -> None:
    method, args = ("ocr", (PNG_1X1,)) if "language" in body else ("describe_region", (PNG_1X1, "0,0,1,1"))
    with pytest.raises(VlmserveError, match="malformed answer"):
        call("sync", "ocr", Recorder(httpx.Response(200, json=body)), method, *args)


def test_florence2_refuses_urls_it_cannot_upload() -> None:
    rec = Recorder()
    with Florence2Client("http://gw.test", transport=httpx.MockTransport(rec)) as client, \
            pytest.raises(ValueError, match="download URLs first"):
        client.caption("https://img.test/cat.jpg")
    assert rec.requests == []


# --- /info and readiness -------------------------------------------------------------------------


@kinds
def test_info(kind: str) -> None:
    rec = Recorder(httpx.Response(200, json=INFO))

    info = call(kind, "embeddings", rec, "info")

    assert (rec.last.method, rec.last.url.path) == ("GET", "/info")
    assert info.models[0] == ModelInfo("google/siglip-base-patch16-224", "siglip_embed_image", "siglip", "embed_image",
                                       True, "cpu", "onnxruntime", "fp32", "random", False, None)
    assert info.models[2].supports_video is True and info.models[2].max_new_tokens_limit == 1024
    assert (info.model, info.max_new_tokens, info.version) == ("Qwen/Qwen2-VL-2B-Instruct", 256, "0.1.0")
    assert info.limits == {"max_body_bytes": 4194304, "max_items": 64}
    assert info.ready("chat") and info.ready("embed_image") and not info.ready("embed_text")
    assert not info.ready("florence2")


@kinds
@pytest.mark.parametrize(("family", "text_ready", "ready"), [
    ("embeddings", False, False), ("embeddings", True, True), ("ocr", False, True),
])
def test_is_ready_from_info(kind: str, family: str, text_ready: bool, ready: bool) -> None:
    body = json.loads(json.dumps(INFO))
    body["models"][1]["ready"] = text_ready

    assert call(kind, family, Recorder(httpx.Response(200, json=body)), "is_ready") is ready


@kinds
@pytest.mark.parametrize("family", ["embeddings", "ocr"])
@pytest.mark.parametrize("handler", [refuse, Recorder(error_answer(401, "missing API key")),
                                     Recorder(httpx.Response(200, json={"models": [{"task": "chat"}]}))])
def test_is_ready_never_raises(kind: str, family: str, handler: Any) -> None:
    assert call(kind, family, handler, "is_ready") is False


@kinds
@pytest.mark.parametrize(("family", "method", "args"), [
    ("embeddings", "embed_texts", (["x"],)), ("ocr", "ocr", (PNG_1X1,)), ("embeddings", "info", ()),
])
def test_unreachable_gateway_is_unavailable(kind: str, family: str, method: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(VlmserveUnavailable) as exc:
        call(kind, family, refuse, method, *args)
    assert exc.value.code == "connection_error" and exc.value.status_code is None
