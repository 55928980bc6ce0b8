"""Florence-2 through the gateway (the Florence-2 service APIs) and the Python client, on the real stack."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image
from vlmserve_client import AsyncFlorence2Client, Florence2Client, VlmserveBadRequest

pytestmark = pytest.mark.integration

TASKS_WITH_TEXT = {
    "phrase_grounding": "a red car",
    "referring_expression_segmentation": "the car",
    "region_to_segmentation": "5,5,60,50",
    "open_vocabulary_detection": "car",
    "region_to_category": "5,5,60,50",
    "region_to_description": "<loc_10><loc_10><loc_500><loc_500>",
}
ALL_TASKS = [
    "caption", "detailed_caption", "more_detailed_caption", "object_detection", "dense_region_caption",
    "region_proposal", "ocr", "ocr_with_region", *TASKS_WITH_TEXT,
]


def png(size=(96, 72), color=(30, 140, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def gw(stack):
    with httpx.Client(base_url=stack.gateway, timeout=120) as client:
        yield client


def test_tasks_lists_every_task(gw) -> None:
    seed = gw.get("/tasks")
    assert seed.status_code == 200 and sorted(seed.json()["tasks"]) == sorted(ALL_TASKS)  # the old service's shape
    for details in (seed.json()["details"], gw.get("/v1/tasks").json()):
        tasks = {t["name"]: t for t in details}
        assert sorted(tasks) == sorted(ALL_TASKS)
        assert tasks["object_detection"]["token"] == "<OD>"
        assert tasks["phrase_grounding"]["needs_text"] is True and tasks["caption"]["needs_text"] is False


@pytest.mark.parametrize("task", ALL_TASKS)
def test_infer_every_task(gw, task) -> None:
    body = {"image_base64": base64.b64encode(png()).decode(), "task": task, "max_new_tokens": 4, "num_beams": 2}
    if task in TASKS_WITH_TEXT:
        body["text"] = TASKS_WITH_TEXT[task]
    r = gw.post("/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["task"] == task and out["task_token"].startswith("<")
    assert out["image_size"] == {"width": 96, "height": 72}
    assert out["latency_ms"] > 0 and isinstance(out["text"], str)
    if task in ("object_detection", "dense_region_caption", "region_proposal", "phrase_grounding"):
        assert isinstance(out["bboxes"], list) and isinstance(out["labels"], list) and "objects" in out
    if task == "ocr_with_region":
        assert "quad_boxes" in out
    if task in ("referring_expression_segmentation", "region_to_segmentation"):
        assert "polygons" in out


def test_infer_upload_and_token_names(gw) -> None:
    r = gw.post("/infer/upload", files={"file": ("x.png", png(), "image/png")},
                data={"task": "<OD>", "max_new_tokens": "4"})
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "object_detection"


@pytest.mark.parametrize("store", [False, True])
def test_v1_predict_both_store_modes(gw, store) -> None:
    r = gw.post("/v1/predict", files={"file": ("x.png", png(), "image/png")},
                data={"task": "<OD>", "store_image": str(store).lower(), "max_new_tokens": "4"})
    assert r.status_code == 200, r.text
    out = r.json()
    if store:
        for key in ("input_image_url", "output_image_url"):
            fetched = httpx.get(out[key], timeout=30)
            assert fetched.status_code == 200
            assert Image.open(io.BytesIO(fetched.content)).size == (96, 72)
    else:
        annotated = Image.open(io.BytesIO(base64.b64decode(out["annotated_image"])))
        assert annotated.size == (96, 72)


@pytest.mark.parametrize(("request_kwargs", "status", "fragment"), [
    ({"json": {"image_base64": base64.b64encode(png()).decode(), "task": "teleport"}}, (400, 422), "valid tasks"),
    ({"json": {"image_base64": base64.b64encode(png()).decode(), "task": "phrase_grounding"}}, (422,), "needs"),
    ({"json": {"image_base64": base64.b64encode(png()).decode(), "task": "region_to_category", "text": "1,2,3"}},
     (422,), "region"),
    ({"json": {"image_base64": "%%%", "task": "caption"}}, (400,), "base64"),
    ({"json": {"image_base64": base64.b64encode(b"not an image").decode(), "task": "caption"}}, (415,), "image"),
    ({"json": {"task": "caption"}}, (422,), "image_base64"),
    ({"json": {"image_base64": base64.b64encode(png()).decode(), "task": "caption", "max_new_tokens": 99999}},
     (422,), "max_new_tokens"),
])
def test_infer_bad_input_is_clear_4xx(gw, request_kwargs, status, fragment) -> None:
    r = gw.post("/infer", **request_kwargs)
    assert r.status_code in status, r.text
    assert fragment in r.json()["error"]["message"]


def test_upload_missing_file_is_422(gw) -> None:
    r = gw.post("/infer/upload", data={"task": "caption"})
    assert r.status_code == 422 and "file" in r.json()["error"]["message"]


def test_python_client_sync_and_async(stack) -> None:
    image = Image.new("RGB", (80, 60), (200, 50, 50))
    with Florence2Client(stack.gateway) as client:
        assert client.is_ready()
        assert len(client.tasks()) == 14
        det = client.run("object_detection", image, max_new_tokens=4)
        assert det.task == "object_detection" and det.image_size == (80, 60)
        assert isinstance(det.objects, list)
        caption = client.run("caption", png(), max_new_tokens=4)
        assert isinstance(caption.text, str)
        with pytest.raises(VlmserveBadRequest, match="needs"):
            client.run("phrase_grounding", image)

    async def main():
        async with AsyncFlorence2Client(stack.gateway) as client:
            results = await asyncio.gather(*[client.run("<OCR>", png(), max_new_tokens=3) for _ in range(4)])
            return [r.task for r in results]

    assert asyncio.run(main()) == ["ocr"] * 4


@pytest.mark.parametrize("size", [(1, 1), (5, 1)])
def test_infer_tiny_grayscale_image(gw, size) -> None:
    """An image 1 or 3 pixels high used to fail in the processor (channel axis guessed wrong)."""
    buf = io.BytesIO()
    Image.new("L", size, 200).save(buf, "PNG")
    body = {"image_base64": base64.b64encode(buf.getvalue()).decode(), "task": "caption", "max_new_tokens": 2,
            "num_beams": 1}
    r = gw.post("/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == {"width": size[0], "height": size[1]}
