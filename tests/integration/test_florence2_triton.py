"""Florence-2 through the real Triton, as a ``tritonclient`` user calls it (HTTP and gRPC)."""

from __future__ import annotations

import concurrent.futures
import io
import json

import httpx
import pytest
from PIL import Image

from vlmserve.families.tensors import FlorenceTensors

pytestmark = pytest.mark.integration


def png(size=(96, 72), color=(200, 120, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def http_call(stack, task: str, text: str | None = None, max_new_tokens: int | None = 4, image: bytes | None = None):
    import tritonclient.http as th

    client = th.InferenceServerClient(stack.triton_http.removeprefix("http://"))
    inputs = []
    t = FlorenceTensors
    named = [(t.IMAGE, image or png()), (t.TASK, task)] + ([(t.TEXT, text)] if text else [])
    for spec, value in named:
        item = th.InferInput(spec.name, [1, 1], "BYTES")
        item.set_data_from_numpy(spec.pack([value]))
        inputs.append(item)
    if max_new_tokens is not None:
        item = th.InferInput(t.MAX_NEW_TOKENS.name, [1, 1], "INT32")
        item.set_data_from_numpy(t.MAX_NEW_TOKENS.pack([max_new_tokens]))
        inputs.append(item)
    return json.loads(client.infer("florence2", inputs).as_numpy(t.RESULT.name)[0, 0])


@pytest.mark.parametrize(("task", "text"), [
    ("<OD>", None), ("caption", None), ("ocr_with_region", None),
    ("phrase_grounding", "a red car"), ("region_to_description", "5,5,40,40"),
])
def test_direct_http_tasks(stack, task, text) -> None:
    out = http_call(stack, task, text)
    assert out["image_size"] == [96, 72]
    assert out["task_token"].startswith("<") and isinstance(out["text"], str)


def test_direct_grpc_and_errors(stack) -> None:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(stack.triton_grpc)
    t = FlorenceTensors
    image = tg.InferInput(t.IMAGE.name, [1, 1], "BYTES")
    image.set_data_from_numpy(t.IMAGE.pack([png()]))
    task = tg.InferInput(t.TASK.name, [1, 1], "BYTES")
    task.set_data_from_numpy(t.TASK.pack([b"referring_expression_segmentation"]))
    with pytest.raises(Exception, match=f"needs {t.TEXT.name}"):
        client.infer("florence2", [image, task])
    text = tg.InferInput(t.TEXT.name, [1, 1], "BYTES")
    text.set_data_from_numpy(t.TEXT.pack([b"the cat"]))
    tokens = tg.InferInput(t.MAX_NEW_TOKENS.name, [1, 1], "INT32")
    tokens.set_data_from_numpy(t.MAX_NEW_TOKENS.pack([3]))
    out = json.loads(client.infer("florence2", [image, task, text, tokens]).as_numpy(t.RESULT.name)[0, 0])
    assert out["task"] == "referring_expression_segmentation" and "polygons" in out["result"]


def test_concurrent_requests_are_batched_into_one_generate(stack) -> None:
    def stats() -> tuple[int, int]:
        s = httpx.get(f"{stack.triton_http}/v2/models/florence2/stats").json()["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    inf0, exe0 = stats()
    tasks = ["<OD>", "caption", "ocr", "<DENSE_REGION_CAPTION>"] * 4
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda t: http_call(stack, t, max_new_tokens=4), tasks))
    assert [r["task_token"] for r in results] == ["<OD>", "<CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>"] * 4
    inf1, exe1 = stats()
    assert inf1 - inf0 == 16
    assert exe1 - exe0 < 16, f"no batching: {exe1 - exe0} executions for 16 requests"
