"""The spine end to end: real tritonserver + gateway on tiny SigLIP, over HTTP, the openai SDK and tritonclient."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors, TensorSpec

pytestmark = pytest.mark.integration


def png_bytes(color=(10, 200, 30), size=(48, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (1-bit): cheap to send, huge to decode."""
    raw = zlib.compress(b"\x00" * (height * ((width + 7) // 8 + 1)), 9)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def gw(stack):
    with httpx.Client(base_url=stack.gateway, timeout=60) as client:
        yield client


def triton_http_embed(stack, model: str, tensor: TensorSpec, items: list[bytes]) -> np.ndarray:
    """``items`` as ``tensor`` (``EmbedImageTensors.IMAGE`` or ``EmbedTextTensors.TEXT``) straight to Triton."""
    import tritonclient.http as th

    client = th.InferenceServerClient(stack.triton_http.removeprefix("http://"))
    inp = th.InferInput(tensor.name, [len(items), 1], "BYTES")
    inp.set_data_from_numpy(tensor.pack(items))
    return client.infer(model, [inp]).as_numpy(EmbedImageTensors.EMBEDDING.name)


def test_health_reports_models_and_random_weights(gw) -> None:
    r = gw.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "vlmserve/tiny-siglip"
    assert body["device"] == "cpu" and body["cuda_available"] is False
    assert body["weights"] == "random" and "random" in body["warning"]
    assert body["models"] == {"siglip_embed_image": True, "siglip_embed_text": True, "siglip_text": True,
                              "siglip_vision": True, "siglip2_embed_image": True, "siglip2_embed_text": True,
                              "siglip2_text": True, "siglip2_vision": True, "florence2": True, "florence2_vision": True,
                              "smolvlm2": True, "smolvlm2_vision": True, "qwen2vl": True}


def test_embed_all_image_reference_kinds_and_match_triton_direct(gw, stack, image_server) -> None:
    red = (stack.image_dir / "red.png").read_bytes()
    refs = [
        data_uri(red),
        base64.b64encode(red).decode(),
        str(stack.image_dir / "red.png"),
        f"{image_server}/red.png",
    ]
    r = gw.post("/embed", json={"images": refs})
    assert r.status_code == 200, r.text
    vectors = np.array(r.json(), dtype=np.float32)
    assert vectors.shape == (4, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Same image four ways -> the same vector; and what a Triton direct client gets.
    direct = triton_http_embed(stack, "siglip_embed_image", EmbedImageTensors.IMAGE, [red])
    for v in vectors:
        assert np.allclose(v, direct[0], atol=1e-5)
    other = np.array(gw.post("/embed", json={"images": [str(stack.image_dir / "blue.jpg")]}).json())
    assert not np.allclose(other[0], direct[0], atol=1e-3)


def test_embed_text_both_forms_match_triton_direct(gw, stack) -> None:
    many = gw.post("/embed_text", json={"texts": ["a photo of a cat", "hello world"]})
    one = gw.post("/embed_text", json={"text": "a photo of a cat"})
    assert many.status_code == 200 and one.status_code == 200
    many_v, one_v = np.array(many.json()), np.array(one.json())
    assert many_v.shape == (2, 32) and one_v.shape == (1, 32)
    assert np.allclose(many_v[0], one_v[0], atol=1e-5)
    assert not np.allclose(many_v[0], many_v[1], atol=1e-3)
    direct = triton_http_embed(stack, "siglip_embed_text", EmbedTextTensors.TEXT, [b"a photo of a cat"])
    assert np.allclose(one_v[0], direct[0], atol=1e-5)


def test_triton_grpc_client(stack) -> None:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(stack.triton_grpc)
    assert client.is_model_ready("siglip_embed_image")
    inp = tg.InferInput(EmbedImageTensors.IMAGE.name, [2, 1], "BYTES")
    inp.set_data_from_numpy(EmbedImageTensors.IMAGE.pack([png_bytes(), png_bytes((0, 0, 0))]))
    out = client.infer("siglip_embed_image", [inp]).as_numpy(EmbedImageTensors.EMBEDDING.name)
    assert out.shape == (2, 32) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # A bad image from a direct client is that request's INVALID_ARG error, not a crash.
    bad = tg.InferInput(EmbedImageTensors.IMAGE.name, [1, 1], "BYTES")
    bad.set_data_from_numpy(EmbedImageTensors.IMAGE.pack([b"not an image"]))
    with pytest.raises(Exception, match="not a decodable image"):
        client.infer("siglip_embed_image", [bad])
    assert client.is_model_ready("siglip_embed_image")


def test_openai_sdk_embeddings_float_and_base64(stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused")
    default = client.embeddings.create(model="vlmserve/tiny-siglip", input=["a photo of a cat", "hello"])
    floats = client.embeddings.create(model="siglip", input="a photo of a cat", encoding_format="float")
    assert len(default.data) == 2 and len(default.data[0].embedding) == 32
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    assert default.model == "vlmserve/tiny-siglip"
    assert default.usage.prompt_tokens > 0
    images = client.embeddings.create(model="siglip", input=[data_uri(png_bytes())], extra_body={"modality": "image"})
    assert len(images.data[0].embedding) == 32
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["vlmserve/tiny-florence2", "vlmserve/tiny-qwen2vl",
                                                 "vlmserve/tiny-siglip", "vlmserve/tiny-siglip2",
                                                 "vlmserve/tiny-smolvlm2"]
    # The runtime export chose on this host, per Triton model, and why (export/runtime_choice.py).
    siglip = next(m for m in models.data if m.id == "vlmserve/tiny-siglip").model_extra
    chosen = siglip["runtimes"]["siglip_embed_image"]
    assert (chosen["runtime"], chosen["precision"]) in {("onnxruntime", "fp32"), ("openvino", "fp32"),
                                                        ("openvino", "bf16")}
    assert chosen["why"].startswith(f"{chosen['runtime']}/{chosen['precision']}") and "cosine" in chosen["why"]
    florence = next(m for m in models.data if m.id == "vlmserve/tiny-florence2").model_extra
    assert florence["runtimes"]["florence2"]["decoder_precision"] in ("fp32", "bf16")


def test_openai_sdk_unknown_model_is_404(stack) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError, match="available: .*vlmserve/tiny-siglip"):
        client.embeddings.create(model="gpt-nope", input="x")


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"images": ["@@@not base64@@@"]}, 400, "invalid base64"),
        ({"images": [base64.b64encode(b"just some text, not an image").decode()]}, 415, "not a decodable image"),
        ({"images": [data_uri(bomb_png(30000, 30000))]}, 413, "pixels"),
        ({"images": []}, 400, "empty"),
        ({"images": [data_uri(png_bytes())] * 33}, 413, "at most 32"),
        ({"images": ["http://169.254.169.254/latest/meta-data"]}, 400, "link-local"),
        ({"images": ["http://10.0.0.1/x.png"]}, 400, "private"),
        ({"images": ["http://[::1]:9/x.png"]}, 400, "loopback"),
        ({"images": ["file:///etc/passwd"]}, 400, "scheme"),
        ({"images": ["/etc/passwd"]}, 400, "outside the allowed folder"),
        ({"images": [123]}, 422, "valid string"),
        ({"images": [data_uri(png_bytes())], "model": "nope"}, 404, "not found"),
    ],
)
def test_bad_image_inputs_are_clear_4xx(gw, payload, status, fragment) -> None:
    r = gw.post("/embed", json=payload)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert "Traceback" not in r.text


def test_path_traversal_is_refused(gw, stack) -> None:
    r = gw.post("/embed", json={"images": [str(stack.image_dir / ".." / ".." / "etc" / "passwd.png")]})
    assert r.status_code == 400 and "outside the allowed folder" in r.json()["error"]["message"]


def test_oversize_body_is_413(gw) -> None:
    r = gw.post("/embed_text", json={"texts": ["x" * (5 * 1024 * 1024)]})
    assert r.status_code == 413


def test_server_survives_bad_input_and_keeps_serving(gw) -> None:
    for _ in range(3):
        gw.post("/embed", json={"images": [data_uri(b"garbage")]})
    assert gw.post("/embed_text", json={"text": "still alive"}).status_code == 200
    assert gw.get("/health").status_code == 200


def test_concurrent_requests_are_batched_by_triton(stack) -> None:
    """Evidence of dynamic batching: Triton ran fewer executions than it served inferences."""
    import tritonclient.http as th

    def stats() -> tuple[int, int]:
        s = httpx.get(f"{stack.triton_http}/v2/models/siglip_embed_image/stats").json()["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    inf0, exe0 = stats()
    image = png_bytes()

    def call(_: int) -> np.ndarray:
        client = th.InferenceServerClient(stack.triton_http.removeprefix("http://"))
        inp = th.InferInput(EmbedImageTensors.IMAGE.name, [1, 1], "BYTES")
        inp.set_data_from_numpy(EmbedImageTensors.IMAGE.pack([image]))
        return client.infer("siglip_embed_image", [inp]).as_numpy(EmbedImageTensors.EMBEDDING.name)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(64)))
    assert all(r.shape == (1, 32) for r in results)
    inf1, exe1 = stats()
    assert inf1 - inf0 == 64
    assert exe1 - exe0 < 64, f"no batching: {exe1 - exe0} executions for 64 requests"


def test_gateway_concurrency_returns_each_callers_own_result(stack) -> None:
    texts = [f"caption number {i}" for i in range(16)]

    def call(t: str):
        return np.array(httpx.post(f"{stack.gateway}/embed_text", json={"text": t}, timeout=60).json()[0])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        concurrent_vectors = list(pool.map(call, texts))
    sequential = np.array(httpx.post(f"{stack.gateway}/embed_text", json={"texts": texts}, timeout=60).json())
    for got, want in zip(concurrent_vectors, sequential, strict=True):
        assert np.allclose(got, want, atol=1e-5)


def test_metrics_after_traffic(gw) -> None:
    gw.post("/embed_text", json={"text": "metrics"})
    text = gw.get("/metrics").text
    assert 'vlmserve_requests_total{method="POST",route="/embed_text",status="200"}' in text
    assert 'vlmserve_inference_items_total{model="siglip_embed_text"}' in text
    assert "vlmserve_request_latency_seconds_bucket" in text
