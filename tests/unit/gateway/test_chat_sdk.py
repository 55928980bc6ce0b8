"""The chat routes on a real uvicorn: the openai SDK against them, and real client disconnects cancelling the
generation."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.unit.gateway.chat_support import USAGE, chat_backend, data_uri, png_bytes, resp
from vlmserve.gateway.errors import APIError


def test_openai_sdk_non_streaming_and_streaming(live_server) -> None:
    import openai

    base = live_server(chat_backend())
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    png = data_uri(png_bytes())
    completion = client.chat.completions.create(
        model="vlmserve/tiny-smolvlm2", max_tokens=8, stop=["\n"], seed=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "what?"},
                                               {"type": "image_url", "image_url": {"url": png}}]}],
    )
    assert completion.choices[0].message.content == "Hello,  world  "
    assert completion.choices[0].finish_reason == "stop" and completion.usage is not None
    assert completion.usage.total_tokens == 14 and completion.model == "vlmserve/tiny-smolvlm2"
    stream = client.chat.completions.create(model="smolvlm2", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello,  world  "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError, match="available: .*vlmserve/tiny-smolvlm2"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 8"):
        client.chat.completions.create(model="smolvlm2", n=9, messages=[{"role": "user", "content": "hi"}])


def test_openai_sdk_raises_on_a_mid_stream_error(live_server) -> None:
    import openai

    failure = APIError(502, "smolvlm2 failed: generation failed: boom", code="inference_failed")
    base = live_server(chat_backend([resp("partial"), failure]))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    received = []
    with pytest.raises(openai.APIError, match="generation failed: boom"):  # noqa: PT012 - raised while iterating
        for chunk in client.chat.completions.create(model="smolvlm2", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
            received.append(chunk.choices[0].delta.content)
    assert "partial" in received


def _wait_until(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_client_disconnect_cancels_the_triton_request(live_server) -> None:
    script = [resp(f"t{i} ") for i in range(400)] + [resp("", "length", USAGE)]
    backend = chat_backend(script, delay=0.02)
    base = live_server(backend)
    body = {"model": "smolvlm2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as http, http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break
    assert _wait_until(lambda: backend.cancelled == 1)
    # Not streaming: the client gives up while the answer is being generated.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert _wait_until(lambda: backend.cancelled == 2)


# --- the Qwen2-VL OCR service: /ocr and /info -------------------------------------------------------------------------
