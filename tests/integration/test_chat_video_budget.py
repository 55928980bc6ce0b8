"""The per-request pixel budget of chat videos (max_video_pixels) through the gateway on the real stack."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.integration.test_chat_triton import triton_metric
from tests.unit.test_chat_video_pool import mp4

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_video_frames_beyond_the_pixel_budget_are_a_400_naming_it(stack, model) -> None:
    """6 frames of 4608x4096 (each within max_pixels, 113 MP together) exceed the default budget of 100 MP: a 400
    that names the frames, their pixels and max_video_pixels, decided from the header (no frame reaches the vision
    encoder: the image cache saw nothing), and the model answers the next request as before."""
    clip = base64.b64encode(mp4(frames=6, fps=1, size=(4608, 4096))).decode()
    body = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{clip}"}},
        {"type": "text", "text": "What happens?"}]}]}
    misses = triton_metric(stack, "vlmserve_image_cache_misses_total", model)
    hits = triton_metric(stack, "vlmserve_image_cache_hits_total", model)
    r = httpx.post(f"{stack.gateway}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "6 frames x 4608x4096 = 113,246,208 pixels" in message and "max_video_pixels" in message, message
    assert "100,000,000" in message
    assert triton_metric(stack, "vlmserve_image_cache_misses_total", model) == misses
    assert triton_metric(stack, "vlmserve_image_cache_hits_total", model) == hits
    ok = httpx.post(f"{stack.gateway}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
