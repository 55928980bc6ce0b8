"""Image chat time to first token, one user: a 1024x768 JPEG asked about for the first time, then again.

The first request pays for the image's tiles through the vision encoder and the whole prompt's prefill; the
repeated ones (same bytes, same prompt) find the image in the image cache and the prompt's blocks in the prefix
cache. ``vlmserve bench`` runs it against the served stack; ``python -m vlmserve.loadtests.image_ttft URL`` alone.
"""

from __future__ import annotations

import base64
import json
import statistics
import sys
import time
from typing import Any

import httpx

from vlmserve.export.photos import photo_jpeg

WIDTH, HEIGHT = 1024, 768
PROMPT = "What is in this picture? Describe it."


def ttft_ms(client: httpx.Client, url: str, model: str, image: bytes, max_tokens: int = 8) -> float:
    """Send one streaming chat completion about ``image``; milliseconds to its first content delta."""
    data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": PROMPT}]}]}
    start = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices") or []):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("the answer had no content")
    return (first - start) * 1000


def image_chat_ttft(url: str, model: str = "smolvlm2", repeats: int = 3, seed: int = 11,
                    timeout_s: float = 300) -> dict[str, Any]:
    """TTFT of a never-seen 1024x768 JPEG (``seed`` picks the photo), then of ``repeats`` identical requests."""
    image = photo_jpeg(WIDTH, HEIGHT, seed)
    with httpx.Client(timeout=timeout_s) as client:
        first = ttft_ms(client, url, model, image)
        again = [ttft_ms(client, url, model, image) for _ in range(repeats)]
    return {"image": f"{WIDTH}x{HEIGHT} JPEG", "first_ms": round(first, 1),
            "repeated_ms": [round(v, 1) for v in again], "repeated_p50_ms": round(statistics.median(again), 1)}


if __name__ == "__main__":
    print(json.dumps(image_chat_ttft(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"), indent=2))
