"""Chat and OCR through the gateway on the real stack: the openai SDK (streaming and not), images, video,
the Qwen2-VL OCR service's /ocr and /info, the SmolVLM2 service's /v1/ocr (+ download) and /v1/describe_region."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.integration.test_chat_triton import mp4

pytestmark = pytest.mark.integration


def png_bytes(size=(80, 60), color=(30, 160, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_openai_sdk_non_streaming_with_image(client, model) -> None:
    reply = client.chat.completions.create(
        model=model, max_tokens=5, temperature=0.7, seed=11,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                               {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}}]}],
    )
    assert reply.object == "chat.completion" and reply.model.startswith("vlmserve/tiny-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 5 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_openai_sdk_streaming_matches_non_streaming(client, model) -> None:
    kwargs = {"model": model, "max_tokens": 6, "temperature": 0.9, "seed": 5,
                  "messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Say something."}]}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6


def test_openai_sdk_video(client) -> None:
    reply = client.chat.completions.create(
        model="smolvlm2", max_tokens=4,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_uri(mp4(), "video/mp4")}},
            {"type": "text", "text": "What happens in the video?"},
        ]}],
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 40  # frames became image tokens


def test_openai_errors(client) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen2vl", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}])
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="qwen2vl", messages=[])
    assert 400 <= info.value.status_code < 500


def test_seed_002_ocr_and_info(stack) -> None:
    r = httpx.post(f"{stack.gateway}/ocr", json={"image": base64.b64encode(png_bytes()).decode(), "language": "ru"},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"text", "language", "model", "latency_ms"} and body["language"] == "ru"
    assert body["model"] == "vlmserve/tiny-qwen2vl"
    info = httpx.get(f"{stack.gateway}/info", timeout=30).json()
    ids = {m["id"] for m in info["models"]}
    assert {"vlmserve/tiny-qwen2vl", "vlmserve/tiny-smolvlm2", "vlmserve/tiny-siglip"} <= ids
    assert info["limits"]["max_image_bytes"] > 0


def test_seed_003_ocr_plain_text_and_download(stack) -> None:
    image = base64.b64encode(png_bytes()).decode()
    r = httpx.post(f"{stack.gateway}/v1/ocr", json={"image": image, "model": "smolvlm2"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["filename"].startswith("ocr_result_") and r.json()["filename"].endswith(".txt")
    download = httpx.post(f"{stack.gateway}/v1/ocr?format=txt", json={"image": image, "model": "smolvlm2"},
                          timeout=120)
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("text/plain")
    assert 'filename="ocr_result_' in download.headers["content-disposition"]
    upload = httpx.post(f"{stack.gateway}/v1/ocr", files={"file": ("x.png", png_bytes(), "image/png")}, timeout=120)
    assert upload.status_code == 200, upload.text


def test_seed_003_describe_region(stack) -> None:
    image = base64.b64encode(png_bytes((100, 80))).decode()
    ok = httpx.post(f"{stack.gateway}/v1/describe_region", json={"image": image, "box": "10, 10, 60, 50"},
                    timeout=120)
    assert ok.status_code == 200, ok.text
    assert ok.json()["box"] == [10, 10, 60, 50] and isinstance(ok.json()["description"], str)
    for box, rule in [("10,10,60", "four"), ("a,b,c,d", "number"), ("60,10,10,50", "x1"), ("10,50,60,10", "y1"),
                      ("10,10,500,50", "inside")]:
        bad = httpx.post(f"{stack.gateway}/v1/describe_region", json={"image": image, "box": box}, timeout=30)
        assert bad.status_code == 422, (box, bad.text)
        assert rule in bad.json()["error"]["message"], (box, bad.json())


def _tiny_gray_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("model", ["qwen2vl", "smolvlm2"])
@pytest.mark.parametrize("size", [(1, 1), (5, 1), (2, 3)])
def test_v1_ocr_tiny_grayscale_images(stack, model, size) -> None:
    """Images 1 or 3 pixels high: transformers guessed they were channels-first (502 "mean must have 1 elements",
    or for 3 pixels a silently transposed image); the models now tell the processors the layout."""
    image = base64.b64encode(_tiny_gray_png(size)).decode()
    r = httpx.post(f"{stack.gateway}/v1/ocr", json={"image": image, "model": model, "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["text"], str)


def test_context_limit_is_a_400_naming_both_numbers_and_the_model_keeps_serving(client) -> None:
    """The tiny Qwen2-VL's context is its checkpoint's max_position_embeddings (4096)."""
    import openai

    long_text = "hello world " * 650  # 3900 tokens with the tiny tokenizer: the default 256 does not fit either
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="qwen2vl", max_tokens=1000,
                                       messages=[{"role": "user", "content": long_text}])
    assert info.value.status_code == 400
    message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value)
    prompt = int(message.split("the prompt is ")[1].split(" tokens")[0])
    assert prompt + 1000 > 4096
    assert f"the prompt is {prompt} tokens and max_tokens is 1000: {prompt + 1000} exceeds this model's context " \
           "of 4096 tokens" in message
    # /v1/completions (PROMPT) is held to the same limit.
    with pytest.raises(openai.BadRequestError, match="exceeds this model's context of 4096 tokens"):
        client.completions.create(model="qwen2vl", prompt=long_text, max_tokens=1000)
    # Without max_tokens the default is lowered to what is left of the context (vLLM's rule), not refused.
    reply = client.chat.completions.create(model="qwen2vl", messages=[{"role": "user", "content": long_text}])
    assert reply.usage.prompt_tokens == prompt
    assert 0 < reply.usage.completion_tokens <= 4096 - prompt
    # And the next ordinary request is served as usual.
    ok = client.chat.completions.create(model="qwen2vl", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].finish_reason in ("stop", "length")
