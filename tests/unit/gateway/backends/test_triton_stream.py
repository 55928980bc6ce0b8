"""The Triton engine's transport: ``TritonClient.stream`` (gRPC streaming) with a fake call, its error mapping and
cancellation."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.unit.gateway.backends.tensors import USAGE, resp
from vlmserve.families.tensors import ChatTensors as Chat
from vlmserve.gateway.backends.triton import TritonBackend, TritonUnavailable, cancel_request
from vlmserve.gateway.errors import APIError


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
        gen = backend.stream("chat", {Chat.MESSAGES.name: np.array([b"[]"], dtype=np.object_)},
                             [Chat.TEXT.name, Chat.FINISH_REASON.name, Chat.USAGE.name],
                             final_output=Chat.FINISH_REASON.name)
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
    assert [v[Chat.TEXT.name][0] for v in out] == [b"a", b"b"] and not call.cancelled
    assert fake.sent[0]["model_name"] == "chat"
    assert [i.name() for i in fake.sent[0]["inputs"]] == [Chat.MESSAGES.name]
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
        gen = backend.stream("chat", {Chat.MESSAGES.name: np.array([b"[]"], dtype=np.object_)},
                             [Chat.TEXT.name, Chat.FINISH_REASON.name],
                             cancel_inputs=cancel_request, final_output=Chat.FINISH_REASON.name)
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
    assert first["request_id"] and [i.name() for i in first["inputs"]] == [Chat.MESSAGES.name]
    assert [i.name() for i in control["inputs"]] == [Chat.PARAMETERS.name] and closed == "closed"
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
        gen = backend.stream("chat", {Chat.MESSAGES.name: np.array([b"[]"], dtype=np.object_)},
                             [Chat.TEXT.name, Chat.FINISH_REASON.name],
                             final_output=Chat.FINISH_REASON.name)
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
