"""What the chat gateway tests share: the served models, scripted answers, images and request helpers."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
from PIL import Image

from tests.fakes import FakeEngine, delta, model
from vlmserve.gateway.engines import ModelInfo

SMOL = {
    "family": "smolvlm2", "task": "chat", "role": "client", "source_model": "vlmserve/tiny-smolvlm2",
    "weights": "random", "max_new_tokens_limit": "64", "default_max_new_tokens": "16", "supports_video": "true",
    "max_video_frames": "4", "max_images": "16", "device": "cpu",
}
QWEN = {
    "family": "qwen2vl", "task": "chat", "role": "client", "source_model": "vlmserve/tiny-qwen2vl",
    "weights": "random", "max_new_tokens_limit": "1024", "default_max_new_tokens": "256", "supports_video": "false",
    "max_video_frames": "8", "device": "cpu",
}
WIDTH, HEIGHT = 64, 48
RED_BOX = (10, 5, 30, 25)
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(64)

resp = delta  # one streamed piece of a chat answer

USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "batch_size": 1}
DEFAULT_SCRIPT: list[Any] = [resp("Hello"), resp(", "), resp(" world  ", "stop", USAGE)]


# The served models of these tests: chat models plus other client models and an encoder (never chosen for chat).
CHAT_MODELS = {
    "florence2": model("florence2", True, 8, family="florence2", task="florence2", role="client",
                       source_model="microsoft/Florence-2-large", weights="random", max_new_tokens_limit="1024"),
    "qwen2vl": ModelInfo.of("qwen2vl", True, QWEN),
    "siglip_embed_text": model("siglip_embed_text", True, 32, family="siglip", task="embed_text", role="client",
                               source_model="vlmserve/tiny-siglip"),
    "smolvlm2": ModelInfo.of("smolvlm2", True, SMOL),
    "smolvlm2_vision": model("smolvlm2_vision", True, 8, family="smolvlm2", role="encoder"),
}


def chat_backend(script: list[Any] | None = None, *, reachable: bool = True, delay: float = 0.0,
                 models: dict[str, ModelInfo] | None = None) -> FakeEngine:
    """The fake engine of these tests: ``CHAT_MODELS`` (or ``models``), every generation answers ``script``."""
    return FakeEngine(CHAT_MODELS if models is None else models,
                      script=DEFAULT_SCRIPT if script is None else script, reachable=reachable, delay=delay)


def check_chat_calls(backend: FakeEngine) -> None:
    """Every call the gateway made keeps the chat contract: chat models generate, from either messages or a
    prompt, with parameters."""
    for call in backend.calls:
        assert call.kind == "generate", f"chat models generate ({call.model})"
        assert (call.messages is None) != (call.prompt is None) and call.params is not None


def png_bytes(size: tuple[int, int] = (WIDTH, HEIGHT), red_box: tuple[int, int, int, int] | None = None) -> bytes:
    img = Image.new("RGB", size, (128, 128, 128))
    if red_box:
        img.paste((255, 0, 0), red_box)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


def sse_events(body: str) -> list[Any]:
    """The data of each SSE event, JSON-decoded except the [DONE] marker; checks the framing."""
    assert body.endswith("\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
