"""Chat gateway routes and logic (/v1/chat/completions, /ocr, /info, /v1/ocr, /v1/describe_region) against a
fake streaming Triton backend: no server, no torch."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, local_http_server
from tests.fakes import Call, FakeBackend
from vlmserve.families.contract import MAX_NEW_TOKENS_LIMIT
from vlmserve.gateway.app import create_app
from vlmserve.gateway.chat import (
    ChatLimits,
    Sampling,
    build_inputs,
    crop_region,
    ocr_prompt,
    parse_box,
    parse_delta,
)
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.media import video_container
from vlmserve.gateway.settings import GatewaySettings
from vlmserve.gateway.triton import ModelInfo, TritonBackend, TritonUnavailable

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


def resp(text: str, finish: str = "", usage: dict[str, int] | None = None, index: int = 0,
         logprobs: list[dict[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """One Triton response of the chat contract."""
    return {
        "TEXT": np.array([text.encode()], dtype=np.object_),
        "FINISH_REASON": np.array([finish.encode()], dtype=np.object_),
        "USAGE": np.array([json.dumps(usage).encode() if usage else b""], dtype=np.object_),
        "INDEX": np.array([index], dtype=np.int32),
        "LOGPROBS": np.array([json.dumps(logprobs).encode() if logprobs else b""], dtype=np.object_),
    }


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "batch_size": 1}
DEFAULT_SCRIPT: list[Any] = [resp("Hello"), resp(", "), resp(" world  ", "stop", USAGE)]


# The served models of these tests: chat models plus other client models and an encoder (never chosen for chat).
CHAT_MODELS = {
    "florence2": ModelInfo("florence2", True, {"family": "florence2", "task": "florence2", "role": "client",
                                               "source_model": "microsoft/Florence-2-large",
                                               "weights": "random", "max_new_tokens_limit": "1024"}, 8),
    "qwen2vl": ModelInfo("qwen2vl", True, QWEN),
    "siglip_embed_text": ModelInfo("siglip_embed_text", True, {"family": "siglip", "task": "embed_text",
                                                               "role": "client",
                                                               "source_model": "vlmserve/tiny-siglip"}, 32),
    "smolvlm2": ModelInfo("smolvlm2", True, SMOL),
    "smolvlm2_vision": ModelInfo("smolvlm2_vision", True, {"family": "smolvlm2", "role": "encoder"}, 8),
}
CHAT_OUTPUTS = ["TEXT", "FINISH_REASON", "USAGE", "INDEX", "LOGPROBS"]


def chat_backend(script: list[Any] | None = None, *, reachable: bool = True, delay: float = 0.0,
                 models: dict[str, ModelInfo] | None = None) -> FakeBackend:
    """The fake Triton of these tests: ``CHAT_MODELS`` (or ``models``), every stream answers ``script``."""
    return FakeBackend(CHAT_MODELS if models is None else models,
                       script=DEFAULT_SCRIPT if script is None else script, reachable=reachable, delay=delay)


def check_chat_calls(backend: FakeBackend) -> None:
    """Every call the gateway made keeps the chat contract: decoupled models are streamed, with the chat outputs
    (USAGE last) and either MESSAGES or PROMPT."""
    for call in backend.calls:
        assert call.kind == "stream", f"chat models are decoupled: the gateway must stream ({call.model})"
        assert call.outputs == CHAT_OUTPUTS and call.final_output == "USAGE"
        assert ("MESSAGES" in call.inputs) != ("PROMPT" in call.inputs)


@pytest.fixture
def make_client(tmp_path) -> Iterator[Any]:
    clients: list[TestClient] = []

    backends: list[FakeBackend] = []

    def make(backend: FakeBackend | None = None, **overrides: Any) -> tuple[TestClient, FakeBackend]:
        backend = backend or chat_backend()
        overrides.setdefault("storage_dir", str(tmp_path / "storage"))
        client = TestClient(create_app(GatewaySettings(**overrides), backend=backend), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        backends.append(backend)
        return client, backend

    yield make
    for c in clients:
        c.__exit__(None, None, None)
    for b in backends:
        check_chat_calls(b)


@pytest.fixture
def live_server(tmp_path) -> Iterator[Any]:
    """A real uvicorn on a free port (for the openai SDK and real client disconnects)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []
    backends: list[FakeBackend] = []

    def start(backend: FakeBackend) -> str:
        settings = GatewaySettings(storage_dir=str(tmp_path / "storage"))
        port = free_port()
        backends.append(backend)
        server = uvicorn.Server(uvicorn.Config(create_app(settings, backend=backend),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)
    for b in backends:
        check_chat_calls(b)


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


@pytest.fixture
def png_server() -> Iterator[str]:
    """A local HTTP server (127.0.0.1: loopback, so refused unless allowlisted) serving a PNG and an MP4."""
    files = {"/a.png": (png_bytes(), "image/png"), "/v.mp4": (MP4, "video/mp4")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body, kind = files.get(self.path, (b"", "text/plain"))
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with local_http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}"


# --- pure logic --------------------------------------------------------------------------------------------


def test_chat_limits_come_from_the_model_params() -> None:
    limits = ChatLimits.of(ModelInfo("smolvlm2", True, SMOL))
    assert (limits.max_new_tokens_limit, limits.default_max_new_tokens, limits.supports_video,
            limits.max_video_frames, limits.max_images) == (64, 16, True, 4, 16)
    assert ChatLimits.of(ModelInfo("qwen2vl", True, QWEN)).supports_video is False
    # The contract's defaults fill what a config leaves out; a config that breaks it is a 502, not a guess.
    assert ChatLimits.of(ModelInfo("m", True, {"family": "x"})).max_new_tokens_limit == MAX_NEW_TOKENS_LIMIT
    with pytest.raises(APIError) as err:
        ChatLimits.of(ModelInfo("m", True, {**SMOL, "max_images": "0"}))
    assert err.value.status == 502 and "max_images" in err.value.message


def test_build_inputs_sends_parameters_only_when_set() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert set(build_inputs(messages, Sampling())) == {"MESSAGES"}
    inputs = build_inputs(messages, Sampling(max_tokens=5, stop=["\n"], seed=3))
    assert inputs["MESSAGES"].shape == (1,) and inputs["MESSAGES"].dtype == np.object_
    assert json.loads(inputs["MESSAGES"][0]) == messages
    assert json.loads(inputs["PARAMETERS"][0]) == {"max_tokens": 5, "stop": ["\n"], "seed": 3}


def test_parse_delta_reads_text_finish_and_usage() -> None:
    assert parse_delta(resp("ab")).text == "ab" and parse_delta(resp("ab")).finish_reason is None
    last = parse_delta(resp("", "length", USAGE))
    assert last.finish_reason == "length" and last.usage is not None and last.usage.total_tokens == 14
    broken = parse_delta({"TEXT": np.array([b"x"], dtype=np.object_),
                          "FINISH_REASON": np.array([b"stop"], dtype=np.object_),
                          "USAGE": np.array([b"{not json"], dtype=np.object_)})
    assert broken.text == "x" and broken.usage is not None and broken.usage.total_tokens == 0


def test_ocr_prompt_adds_a_language_hint_unless_auto() -> None:
    assert ocr_prompt("auto") == ocr_prompt(None) == ocr_prompt("") == \
        "Extract all text from this image. Return only the text, no commentary."
    assert ocr_prompt("russian").endswith("The text is in russian.")


def test_video_container_sniffs_mp4_and_webm() -> None:
    assert video_container(MP4) == "mp4"
    # The EBML header FFmpeg writes for WebM (doctype "webm"); more containers in tests/unit/test_media.py.
    webm = b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x84webm"
    assert video_container(webm) == "webm"
    assert video_container(png_bytes()) is None and video_container(b"") is None


@pytest.mark.parametrize(("box", "expected"), [
    ("10,5,30,25", (10.0, 5.0, 30.0, 25.0)),
    (" 0 , 0 , 64 , 48 ", (0.0, 0.0, 64.0, 48.0)),
    ("1.5,2,3.25,4", (1.5, 2.0, 3.25, 4.0)),
    ([1, 2, 3, 4], (1.0, 2.0, 3.0, 4.0)),
])
def test_parse_box_accepts_four_numbers_inside_the_image(box: Any, expected: tuple[float, ...]) -> None:
    assert parse_box(box, (WIDTH, HEIGHT)) == expected


BAD_BOXES = [
    ("1,2,3", "exactly four values, got 3"),
    ("1,2,3,4,5", "exactly four values, got 5"),
    ("", "exactly four values, got 0"),
    ("1 2 3 4", "exactly four values, got 1"),
    ("a,2,3,4", "x1='a' is not a number"),
    ("1,,3,4", "y1='' is not a number"),
    ("1,2,3e1,4", "x2='3e1' is not a number"),
    ("1,2,3,nan", "y2='nan' is not a number"),
    ("30,5,10,25", "x1 must be less than x2"),
    ("10,10,30,10", "y1 must be less than y2"),
    ("-1,5,30,25", "x1=-1 is outside 0..64"),
    ("10,5,65,25", "x2=65 is outside 0..64"),
    ("10,5,30,49", "y2=49 is outside 0..48"),
    ([1, 2, 3], "exactly four values, got 3"),
    ([1, 2, "3", 4], "x2='3' is not a number"),
    (12, "box must be a string"),
]


@pytest.mark.parametrize(("box", "rule"), BAD_BOXES)
def test_parse_box_names_the_rule_that_failed(box: Any, rule: str) -> None:
    with pytest.raises(APIError) as info:
        parse_box(box, (WIDTH, HEIGHT))
    assert info.value.status == 422 and info.value.param == "box"
    assert rule in info.value.message


def test_crop_region_keeps_the_box_and_enlarges_small_crops() -> None:
    crop = Image.open(io.BytesIO(crop_region(png_bytes(red_box=RED_BOX), (10, 5, 30, 25))))
    assert crop.format == "PNG" and crop.size == (64, 64)
    assert crop.convert("RGB").getpixel((32, 32)) == (255, 0, 0)
    thin = Image.open(io.BytesIO(crop_region(png_bytes(), (0.2, 0, 0.4, 48))))
    assert min(thin.size) >= 64  # a sub-pixel-wide box still yields an image a vision processor accepts


# --- TritonBackend.stream (gRPC streaming) with a fake call ----------------------------------------------


class _FakeResult:
    def __init__(self, values: dict[str, np.ndarray], final_flag: bool = False) -> None:
        self.values = values
        self.final_flag = final_flag

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.values.get(name)

    def get_response(self) -> Any:
        class _Param:
            bool_param = self.final_flag

        class _Response:
            parameters = {"triton_final_response": _Param()} if self.final_flag else {}

        return _Response()


class _FakeCall:
    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self) -> _FakeCall:
        return self

    async def __anext__(self) -> tuple[Any, Any]:
        if not self.items:
            await asyncio.sleep(3600)  # an open stream with nothing more to say
        item = self.items.pop(0)
        if isinstance(item, BaseException):  # the call ends with a gRPC status
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _FakeGrpc:
    def __init__(self, call: _FakeCall) -> None:
        self.call = call
        self.sent: list[dict[str, Any]] = []
        self.headers: dict[str, str] | None = None

    def stream_infer(self, requests: Any, headers: dict[str, str] | None = None) -> _FakeCall:
        self.headers = headers
        async def first() -> None:
            self.sent.append(await requests.__anext__())
        asyncio.get_running_loop().create_task(first())
        return self.call


def _backend_with(call: _FakeCall) -> tuple[TritonBackend, _FakeGrpc]:
    backend = TritonBackend("127.0.0.1:18000", timeout_s=5, grpc_url="127.0.0.1:18001")
    fake = _FakeGrpc(call)
    backend._grpc_client = fake  # type: ignore[assignment]
    return backend, fake


def _collect(backend: TritonBackend, stop_after: int | None = None) -> list[dict[str, np.ndarray]]:
    async def run() -> list[dict[str, np.ndarray]]:
        out = []
        gen = backend.stream("chat", {"MESSAGES": np.array([b"[]"], dtype=np.object_)},
                             ["TEXT", "FINISH_REASON", "USAGE"])
        try:
            async for values in gen:
                out.append(values)
                if stop_after is not None and len(out) >= stop_after:
                    break
        finally:
            await gen.aclose()
        return out

    return asyncio.run(run())


def test_triton_stream_ends_at_the_final_response_without_cancelling() -> None:
    call = _FakeCall([(_FakeResult(resp("a")), None), (_FakeResult(resp("b", "stop", USAGE)), None)])
    backend, fake = _backend_with(call)
    out = _collect(backend)
    assert [v["TEXT"][0] for v in out] == [b"a", b"b"] and not call.cancelled
    assert fake.sent[0]["model_name"] == "chat"
    assert [i.name() for i in fake.sent[0]["inputs"]] == ["MESSAGES"]
    # Errors end the call with their gRPC status code instead of a bare message in the stream (issue 23).
    assert fake.headers == {"triton_grpc_error": "true"}
    # An empty final response flagged by Triton (enable_empty_final_response) ends the stream too.
    flagged = _FakeCall([(_FakeResult(resp("a")), None), (_FakeResult({}, final_flag=True), None)])
    backend, _ = _backend_with(flagged)
    assert len(_collect(backend)) == 2 and not flagged.cancelled


def test_triton_stream_closed_early_cancels_the_call() -> None:
    call = _FakeCall([(_FakeResult(resp("a")), None), (_FakeResult(resp("b")), None)])
    backend, _ = _backend_with(call)
    assert len(_collect(backend, stop_after=1)) == 1
    assert call.cancelled


def test_triton_stream_closed_early_sends_a_cancel_request_and_drains_instead_of_cancelling() -> None:
    """With ``cancel_inputs`` (the chat models) an abandoned stream is never cancelled (Triton 2.51's gRPC frontend
    can abort on a cancel that races a write): the control request goes down the same stream, naming the first
    request's id, the request side is closed, and the rest of the stream is read to its end in the background."""
    from vlmserve.gateway.chat import cancel_request

    class EndingCall(_FakeCall):
        async def __anext__(self) -> tuple[Any, Any]:
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

    sent: list[Any] = []

    class Grpc:
        def stream_infer(self, requests: Any, headers: Any = None) -> _FakeCall:
            async def read() -> None:
                async for item in requests:
                    sent.append(item)
                sent.append("closed")
            asyncio.get_running_loop().create_task(read())
            return call

    call = EndingCall([(_FakeResult(resp("a")), None), (_FakeResult(resp("b")), None),
                       (_FakeResult(resp("", "cancelled", USAGE)), None)])
    backend = TritonBackend("127.0.0.1:18000", timeout_s=5, grpc_url="127.0.0.1:18001")
    backend._grpc_client = Grpc()  # type: ignore[assignment]

    async def run() -> None:
        gen = backend.stream("chat", {"MESSAGES": np.array([b"[]"], dtype=np.object_)}, ["TEXT", "FINISH_REASON"],
                             cancel_inputs=cancel_request)
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):  # the background drain reads the stream to its end
            if not call.items and not backend._retired:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert not call.cancelled and not call.items
    first, control, closed = sent
    assert first["request_id"] and [i.name() for i in first["inputs"]] == ["MESSAGES"]
    assert [i.name() for i in control["inputs"]] == ["PARAMETERS"] and closed == "closed"
    assert json.loads(control["inputs"][0]._raw_content[4:]) == {"cancel": first["request_id"]}


def test_two_open_streams_with_one_client_request_id_get_distinct_triton_ids() -> None:
    """A client that sends one X-Request-ID on two requests at once: the second stream's Triton id is suffixed, so
    that an abandoned stream's cancel request names it alone; once the first is over, the id is free again."""
    from vlmserve import telemetry

    sent: list[dict[str, Any]] = []

    class Grpc:
        def stream_infer(self, requests: Any, headers: Any = None) -> _FakeCall:
            async def first() -> None:
                sent.append(await requests.__anext__())
            asyncio.get_running_loop().create_task(first())
            return _FakeCall([(_FakeResult(resp("a")), None), (_FakeResult(resp("b", "stop", USAGE)), None)])

    backend = TritonBackend("127.0.0.1:18000", timeout_s=5, grpc_url="127.0.0.1:18001")
    backend._grpc_client = Grpc()  # type: ignore[assignment]

    async def one(started: asyncio.Event, release: asyncio.Event) -> None:
        telemetry.current.set(telemetry.RequestContext(request_id="dup"))
        gen = backend.stream("chat", {"MESSAGES": np.array([b"[]"], dtype=np.object_)}, ["TEXT", "FINISH_REASON"])
        await gen.__anext__()
        started.set()
        await release.wait()
        async for _ in gen:
            pass

    async def run() -> None:
        release = asyncio.Event()
        events = [asyncio.Event(), asyncio.Event()]
        first = asyncio.create_task(one(events[0], release))
        await events[0].wait()
        second = asyncio.create_task(one(events[1], release))
        await events[1].wait()
        release.set()
        await asyncio.gather(first, second)
        third = asyncio.Event()
        await one(third, release)

    asyncio.run(run())
    ids = [item["request_id"] for item in sent]
    assert ids[0] == "dup" and re.fullmatch(r"dup\.[0-9a-f]{8}", ids[1]) and ids[2] == "dup"


@pytest.mark.parametrize(("code", "message", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content[1]: 'data' is not valid base64", 400),
    (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be 1..64, got 100", 400),
    (grpc.StatusCode.INTERNAL, "generation failed: RuntimeError: boom", 502),
    (grpc.StatusCode.INTERNAL, "preprocessing failed: ValueError: x", 502),
    (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'chat' has no available versions", 503),
    (grpc.StatusCode.UNAVAILABLE, "chat queue is full (72 requests running or waiting); retry later", 503),
    (None, "Request for unknown model: 'chat' is not found", 503),  # Triton's refusal, in the stream, uncoded
])
def test_triton_stream_errors_map_to_http_statuses(code: grpc.StatusCode | None, message: str, status: int) -> None:
    error: Any = (None, InferenceServerException(msg=message)) if code is None else \
        grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)
    call = _FakeCall([(_FakeResult(resp("a")), None), error])
    backend, _ = _backend_with(call)
    with pytest.raises(APIError) as info:
        _collect(backend)
    assert info.value.status == status
    if status == 503:
        assert isinstance(info.value, TritonUnavailable) and info.value.headers["Retry-After"] == "5"


def test_triton_backend_derives_the_grpc_port_from_the_http_url() -> None:
    assert TritonBackend("triton:8000").grpc_url == "triton:8001"
    assert TritonBackend("triton:8000", grpc_url="triton:9001").grpc_url == "triton:9001"


# --- /v1/chat/completions: request translation ---------------------------------------------------------------


def test_image_data_uri_becomes_a_base64_image_part(make_client) -> None:
    client, backend = make_client()
    png = png_bytes()
    r = client.post("/v1/chat/completions", json={
        "model": "vlmserve/tiny-smolvlm2",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [text("what is this?"), image_part(data_uri(png))]}],
    })
    assert r.status_code == 200, r.text
    call = backend.calls[0]
    assert call.model == "smolvlm2" and call.json("PARAMETERS") is None
    assert call.json("MESSAGES")[0] == {"role": "system", "content": "be brief"}
    assert call.json("MESSAGES")[1]["content"][0] == {"type": "text", "text": "what is this?"}
    part = call.json("MESSAGES")[1]["content"][1]
    assert part["type"] == "image" and base64.b64decode(part["data"], validate=True) == png


def test_model_is_matched_by_source_family_or_triton_name(make_client) -> None:
    client, backend = make_client()
    for name, served in [("vlmserve/tiny-qwen2vl", "qwen2vl"), ("smolvlm2", "smolvlm2"), (None, "qwen2vl")]:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
        if name:
            body["model"] = name
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and backend.calls[-1].model == served
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert error(r)["code"] == "model_not_found" and error(r)["type"] == "not_found_error"
    assert "vlmserve/tiny-smolvlm2" in error(r)["message"] and "vlmserve/tiny-qwen2vl" in error(r)["message"]


def test_loopback_image_url_is_refused_unless_allowlisted(make_client, png_server: str) -> None:
    body = {"model": "smolvlm2", "messages": user(text("hi"), image_part(f"{png_server}/a.png"))}
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "loopback" in error(r)["message"]
    assert error(r)["param"] == "messages[0].content[1].image_url.url" and not backend.calls
    client, backend = make_client(url_allowlist=["127.0.0.1"])
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert base64.b64decode(backend.calls[0].json("MESSAGES")[0]["content"][1]["data"]) == png_bytes()


def test_video_part_data_uri_and_url(make_client, png_server: str) -> None:
    client, backend = make_client(url_allowlist=["127.0.0.1"])
    r = client.post("/v1/chat/completions", json={
        "model": "smolvlm2", "messages": user(video_part(data_uri(MP4, "video/mp4")), text("describe")),
        "video_fps": 2, "video_max_frames": 4})
    assert r.status_code == 200, r.text
    part = backend.calls[0].json("MESSAGES")[0]["content"][0]
    assert part["type"] == "video" and base64.b64decode(part["data"]) == MP4
    assert backend.calls[0].json("PARAMETERS") == {"video_fps": 2.0, "video_max_frames": 4}
    r = client.post("/v1/chat/completions",
                    json={"model": "smolvlm2", "messages": user(video_part(f"{png_server}/v.mp4"))})
    assert r.status_code == 200 and base64.b64decode(backend.calls[1].json("MESSAGES")[0]["content"][0]["data"]) == MP4


def test_video_is_refused_by_models_without_video(make_client) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={"model": "qwen2vl",  # supports_video: false
                                                  "messages": user(video_part(data_uri(MP4, "video/mp4")))})
    assert r.status_code == 400 and "does not accept video" in error(r)["message"]
    assert error(r)["code"] == "video_not_supported" and not backend.calls


def test_bad_videos_are_refused(make_client) -> None:
    client, backend = make_client(max_video_bytes=50)
    cases = [
        (data_uri(MP4, "video/mp4"), 413, "max_video_bytes"),
        (data_uri(MP4, "image/png"), 415, "not a video"),
        (data_uri(b"plain bytes here", "video/mp4"), 415, "not a supported video"),
        ("http://127.0.0.1:9/v.mp4", 400, "video URL host '127.0.0.1' resolves to a loopback address"),
        ("ftp://example.com/v.mp4", 400, "unsupported video reference"),
    ]
    for url, status, needle in cases:
        r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": user(video_part(url))})
        assert r.status_code == status, (url, r.text)
        assert needle in error(r)["message"] and error(r)["param"] == "messages[0].content[0].video_url.url"
    assert not backend.calls


def test_sampling_settings_become_the_parameters_json(make_client) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={
        "model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n\n", "seed": 42, "n": 1, "user": "u1"})
    assert r.status_code == 200, r.text
    assert backend.calls[0].json("PARAMETERS") == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"],
                                           "seed": 42}
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "x"}],
                                                   "max_completion_tokens": 9, "stop": ["a", "b"]})
    assert r.status_code == 200 and backend.calls[1].json("PARAMETERS") == {"max_tokens": 9, "stop": ["a", "b"]}


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ({"max_tokens": 65}, "max_tokens", "max_tokens must be 1..64"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be 1..64"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "at least 1 character"),
    ({"n": 9}, "n", "less than or equal to 8"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'xml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "Field required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema", "valid dictionary"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"video_max_frames": 5}, "video_max_frames", "1..4"),
    ({"video_fps": 0}, "video_fps", "greater than 0"),
])
def test_bad_settings_are_400_naming_the_field(make_client, extra, param, needle) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2",
                                                  "messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    assert error(r)["param"] == param and needle in error(r)["message"]
    assert error(r)["type"] == "invalid_request_error" and not backend.calls


BAD_PNG = data_uri(b"\x89PNG\r\n\x1a\nnot really a png")


@pytest.mark.parametrize(("messages", "status", "param", "needle"), [
    ([], 400, "messages", "at least 1 item"),
    (["hi"], 400, "messages[0]", "valid dictionary or object"),
    ([{"role": "tool", "content": "x"}], 400, "messages[0].role", "'tool' found using 'role' does not match"),
    ([{"role": "user"}], 400, "messages[0].content", "Field required"),
    ([{"role": "user", "content": []}], 400, "messages[0].content", "at least 1 item"),
    ([{"role": "user", "content": 5}], 400, "messages[0].content", "string or a non-empty list of parts"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], 400,
     "messages[0].content[0].type", "'input_audio' found using 'type' does not match"),
    ([{"role": "user", "content": [{"text": "no type"}]}], 400, "messages[0].content[0].type",
     "Unable to extract tag"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], 400, "messages[0].content[0].text", "string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], 400,
     "messages[0].content[0].image_url.url", "Field required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": " "}}]}], 400,
     "messages[0].content[0].image_url.url", "data URI or an http(s) URL"),
    ([{"role": "user", "content": [image_part(BAD_PNG)]}], 415, "messages[0].content[0].image_url.url",
     "not a decodable image"),
    ([{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}], 400,
     "messages[0].content[0].image_url.url", "invalid base64"),
    ([{"role": "system", "content": [image_part(data_uri(png_bytes()))]}, {"role": "user", "content": "hi"}], 400,
     "messages[0].content[0]", "only accepted in user messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], 400, "messages[1].role",
     "last message"),
    ([{"role": "user", "content": [image_part("http://10.0.0.1/a.png")]}], 400,
     "messages[0].content[0].image_url.url", "private address"),
])
def test_bad_messages_are_4xx_naming_the_part(make_client, messages, status, param, needle) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": messages})
    assert r.status_code == status, r.text
    assert error(r)["param"] == param and needle in error(r)["message"], error(r)
    assert not backend.calls


def test_too_many_images_is_413(make_client) -> None:
    client, backend = make_client(max_images_per_request=2)
    parts = [image_part(data_uri(png_bytes())) for _ in range(3)]
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": user(*parts)})
    assert r.status_code == 413 and error(r)["code"] == "too_many_images" and "at most 2" in error(r)["message"]
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": user(*parts[:2])})
    assert r.status_code == 200


def test_triton_down_is_503_with_retry_after(make_client) -> None:
    client, _ = make_client(chat_backend(reachable=False))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert error(r)["code"] == "triton_unavailable"


def test_api_key_is_required_when_configured(make_client) -> None:
    client, _ = make_client(api_keys=["k1"])
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert client.get("/info").status_code == 401
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 200


# --- /v1/chat/completions: answers ---------------------------------------------------------------------------


def test_non_streaming_answer_is_aggregated(make_client) -> None:
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    body = r.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"]) and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "vlmserve/tiny-smolvlm2"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello,  world  "},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def test_streaming_answer_is_openai_sse(make_client) -> None:
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == "vlmserve/tiny-smolvlm2" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello,  world  "
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_streaming_usage_chunk_when_asked(make_client) -> None:
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "stream_options": {"include_usage": True},
                                                  "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


def test_error_mid_stream_is_an_error_event_then_done(make_client) -> None:
    failure = APIError(502, "smolvlm2 failed: generation failed: boom", code="inference_failed")
    client, _ = make_client(chat_backend([resp("partial"), failure]))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "smolvlm2 failed: generation failed: boom", "type": "api_error",
                                    "param": None, "code": "inference_failed",
                                    "request_id": r.headers["x-request-id"]}}
    assert events[1]["choices"][0]["delta"] == {"content": "partial"}
    # No chunk claims the answer finished.
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


def test_stream_that_ends_without_finish_reason_is_an_error_event(make_client) -> None:
    client, _ = make_client(chat_backend([resp("a"), resp("b")]))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "without a finish reason" in events[-2]["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502 and "without a finish reason" in error(r)["message"]


def test_error_before_the_first_token_is_a_plain_http_error(make_client) -> None:
    rejected = APIError(400, "messages[0].content[0]: not a decodable video", code="invalid_input")
    client, _ = make_client(chat_backend([rejected]))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert error(r)["message"] == "messages[0].content[0]: not a decodable video"


# --- the openai SDK and real disconnects (uvicorn) ---------------------------------------------------------


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


def test_ocr_asks_the_qwen_model_by_default(make_client) -> None:
    client, backend = make_client()
    png = png_bytes()
    r = client.post("/ocr", json={"image": base64.b64encode(png).decode(), "language": "russian"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "Hello,  world" and body["language"] == "russian"
    assert body["model"] == "vlmserve/tiny-qwen2vl" and body["latency_ms"] >= 0
    call = backend.calls[0]
    assert call.model == "qwen2vl" and call.json("PARAMETERS") is None
    image, prompt = call.json("MESSAGES")[0]["content"]
    assert image == {"type": "image", "data": base64.b64encode(png).decode()}
    assert prompt["text"].startswith("Extract all text from this image") and "russian" in prompt["text"]
    r = client.post("/ocr", json={"image": data_uri(png), "model": "smolvlm2", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["language"] == "auto"
    assert backend.calls[1].model == "smolvlm2" and backend.calls[1].json("PARAMETERS") == {"max_tokens": 8}
    assert "The text is in" not in backend.calls[1].json("MESSAGES")[0]["content"][1]["text"]


def test_ocr_falls_back_to_the_first_chat_model(make_client) -> None:
    backend = chat_backend(models={"smolvlm2": ModelInfo("smolvlm2", True, SMOL)})
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
    assert base64.b64decode(backend.calls[1].json("MESSAGES")[0]["content"][0]["data"]) == png
    assert "german" in backend.calls[1].json("MESSAGES")[0]["content"][1]["text"]


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
    return Image.open(io.BytesIO(base64.b64decode(call.json("MESSAGES")[0]["content"][0]["data"])))


def test_describe_region_sends_the_crop(make_client) -> None:
    client, backend = make_client()
    png = png_bytes(red_box=RED_BOX)
    r = client.post("/v1/describe_region", json={"image": data_uri(png), "box": "10, 5, 30, 25"})
    assert r.status_code == 200, r.text
    assert r.json() == {"description": "Hello,  world", "box": [10, 5, 30, 25], "model": "vlmserve/tiny-qwen2vl",
                        "latency_ms": r.json()["latency_ms"]}
    crop = _sent_image(backend.calls[0]).convert("RGB")
    assert crop.size == (64, 64) and crop.getpixel((32, 32)) == (255, 0, 0)
    assert "Describe the object" in backend.calls[0].json("MESSAGES")[0]["content"][1]["text"]
    r = client.post("/v1/describe_region", files={"file": ("a.png", png, "image/png")},
                    data={"box": "10,5,30,25", "model": "smolvlm2", "prompt": "What colour is it?"})
    assert r.status_code == 200, r.text
    assert backend.calls[1].model == "smolvlm2"
    assert backend.calls[1].json("MESSAGES")[0]["content"][1]["text"] == "What colour is it?"


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


# --- issue 15: n, logprobs, penalties, response_format, /v1/completions, /v1/models/{id} ---------------------

LP_A = [{"token": "A", "logprob": -0.5, "bytes": [65],
         "top_logprobs": [{"token": "A", "logprob": -0.5, "bytes": [65]}]}]
LP_B = [{"token": "B", "logprob": -1.5, "bytes": [66],
         "top_logprobs": [{"token": "A", "logprob": -0.3, "bytes": [65]}]}]
TWO_CHOICES: list[Any] = [
    resp("A", index=0, logprobs=LP_A), resp("B", index=1, logprobs=LP_B), resp("", "length", index=1),
    resp("", "stop", {"prompt_tokens": 4, "completion_tokens": 2, "batch_size": 2}, index=0),
]


def test_new_settings_become_the_parameters_json(make_client) -> None:
    client, backend = make_client(chat_backend(TWO_CHOICES))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client.post("/v1/chat/completions", json={
        "model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}], "n": 2, "logprobs": True,
        "top_logprobs": 1, "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert backend.calls[0].json("PARAMETERS") == {
        "n": 2, "logprobs": True, "top_logprobs": 1, "presence_penalty": 0.5, "frequency_penalty": -0.25,
        "repetition_penalty": 1.2, "response_format": {"type": "json_schema", "schema": schema}}
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "x"}],
                                                   "response_format": {"type": "json_object"}, "n": 1})
    assert backend.calls[1].json("PARAMETERS") == {"response_format": {"type": "json_object"}}
    client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "x"}],
                                               "response_format": {"type": "text"}, "presence_penalty": 0})
    assert backend.calls[2].json("PARAMETERS") is None


def test_n_choices_and_logprobs_are_aggregated(make_client) -> None:
    client, _ = make_client(chat_backend(TWO_CHOICES))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}],
                                                   "n": 2, "logprobs": True, "top_logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "A", "stop"), (1, "B", "length")]
    assert body["choices"][0]["logprobs"] == {"content": LP_A, "refusal": None}
    assert body["choices"][1]["logprobs"]["content"] == LP_B
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_n_choices_stream_per_index(make_client) -> None:
    client, _ = make_client(chat_backend(TWO_CHOICES))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}],
                                                   "n": 2, "stream": True, "logprobs": True,
                                                   "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in chunks:
        by_index[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert by_index == {0: "A", 1: "B"}
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert finishes == {0: "stop", 1: "length"}
    assert [c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")] == [
        LP_A, LP_B]
    assert events[-2]["usage"]["completion_tokens"] == 2 and events[-2]["choices"] == []


def test_completions_send_the_raw_prompt(make_client) -> None:
    client, backend = make_client(chat_backend([resp("Hel", logprobs=LP_A), resp("lo", "length", USAGE,
                                                                                  logprobs=LP_B)]))
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "Once upon a time", "max_tokens": 5,
                                              "logprobs": 1, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "Hello" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"] == {"tokens": ["A", "B"], "token_logprobs": [-0.5, -1.5],
                                              "top_logprobs": [{"A": -0.5}, {"A": -0.3}], "text_offset": [0, 1]}
    assert backend.calls[0].text("PROMPT") == "Once upon a time" and backend.calls[0].json("MESSAGES") is None
    assert backend.calls[0].json("PARAMETERS") == {"max_tokens": 5, "seed": 3, "logprobs": True, "top_logprobs": 1}
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "x"})
    assert backend.calls[1].json("PARAMETERS") == {"max_tokens": 16}  # OpenAI's default


def test_completions_list_of_prompts_and_streaming(make_client) -> None:
    client, backend = make_client(chat_backend([resp("ok", "stop", USAGE)]))
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] == 22
    assert sorted(c.text("PROMPT") for c in backend.calls) == ["a", "b"]
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "a", "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[0]["object"] == "text_completion"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "ok"


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 6}, "logprobs"),
    ({"prompt": [1, 2]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"], "stream": True}, "stream"),
])
def test_completions_refusals(make_client, extra, param) -> None:
    client, backend = make_client()
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "hi", **extra})
    assert r.status_code == 400 and error(r)["param"].startswith(param), r.text
    assert not backend.calls


def test_models_retrieve_by_id_alias_and_triton_name(make_client) -> None:
    client, _ = make_client()
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    for name, source in (("vlmserve/tiny-smolvlm2", "vlmserve/tiny-smolvlm2"), ("smolvlm2", "vlmserve/tiny-smolvlm2"),
                         ("siglip", "vlmserve/tiny-siglip"), ("siglip_embed_text", "vlmserve/tiny-siglip")):
        r = client.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json() == listed[source], name
    r = client.get("/v1/models/gpt-9")
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    assert "vlmserve/tiny-qwen2vl" in error(r)["message"]


def test_ocr_with_a_schema_answers_json(make_client) -> None:
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    client, backend = make_client(chat_backend([resp('{"total": 12.5}', "stop", USAGE)]))
    image = base64.b64encode(png_bytes()).decode()
    r = client.post("/ocr", json={"image": image, "schema": schema})
    assert r.status_code == 200, r.text
    assert r.json()["json"] == {"total": 12.5} and r.json()["finish_reason"] == "stop"
    assert backend.calls[0].json("PARAMETERS")["response_format"] == {"type": "json_schema", "schema": schema}
    assert json.dumps(schema) in backend.calls[0].json("MESSAGES")[0]["content"][1]["text"]
    r = client.post("/v1/ocr", json={"image": image, "schema": schema})
    assert r.status_code == 200 and r.json()["json"] == {"total": 12.5}
    cut, _ = make_client(chat_backend([resp('{"total": 1', "length", USAGE)]))
    r = cut.post("/ocr", json={"image": image, "schema": schema})
    assert r.status_code == 200 and r.json()["json"] is None and r.json()["finish_reason"] == "length"
    plain = client.post("/ocr", json={"image": image})
    assert "json" not in plain.json()


def test_openapi_states_the_typed_openai_contract(make_client) -> None:
    client, _ = make_client()
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["items"]["discriminator"]["propertyName"] == "role"
    assert set(chat["messages"]["items"]["discriminator"]["mapping"]) == {"system", "developer", "user", "assistant"}
    assert {"n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "response_format"} <= set(chat)
    assert "CompletionRequest" in schemas and "/v1/models/{model_id}" in spec["paths"]


@pytest.mark.parametrize("text", ["1,2,30,40", " 1.5 , 2 ,30.,40.25", "+1,2,3,4", "1,2,3", "a,b,c,d", "1e1,2,3,4",
                                  "1,2,3,4,", "", "1;2;3;4"])
def test_the_schema_box_pattern_is_the_rule_parse_box_applies(text: str) -> None:
    """The OpenAPI schema's pattern for a box (vlmserve.gateway.chat.BOX_PATTERN) accepts exactly the strings parse_box
    reads as four numbers (their order and the image bounds are checked after, and the schema says so)."""
    from vlmserve.gateway.chat import BOX_PATTERN

    try:
        parse_box(text, (10_000, 10_000))
        parsed = True
    except APIError as exc:
        parsed = "exactly four values" not in exc.message and "is not a number" not in exc.message
    assert (re.fullmatch(BOX_PATTERN, text) is not None) == parsed
