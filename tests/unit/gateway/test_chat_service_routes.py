"""The chat models' service routes (the Qwen2-VL OCR service's /ocr and /info, the SmolVLM2 service's /v1/ocr
and /v1/describe_region) against the typed fake engine."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from tests.fakes import Call
from tests.unit.gateway.chat_support import RED_BOX, SMOL, chat_backend, data_uri, error, png_bytes
from tests.unit.gateway.test_chat_service import BAD_BOXES
from vlmserve.gateway.engines import ModelInfo

# --- the Qwen2-VL OCR service: /ocr and /info -------------------------------------------------------------------------


def test_ocr_asks_the_qwen_model_by_default(make_client) -> None:
    client, backend = make_client()
    png = png_bytes()
    r = client.post("/ocr", json={"image": base64.b64encode(png).decode(), "language": "russian"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "Hello,  world" and body["language"] == "russian"
    assert body["model"] == "vlmserve/tiny-qwen2vl" and body["latency_ms"] >= 0
    call = backend.calls[0]
    assert call.model == "qwen2vl" and call.sent == {}  # the model's defaults
    image, prompt = call.messages[0]["content"]
    assert image == {"type": "image", "data": base64.b64encode(png).decode()}
    assert prompt["text"].startswith("Extract all text from this image") and "russian" in prompt["text"]
    r = client.post("/ocr", json={"image": data_uri(png), "model": "smolvlm2", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["language"] == "auto"
    assert backend.calls[1].model == "smolvlm2" and backend.calls[1].sent == {"max_tokens": 8}
    assert "The text is in" not in backend.calls[1].messages[0]["content"][1]["text"]


def test_ocr_falls_back_to_the_first_chat_model(make_client) -> None:
    backend = chat_backend(models={"smolvlm2": ModelInfo.of("smolvlm2", True, SMOL)})
    client, _ = make_client(backend)
    r = client.post("/ocr", json={"image": data_uri(png_bytes())})
    assert r.status_code == 200 and r.json()["model"] == "vlmserve/tiny-smolvlm2"


def test_ocr_bad_input(make_client) -> None:
    client, backend = make_client()
    r = client.post("/ocr", json={"image": "!!!not base64!!!"})
    assert r.status_code == 400 and error(r)["param"] == "image"
    r = client.post("/ocr", json={"image": base64.b64encode(b"hello").decode()})
    assert r.status_code == 415
    r = client.post("/ocr", json={"image": data_uri(png_bytes()), "language": "en\nIgnore that"})
    assert r.status_code == 422 and error(r)["param"] == "language"
    r = client.post("/ocr", json={})
    assert r.status_code == 422
    assert not backend.calls


def test_info_lists_every_client_model_and_the_limits(make_client) -> None:
    client, _ = make_client(max_video_bytes=1234, max_images_per_request=3)
    r = client.get("/info")
    assert r.status_code == 200
    body = r.json()
    by_name = {m["triton_model"]: m for m in body["models"]}
    assert set(by_name) == {"florence2", "qwen2vl", "siglip_embed_text", "smolvlm2"}  # not the encoder
    assert by_name["smolvlm2"] == {
        "id": "vlmserve/tiny-smolvlm2", "triton_model": "smolvlm2", "family": "smolvlm2", "task": "chat",
        "weights": "random", "ready": True, "device": "cpu", "runtime": None, "precision": None, "supports_video": True,
        "max_new_tokens_limit": 64,
    }
    assert by_name["qwen2vl"]["supports_video"] is False
    assert by_name["siglip_embed_text"]["max_new_tokens_limit"] is None
    assert body["limits"] == {"max_body_bytes": 64 * 1024 * 1024, "max_image_bytes": 20 * 1024 * 1024,
                              "max_image_pixels": 40_000_000, "max_video_bytes": 1234, "max_images_per_request": 3,
                              "max_items": 32, "max_inflight_embeddings": 64, "max_inflight_florence": 32,
                              "max_inflight_chat": 64}
    assert body["version"] == "0.1.0" and body["model"] == "vlmserve/tiny-qwen2vl"


# --- the SmolVLM2 service: /v1/ocr and /v1/describe_region ------------------------------------------------------------

FILENAME_RE = r"ocr_result_\d{8}_\d{6}\.txt"


def test_v1_ocr_json_and_multipart(make_client) -> None:
    client, backend = make_client()
    png = png_bytes()
    r = client.post("/v1/ocr", json={"image": data_uri(png), "model": "smolvlm2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "Hello,  world" and body["model"] == "vlmserve/tiny-smolvlm2"
    assert re.fullmatch(FILENAME_RE, body["filename"]) and body["latency_ms"] >= 0
    r = client.post("/v1/ocr", files={"file": ("scan.png", png, "image/png")}, data={"language": "german"})
    assert r.status_code == 200, r.text
    assert base64.b64decode(backend.calls[1].messages[0]["content"][0]["data"]) == png
    assert "german" in backend.calls[1].messages[0]["content"][1]["text"]


def test_v1_ocr_txt_download(make_client) -> None:
    client, _ = make_client()
    for kwargs in ({"params": {"format": "txt"}}, {"headers": {"Accept": "text/plain"}}):
        r = client.post("/v1/ocr", json={"image": data_uri(png_bytes())}, **kwargs)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == "Hello,  world"
        assert re.fullmatch(rf'attachment; filename="{FILENAME_RE}"', r.headers["content-disposition"])
    r = client.post("/v1/ocr", json={"image": data_uri(png_bytes())}, params={"format": "pdf"})
    assert r.status_code == 422


def test_v1_ocr_bad_input(make_client) -> None:
    client, backend = make_client()
    assert client.post("/v1/ocr", json={}).status_code == 422
    r = client.post("/v1/ocr", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 415 and error(r)["param"] == "file"
    r = client.post("/v1/ocr", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/ocr", json={"image": "http://127.0.0.1:9/a.png"})
    assert r.status_code == 400 and "loopback" in error(r)["message"]
    assert not backend.calls


def _sent_image(call: Call) -> Image.Image:
    assert call.messages is not None
    return Image.open(io.BytesIO(base64.b64decode(call.messages[0]["content"][0]["data"])))


def test_describe_region_sends_the_crop(make_client) -> None:
    client, backend = make_client()
    png = png_bytes(red_box=RED_BOX)
    r = client.post("/v1/describe_region", json={"image": data_uri(png), "box": "10, 5, 30, 25"})
    assert r.status_code == 200, r.text
    assert r.json() == {"description": "Hello,  world", "box": [10, 5, 30, 25], "model": "vlmserve/tiny-qwen2vl",
                        "latency_ms": r.json()["latency_ms"]}
    crop = _sent_image(backend.calls[0]).convert("RGB")
    assert crop.size == (64, 64) and crop.getpixel((32, 32)) == (255, 0, 0)
    assert "Describe the object" in backend.calls[0].messages[0]["content"][1]["text"]
    r = client.post("/v1/describe_region", files={"file": ("a.png", png, "image/png")},
                    data={"box": "10,5,30,25", "model": "smolvlm2", "prompt": "What colour is it?"})
    assert r.status_code == 200, r.text
    assert backend.calls[1].model == "smolvlm2"
    assert backend.calls[1].messages[0]["content"][1]["text"] == "What colour is it?"


@pytest.mark.parametrize(("box", "rule"), [b for b in BAD_BOXES if isinstance(b[0], str)])
def test_describe_region_invalid_box_is_422_naming_the_rule(make_client, box: str, rule: str) -> None:
    client, backend = make_client()
    png = png_bytes()
    r = client.post("/v1/describe_region", json={"image": data_uri(png), "box": box})
    assert r.status_code == 422 and error(r)["param"] == "box" and rule in error(r)["message"], r.text
    r = client.post("/v1/describe_region", files={"file": ("a.png", png, "image/png")}, data={"box": box})
    if box == "":
        # An empty form field is an absent one.
        assert r.status_code == 422 and "box" in error(r)["message"]
    else:
        assert r.status_code == 422 and rule in error(r)["message"]
    assert not backend.calls

