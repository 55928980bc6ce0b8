"""Florence-2 gateway routes and logic, against the typed fake engine (no server, no tensors, no torch); the
Triton side of Florence-2 (its tensors) is tests/unit/gateway/backends/test_triton_tensors.py."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.fakes import Call, FakeEngine, FlorenceAnswer, model
from vlmserve.families.contract import MAX_NEW_TOKENS_LIMIT, FlorenceParams
from vlmserve.gateway.app import create_app
from vlmserve.gateway.engines import FlorenceRequest, ModelInfo
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.florence import (
    FlorenceInputError,
    TaskTable,
    UnknownTask,
    annotate,
    check_generation_args,
    image_format,
    oriented_size,
    prepare_text,
    shape_response,
)
from vlmserve.gateway.settings import GatewaySettings
from vlmserve.gateway.storage import LocalStore, S3Store, build_store
from vlmserve.model_repository.florence2_tasks import TASKS

WIDTH, HEIGHT = 64, 48
BACKGROUND = (128, 128, 128)
TASKS_JSON = json.dumps([t.as_dict() for t in TASKS])
PARAMS = {
    "family": "florence2",
    "task": "florence2",
    "source_model": "microsoft/Florence-2-large",
    "weights": "random",
    "max_new_tokens_limit": "1024",
    "num_beams_limit": "8",
    "tasks": TASKS_JSON,
}

# What the model returns per token (post_process_generation's value), in pixels of the 64x48 test image.
CANNED: dict[str, Any] = {
    "<CAPTION>": "a grey square",
    "<OCR>": "HELLO",
    "<OD>": {"bboxes": [[8.0, 8.0, 40.0, 30.0], [44.0, 10.0, 60.0, 40.0]], "labels": ["cat", "dog"]},
    "<REGION_PROPOSAL>": {"bboxes": [[2.0, 2.0, 20.0, 20.0]], "labels": [""]},
    "<CAPTION_TO_PHRASE_GROUNDING>": {"bboxes": [[8.0, 8.0, 40.0, 30.0]], "labels": ["a cat"]},
    "<OCR_WITH_REGION>": {"quad_boxes": [[4.0, 4.0, 30.0, 4.0, 30.0, 14.0, 4.0, 14.0]], "labels": ["HELLO"]},
    "<REFERRING_EXPRESSION_SEGMENTATION>": {"polygons": [[[10.0, 10.0, 50.0, 10.0, 50.0, 40.0, 10.0, 40.0]]],
                                            "labels": [""]},
    "<REGION_TO_SEGMENTATION>": {"polygons": [[[10.0, 10.0, 30.0, 10.0, 30.0, 30.0]]], "labels": [""]},
    "<OPEN_VOCABULARY_DETECTION>": {"bboxes": [[8.0, 8.0, 40.0, 30.0]], "bboxes_labels": ["cat"],
                                    "polygons": [], "polygons_labels": []},
    "<REGION_TO_CATEGORY>": "cat",
    "<REGION_TO_DESCRIPTION>": "a small cat",
}


def png_bytes(size: tuple[int, int] = (WIDTH, HEIGHT), color: tuple[int, ...] = BACKGROUND,
              mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def canned_answer(call: Call) -> dict[str, Any]:
    """The florence2 model's answer to a call: the CANNED result of its task token, sized to the sent image."""
    assert call.florence is not None
    token = call.florence.task_token
    width, height = decode(call.florence.image).size
    return {"task": token, "task_token": token, "text": f"</s><s>raw {token}</s>",
            "result": CANNED[token], "image_size": [width, height]}


def florence_backend(*, reachable: bool = True, params: dict[str, str] | None = None, ready: bool = True,
                     loaded: bool = True, answer: FlorenceAnswer | None = None) -> FakeEngine:
    """A registry with one florence2 model (``params``; none while not ``ready``, absent unless ``loaded``) beside
    an embedding model; it answers :func:`canned_answer` (or ``answer``)."""
    models = [model("siglip_embed_text", True, 32, family="siglip", task="embed_text")]
    if loaded:
        models.append(ModelInfo.of("florence2", ready, dict(PARAMS if params is None else params) if ready else {}, 8))
    return FakeEngine(models, florence={"florence2": answer or canned_answer}, reachable=reachable)


@pytest.fixture
def make_client(tmp_path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(backend: FakeEngine | None = None, **overrides: Any) -> tuple[TestClient, FakeEngine]:
        backend = backend or florence_backend()
        overrides.setdefault("storage_dir", str(tmp_path / "storage"))
        settings = GatewaySettings(**overrides)
        client = TestClient(create_app(settings, backend=backend), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client, backend

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def sent(backend: FakeEngine) -> FlorenceRequest:
    """What the gateway asked the engine to run last."""
    request = backend.calls[-1].florence
    assert request is not None
    return request


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


# --- pure logic -------------------------------------------------------------------------------------------


def served(**params: str) -> ModelInfo:
    return model("florence2", **{"family": "florence2", "task": "florence2", **params})


def test_task_table_comes_from_the_served_params() -> None:
    table = TaskTable.of(served(tasks=json.dumps([
        {"name": "caption", "token": "<CAPTION>", "needs_text": False, "description": "d", "text_hint": ""},
    ])))
    assert [t.name for t in table] == ["caption"]  # only what Triton serves, not the built-in table
    assert table.find("<caption>").name == "caption" and table.find(" Caption ").token == "<CAPTION>"
    with pytest.raises(UnknownTask, match=r"unknown task 'object_detection'; valid tasks: caption \(<CAPTION>\)"):
        table.find("object_detection")
    for bad in ({}, {"tasks": "not json"}, {"tasks": "[]"}, {"tasks": '[{"name": "x"}]'}):
        with pytest.raises(APIError) as err:
            TaskTable.of(served(**bad))
        assert err.value.status == 502 and "tasks" in err.value.message
    full = TaskTable.of(served(**PARAMS))
    assert full.find("<OD>").name == "object_detection"
    assert {t.name for t in full if t.takes_region} == {"region_to_segmentation", "region_to_category",
                                                         "region_to_description"}


def test_prepare_text_rules() -> None:
    table = TaskTable.of(served(**PARAMS))
    size = (WIDTH, HEIGHT)
    assert prepare_text(table.find("caption"), "ignored", size, 100) is None
    assert prepare_text(table.find("phrase_grounding"), "a cat", size, 100) == "a cat"
    with pytest.raises(FlorenceInputError) as err:
        prepare_text(table.find("phrase_grounding"), "  ", size, 100)
    assert err.value.status == 422 and "phrase_grounding" in err.value.message
    assert "a caption whose phrases to locate" in err.value.message
    with pytest.raises(FlorenceInputError) as err:
        prepare_text(table.find("phrase_grounding"), "x" * 101, size, 100)
    assert err.value.status == 413
    # 64x48 pixels -> 0..999 bins: 16/64 = 250, 12/48 = 250, 32/64 = 500, 36/48 = 750.
    region = table.find("region_to_category")
    assert prepare_text(region, "16,12,32,36", size, 100) == "<loc_250><loc_250><loc_500><loc_750>"
    assert prepare_text(region, "<loc_1><loc_2><loc_3><loc_4>", size, 100) == "<loc_1><loc_2><loc_3><loc_4>"
    for bad in ("1,2,3", "10,10,5,20", "0,0,65,10", "a,b,c,d"):
        with pytest.raises(FlorenceInputError) as err:
            prepare_text(region, bad, size, 100)
        assert err.value.status == 422 and err.value.code == "invalid_region"


def test_generation_limits() -> None:
    limits = served(max_new_tokens_limit="64", num_beams_limit="4", default_max_new_tokens="20",
                    default_num_beams="2").contract(FlorenceParams)
    assert (limits.max_new_tokens_limit, limits.num_beams_limit) == (64, 4)
    defaults = served().contract(FlorenceParams)
    assert (defaults.max_new_tokens_limit, defaults.num_beams_limit) == (MAX_NEW_TOKENS_LIMIT, 8)
    assert check_generation_args(64, 4, limits) == (64, 4)
    assert check_generation_args(None, None, limits) == (20, 2)  # the model's defaults, from its config
    assert check_generation_args(None, None, defaults) == (MAX_NEW_TOKENS_LIMIT, 3)
    for mnt, beams in ((0, None), (65, None), (None, 0), (None, 5)):
        with pytest.raises(FlorenceInputError, match="must be between 1 and"):
            check_generation_args(mnt, beams, limits)


def _shape(token: str, result: Any) -> dict[str, Any]:
    task = TaskTable.of(served(**PARAMS)).find(token)
    payload = {"task": task.name, "task_token": token, "text": "raw", "result": result, "image_size": [64, 48]}
    return shape_response(payload, task, model="m", latency_ms=12.3456, image_size=(1, 1))


BASE_KEYS = {"task", "task_token", "text", "result", "image_size", "latency_ms", "processing_time_ms", "model"}


def test_shape_text_result() -> None:
    body = _shape("<CAPTION>", "a grey square")
    assert set(body) == BASE_KEYS
    assert body["task"] == "caption" and body["task_token"] == "<CAPTION>" and body["result"] == "a grey square"
    assert body["text"] == "raw" and body["model"] == "m"
    assert body["image_size"] == {"width": 64, "height": 48}  # the model's size wins over the fallback
    assert body["latency_ms"] == body["processing_time_ms"] == 12.346


def test_shape_boxes() -> None:
    body = _shape("<OD>", CANNED["<OD>"])
    assert set(body) == BASE_KEYS | {"bboxes", "labels", "objects"}
    assert body["bboxes"] == CANNED["<OD>"]["bboxes"] and body["labels"] == ["cat", "dog"]
    assert body["objects"] == [{"label": "cat", "bbox": [8.0, 8.0, 40.0, 30.0]},
                               {"label": "dog", "bbox": [44.0, 10.0, 60.0, 40.0]}]
    # Fewer labels than boxes: padded so objects line up with the boxes.
    body = _shape("<REGION_PROPOSAL>", {"bboxes": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    assert body["labels"] == ["", ""] and len(body["objects"]) == 2


def test_shape_quad_boxes() -> None:
    body = _shape("<OCR_WITH_REGION>", CANNED["<OCR_WITH_REGION>"])
    assert set(body) == BASE_KEYS | {"quad_boxes", "labels", "objects"}
    assert body["quad_boxes"] == CANNED["<OCR_WITH_REGION>"]["quad_boxes"] and body["labels"] == ["HELLO"]
    assert body["objects"] == [{"label": "HELLO", "bbox": [4.0, 4.0, 30.0, 14.0],
                                "quad_box": [4.0, 4.0, 30.0, 4.0, 30.0, 14.0, 4.0, 14.0]}]


def test_shape_polygons() -> None:
    body = _shape("<REFERRING_EXPRESSION_SEGMENTATION>", CANNED["<REFERRING_EXPRESSION_SEGMENTATION>"])
    assert set(body) == BASE_KEYS | {"polygons", "labels", "objects"}
    assert body["polygons"] == CANNED["<REFERRING_EXPRESSION_SEGMENTATION>"]["polygons"]
    assert body["objects"] == [{"label": "", "bbox": [10.0, 10.0, 50.0, 40.0],
                                "polygons": [[10.0, 10.0, 50.0, 10.0, 50.0, 40.0, 10.0, 40.0]]}]


def test_shape_open_vocabulary() -> None:
    result = {"bboxes": [[8, 8, 40, 30]], "bboxes_labels": ["cat"],
              "polygons": [[[1, 1, 9, 1, 9, 9]]], "polygons_labels": ["dog"]}
    body = _shape("<OPEN_VOCABULARY_DETECTION>", result)
    assert set(body) == BASE_KEYS | {"bboxes", "bboxes_labels", "polygons", "polygons_labels", "labels", "objects"}
    assert body["bboxes_labels"] == body["labels"] == ["cat"] and body["polygons_labels"] == ["dog"]
    assert body["objects"] == [{"label": "cat", "bbox": [8, 8, 40, 30]},
                               {"label": "dog", "bbox": [1.0, 1.0, 9.0, 9.0], "polygons": [[1, 1, 9, 1, 9, 9]]}]


def test_annotate_draws_boxes_and_keeps_size() -> None:
    original = png_bytes()
    out = decode(annotate(original, CANNED["<OD>"]))
    assert out.format == "PNG" and out.size == (WIDTH, HEIGHT) and out.mode == "RGB"
    # A point on the first box's bottom edge (y=30) is coloured; the far corner is untouched.
    assert out.getpixel((24, 30)) != BACKGROUND
    assert out.getpixel((2, HEIGHT - 2)) == BACKGROUND
    # The two labels get different colours.
    assert out.getpixel((8, 30)) != out.getpixel((44, 40))


def test_annotate_fills_polygons_and_quads() -> None:
    out = decode(annotate(png_bytes(), CANNED["<REFERRING_EXPRESSION_SEGMENTATION>"]))
    inside = out.getpixel((30, 30))
    assert inside != BACKGROUND  # translucent mask over the grey
    out = decode(annotate(png_bytes(), CANNED["<OCR_WITH_REGION>"]))
    assert out.getpixel((17, 14)) != BACKGROUND and out.getpixel((60, 40)) == BACKGROUND
    # Quad boxes are outlined, not filled: the text they mark stays readable.
    out = decode(annotate(png_bytes(), {"quad_boxes": CANNED["<OCR_WITH_REGION>"]["quad_boxes"], "labels": [""]}))
    assert out.getpixel((17, 4)) != BACKGROUND and out.getpixel((17, 9)) == BACKGROUND


def test_annotate_text_result_and_bad_shapes_leave_image_unchanged() -> None:
    original = png_bytes()
    for result in ("a caption", {"bboxes": [["x", 1, 2, 3], [1, 2]], "labels": ["a", "b"]}, {"polygons": [[[1, 2]]]}):
        out = decode(annotate(original, result))
        assert out.size == (WIDTH, HEIGHT)
        assert np.array_equal(np.asarray(out), np.asarray(decode(original).convert("RGB")))
    # Alpha survives; JPEG input comes back as PNG.
    rgba = decode(annotate(png_bytes(mode="RGBA", color=(0, 0, 0, 0)), CANNED["<OD>"]))
    assert rgba.mode == "RGBA"
    jpeg = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND).save(jpeg, format="JPEG")
    assert decode(annotate(jpeg.getvalue(), "x")).format == "PNG"
    assert image_format(jpeg.getvalue()) == "jpg" and image_format(png_bytes()) == "png"
    assert image_format(b"junk") == "bin"


def rotated_jpeg() -> bytes:
    """A 64x48 JPEG whose EXIF says "rotate 90°": upright it is 48x64, as the model sees it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotation_is_applied_like_the_model_does() -> None:
    data = rotated_jpeg()
    assert decode(data).size == (WIDTH, HEIGHT)
    assert oriented_size(data, (WIDTH, HEIGHT)) == (HEIGHT, WIDTH)
    assert oriented_size(png_bytes(), (WIDTH, HEIGHT)) == (WIDTH, HEIGHT)
    assert decode(annotate(data, CANNED["<OD>"])).size == (HEIGHT, WIDTH)


# --- routes against a fake Triton ---------------------------------------------------------------------------


def test_tasks_routes_serve_the_triton_table(make_client) -> None:
    served = [TASKS[0].as_dict(), TASKS[3].as_dict()]
    client, _ = make_client(florence_backend(params=PARAMS | {"tasks": json.dumps(served)}))
    r = client.get("/v1/tasks")
    assert r.status_code == 200 and r.json() == served
    assert set(r.json()[0]) == {"name", "token", "needs_text", "description", "text_hint"}
    r = client.get("/tasks")
    body = r.json()
    assert body["tasks"] == ["caption", "object_detection"]
    assert body["descriptions"]["caption"] == TASKS[0].description
    assert body["details"] == served and body["model"] == "microsoft/Florence-2-large"


def test_triton_down_or_no_model_is_503(make_client) -> None:
    for backend, code in ((florence_backend(reachable=False), "triton_unavailable"),
                          (florence_backend(loaded=False), "model_not_loaded"),
                          (florence_backend(ready=False), "model_not_ready")):
        client, _ = make_client(backend)
        for r in (client.get("/tasks"), client.get("/v1/tasks"),
                  client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "caption"})):
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5" and error(r)["code"] == code


def test_bad_tasks_param_is_502(make_client) -> None:
    client, _ = make_client(florence_backend(params=PARAMS | {"tasks": "oops"}))
    r = client.get("/v1/tasks")
    assert r.status_code == 502 and "tasks" in error(r)["message"]


def test_infer_caption(make_client) -> None:
    client, backend = make_client()
    r = client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "caption", "text": "ignored"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == BASE_KEYS
    assert body["task"] == "caption" and body["task_token"] == "<CAPTION>" and body["result"] == "a grey square"
    assert body["text"] == "</s><s>raw <CAPTION></s>" and body["model"] == "microsoft/Florence-2-large"
    assert body["image_size"] == {"width": WIDTH, "height": HEIGHT} and body["latency_ms"] >= 0
    [call] = backend.calls
    assert call.kind == "florence" and call.model == "florence2" and call.florence is not None
    # Text for a task that takes none is dropped; the knobs are the model's defaults (its config).
    assert call.florence.text is None and (call.florence.max_new_tokens, call.florence.num_beams) == (1024, 3)
    assert call.florence.image == png_bytes() and call.florence.task_token == "<CAPTION>"
    # The Florence-2 service's defaults: task "caption"; a data URI works too.
    r = client.post("/infer", json={"image_base64": "data:image/png;base64," + b64(png_bytes())})
    assert r.status_code == 200 and r.json()["task"] == "caption"
    metrics = client.get("/metrics").text
    assert 'vlmserve_inference_items_total{model="florence2"} 2.0' in metrics


def test_infer_object_detection_by_token(make_client) -> None:
    client, _ = make_client()
    r = client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "<OD>"})
    body = r.json()
    assert r.status_code == 200 and body["task"] == "object_detection"
    assert body["bboxes"] == CANNED["<OD>"]["bboxes"] and body["labels"] == ["cat", "dog"]
    assert body["objects"][1] == {"label": "dog", "bbox": [44.0, 10.0, 60.0, 40.0]}


def test_region_is_converted_to_loc_tokens_before_triton(make_client) -> None:
    client, backend = make_client()
    r = client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "region_to_category",
                                    "text": "16,12,32,36"})
    assert r.status_code == 200 and r.json()["result"] == "cat"
    assert sent(backend).text == "<loc_250><loc_250><loc_500><loc_750>"
    calls = len(backend.calls)
    r = client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "region_to_description",
                                    "text": "10,10,100,20"})
    assert r.status_code == 422 and error(r)["code"] == "invalid_region"
    assert "x2 <= 64" in error(r)["message"] and len(backend.calls) == calls  # refused before Triton


def test_region_uses_the_upright_image_size(make_client) -> None:
    client, backend = make_client()
    image = b64(rotated_jpeg())  # 48 wide, 64 high once upright
    r = client.post("/infer", json={"image_base64": image, "task": "region_to_category", "text": "0,0,48,64"})
    assert r.status_code == 200, r.text
    assert sent(backend).text == "<loc_0><loc_0><loc_999><loc_999>"
    r = client.post("/infer", json={"image_base64": image, "task": "region_to_category", "text": "0,0,64,48"})
    assert r.status_code == 422 and "x2 <= 48" in error(r)["message"]


def test_text_rules_through_the_api(make_client) -> None:
    client, backend = make_client(max_text_chars=50)
    image = b64(png_bytes())
    r = client.post("/infer", json={"image_base64": image, "task": "phrase_grounding"})
    assert r.status_code == 422
    assert "'phrase_grounding' needs text" in error(r)["message"] and "caption whose phrases" in error(r)["message"]
    # The Florence-2 service sends the prompt as text_input.
    r = client.post("/infer", json={"image_base64": image, "task": "phrase_grounding", "text_input": "a cat"})
    assert r.status_code == 200 and sent(backend).text == "a cat"
    assert r.json()["objects"] == [{"label": "a cat", "bbox": [8.0, 8.0, 40.0, 30.0]}]
    r = client.post("/infer", json={"image_base64": image, "task": "phrase_grounding", "text": "a", "text_input": "b"})
    assert r.status_code == 422
    r = client.post("/infer", json={"image_base64": image, "task": "phrase_grounding", "text": "x" * 51})
    assert r.status_code == 413 and error(r)["code"] == "text_too_long"


def test_unknown_task_lists_the_valid_ones(make_client) -> None:
    client, backend = make_client()
    r = client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "<NOPE>"})
    assert r.status_code == 422 and error(r)["param"] == "task"
    assert "unknown task '<NOPE>'; valid tasks: caption (<CAPTION>)" in error(r)["message"]
    assert not backend.calls


def test_generation_args(make_client) -> None:
    client, backend = make_client(florence_backend(params=PARAMS | {"num_beams_limit": "4"}))
    image = b64(png_bytes())
    for extra in ({"max_new_tokens": 1025}, {"num_beams": 5}):  # the served model's limits
        r = client.post("/infer", json={"image_base64": image, "task": "caption", **extra})
        assert r.status_code == 422 and "must be between 1 and" in error(r)["message"], extra
    r = client.post("/infer", json={"image_base64": image, "task": "caption", "max_new_tokens": 0})
    assert r.status_code == 422 and error(r)["param"] == "max_new_tokens"  # the schema's minimum
    r = client.post("/infer", json={"image_base64": image, "task": "caption", "max_new_tokens": 16, "num_beams": 4})
    assert r.status_code == 200
    assert (sent(backend).max_new_tokens, sent(backend).num_beams) == (16, 4)


def test_bad_images(make_client) -> None:
    client, backend = make_client(max_image_pixels=1000)
    r = client.post("/infer", json={"image_base64": "!!!not base64!!!", "task": "caption"})
    assert r.status_code == 400 and error(r)["param"] == "image_base64"
    r = client.post("/infer", json={"image_base64": b64(b"just some text, no image"), "task": "caption"})
    assert r.status_code == 415
    r = client.post("/infer", json={"image_base64": b64(png_bytes((100, 100))), "task": "caption"})
    assert r.status_code == 413 and "pixels" in error(r)["message"]
    r = client.post("/infer/upload", files={"file": ("x.png", b"", "image/png")}, data={"task": "caption"})
    assert r.status_code == 400 and error(r)["param"] == "file"
    r = client.post("/infer", json={"task": "caption"})
    assert r.status_code == 422 and "image_base64" in error(r)["message"]
    assert not backend.calls


def test_an_engine_error_reaches_the_client_as_it_is(make_client) -> None:
    # The engine's own 502 for an unreadable answer (tests/unit/gateway/backends/test_triton_tensors.py).
    failure = APIError(502, "florence2 returned an unreadable result", code="bad_model_output")
    client, _ = make_client(florence_backend(answer=failure))
    r = client.post("/infer", json={"image_base64": b64(png_bytes()), "task": "caption"})
    assert r.status_code == 502 and error(r)["code"] == "bad_model_output"


def test_infer_upload(make_client) -> None:
    client, backend = make_client()
    r = client.post("/infer/upload", files={"file": ("a.png", png_bytes(), "image/png")},
                    data={"task": "ocr_with_region", "max_new_tokens": "32"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["quad_boxes"] == CANNED["<OCR_WITH_REGION>"]["quad_boxes"] and body["labels"] == ["HELLO"]
    assert sent(backend).max_new_tokens == 32
    r = client.post("/infer/upload", files={"file": ("a.png", png_bytes(), "image/png")})  # task defaults
    assert r.status_code == 200 and r.json()["task"] == "caption"
    r = client.post("/infer/upload", data={"task": "caption"})
    assert r.status_code == 422 and "file" in error(r)["message"]
    r = client.post("/infer/upload", files={"file": ("a.png", png_bytes(), "image/png")},
                    data={"task": "caption", "num_beams": "many"})
    assert r.status_code == 422 and "num_beams" in error(r)["message"]


def test_predict_without_storage_returns_annotated_png(make_client, tmp_path) -> None:
    client, backend = make_client()
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")},
                    data={"task": "<OD>", "store_image": "false"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "object_detection" and body["task_token"] == "<OD>"
    assert body["store_image_enabled"] is False and body["result_data"] == {"<OD>": CANNED["<OD>"]}
    assert body["bboxes"] == CANNED["<OD>"]["bboxes"] and len(body["request_id"]) == 32
    assert "input_image_url" not in body and "output_image_url" not in body
    out = decode(base64.b64decode(body["annotated_image"]))
    assert out.format == "PNG" and out.size == (WIDTH, HEIGHT) and out.getpixel((24, 30)) != BACKGROUND
    assert not (tmp_path / "storage").exists()  # nothing stored
    # Text-only task: the original picture comes back (as PNG).
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")},
                    data={"task": "<CAPTION>", "store_image": "false", "text_input": ""})
    out = decode(base64.b64decode(r.json()["annotated_image"]))
    assert np.array_equal(np.asarray(out), np.asarray(decode(png_bytes())))
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 422 and "task" in error(r)["message"]


def test_predict_stores_in_local_folder_and_serves_files(make_client, tmp_path) -> None:
    client, _ = make_client(api_keys=["k"])
    auth = {"Authorization": "Bearer k"}
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")},
                    data={"task": "<REFERRING_EXPRESSION_SEGMENTATION>", "text": "the square"}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["store_image_enabled"] is True and "annotated_image" not in body
    assert body["input_image"] == body["input_image_url"] and body["output_visualized"] == [body["output_image_url"]]
    assert body["input_image_url"].startswith("http://testserver/files/")
    stored = sorted(p.name for p in (tmp_path / "storage").iterdir())
    assert len(stored) == 2
    got_in = client.get(body["input_image_url"])  # no API key needed: the random name is the credential
    assert got_in.status_code == 200 and got_in.content == png_bytes()
    assert got_in.headers["content-type"] == "image/png"
    got_out = client.get(body["output_image_url"])
    out = decode(got_out.content)
    assert out.size == (WIDTH, HEIGHT) and out.getpixel((30, 30)) != BACKGROUND
    for bad in ("..%2F..%2Fetc%2Fpasswd", "..", "%2e%2e", "0" * 32 + ".png", "x.png", stored[0].upper()):
        r = client.get(f"/files/{bad}")
        assert r.status_code == 404, bad
    assert client.get("/v1/tasks").status_code == 401  # the Florence routes do need the key


def test_public_base_url_setting(make_client) -> None:
    client, _ = make_client(public_base_url="https://vlm.example.com/")
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")}, data={"task": "<OCR>"})
    assert r.json()["output_image_url"].startswith("https://vlm.example.com/files/")


def test_build_store_picks_by_settings(tmp_path) -> None:
    assert isinstance(build_store(GatewaySettings(storage_dir=str(tmp_path))), LocalStore)
    s3 = build_store(GatewaySettings(storage_s3_bucket="b", storage_s3_prefix="p/", storage_url_expiry_s=60))
    assert isinstance(s3, S3Store) and s3.bucket == "b" and s3.prefix == "p/" and s3.expiry_s == 60


def test_local_store_default_dir_is_lazy(monkeypatch, tmp_path) -> None:
    store = LocalStore()
    monkeypatch.setenv("VLMSERVE_HOME", str(tmp_path / "home"))
    assert store.root == (tmp_path / "home" / "storage").resolve()
    assert not store.root.exists()  # nothing created until the first put


# --- S3 through a real (moto) server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


S3_CREDS = {"storage_s3_access_key_id": "testing", "storage_s3_secret_access_key": "testing",
            "storage_s3_region": "us-east-1"}


def _make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)


def test_s3_store_round_trip_with_presigned_url(s3_endpoint) -> None:
    import asyncio

    _make_bucket(s3_endpoint, "direct")
    store = build_store(GatewaySettings(storage_s3_bucket="direct", storage_s3_endpoint_url=s3_endpoint,
                                        storage_s3_prefix="florence/", storage_url_expiry_s=120, **S3_CREDS))
    assert isinstance(store, S3Store)
    data = png_bytes()
    stored = asyncio.run(store.put(data, "png", "http://ignored"))
    assert stored.key.startswith("florence/") and stored.key.endswith(".png")
    assert "X-Amz-Signature=" in stored.url and "X-Amz-Expires=120" in stored.url
    r = httpx.get(stored.url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/png"


def test_predict_stores_in_s3(make_client, s3_endpoint) -> None:
    _make_bucket(s3_endpoint, "predict")
    client, _ = make_client(storage_s3_bucket="predict", storage_s3_endpoint_url=s3_endpoint, **S3_CREDS)
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")}, data={"task": "<OD>"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input_image_url"].startswith(s3_endpoint + "/predict/")
    assert httpx.get(body["input_image_url"]).content == png_bytes()
    out = decode(httpx.get(body["output_image_url"]).content)
    assert out.size == (WIDTH, HEIGHT) and out.getpixel((24, 30)) != BACKGROUND
    key = body["input_image_url"].split("/predict/", 1)[1].split("?", 1)[0]
    assert client.get(f"/files/{key}").status_code == 404  # S3 objects are not served by the gateway


def test_s3_failure_is_502_not_500(make_client, s3_endpoint) -> None:
    client, _ = make_client(storage_s3_bucket="no-such-bucket", storage_s3_endpoint_url=s3_endpoint, **S3_CREDS)
    r = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")}, data={"task": "<OD>"})
    assert r.status_code == 502 and error(r)["code"] == "storage_failed"
    assert "NoSuchBucket" in error(r)["message"] and "store_image=false" in error(r)["message"]
