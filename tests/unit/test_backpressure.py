"""Backpressure: the gateway's in-flight caps per route group, the mapping of Triton's errors by status code, the chat
model's bounded admission and the queue policy written into the Triton configs."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from tritonclient.utils import InferenceServerException

from vlmserve.export.repository import ExportOptions, dynamic_batching
from vlmserve.gateway.backends.triton import TritonBackend
from vlmserve.gateway.limits import InFlightLimit, route_groups
from vlmserve.model_repository.chat import Admission


async def _capped_app_run(cap: int, extra_requests: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """``cap`` chat requests held open inside the app, then ``extra_requests`` more and one to another group."""
    entered = 0
    all_in = asyncio.Event()
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        nonlocal entered
        if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            entered += 1
            if entered == cap:
                all_in.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = InFlightLimit(app, {"chat": cap, "embeddings": 1},
                            {"/v1/chat/completions": "chat", "/embed": "embeddings"}, retry_after_s=7)
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        held = [asyncio.create_task(client.post("/v1/chat/completions", json={})) for _ in range(cap)]
        await all_in.wait()
        rejected = [await client.post("/v1/chat/completions", json={}) for _ in range(extra_requests)]
        rejected.append(await client.post("/embed", json={}))  # another group: its own cap, still free
        rejected.append(await client.get("/v1/chat/completions"))  # only POSTs (inference) count
        release.set()
        done = list(await asyncio.gather(*held))
        done.append(await client.post("/v1/chat/completions", json={}))  # slots are given back
    return done, rejected


def test_inflight_cap_answers_429_with_retry_after_and_frees_slots() -> None:
    done, answers = asyncio.run(_capped_app_run(cap=3, extra_requests=2))
    assert [r.status_code for r in done] == [200] * 4
    over, embed, get = answers[:2], answers[2], answers[3]
    for r in over:
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert "max_inflight_chat=3" in r.json()["error"]["message"]
    assert embed.status_code == 200 and get.status_code == 200


def test_every_inference_route_is_in_a_group() -> None:
    from vlmserve.gateway.app import create_app
    from vlmserve.gateway.settings import GatewaySettings

    app = create_app(GatewaySettings())
    groups = route_groups(app.openapi())
    posts = {path for path, ops in app.openapi()["paths"].items() if "post" in ops}
    # The Batch API's own routes only store files and queue batches (their lines run through the routes above).
    assert posts - {"/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel"} == set(groups)
    assert set(groups.values()) == set(GatewaySettings().inflight_caps())
    # The schema says which cap each inference route counts against.
    assert app.openapi()["paths"]["/v1/ocr"]["post"]["x-vlmserve-inflight-group"] == "chat"


def test_chat_admission_is_bounded_and_releases_once() -> None:
    admission = Admission(2)
    first, second = admission.enter(), admission.enter()
    assert first is not None and second is not None
    assert admission.enter() is None
    first()
    first()  # a second release of the same request frees nothing more
    third = admission.enter()
    assert third is not None and admission.enter() is None
    threads = [threading.Thread(target=f) for f in (second, third)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admission.count == 0


def test_queue_policy_in_the_rendered_configs(monkeypatch) -> None:
    monkeypatch.setenv("VLMSERVE_MAX_QUEUE_SIZE", "5")
    monkeypatch.setenv("VLMSERVE_QUEUE_TIMEOUT_S", "2.5")
    policy = dynamic_batching(ExportOptions())["default_queue_policy"]
    assert (policy["max_queue_size"], policy["default_timeout_microseconds"], policy["timeout_action"].name) == (
        5, 2_500_000, "REJECT")
    from vlmserve.export.chat import chat_config

    params = chat_config("qwen2vl", ExportOptions(), {"family": "qwen2vl"})["parameters"]
    assert json.loads(params["max_queue_size"]["string_value"]) == 5


def _aio_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


# (Triton's HTTP status, its message) -> (gateway status, error code). The messages are chosen to mislead a mapping
# that reads words: the status code decides (issue 23), the words only label a 429 and spot a dead stub.
@pytest.mark.parametrize(("status", "message", "expected", "code"), [
    ("400", "TEXT is not valid UTF-8", 400, "invalid_input"),
    ("400", "the queue is full of unavailable tokens", 400, "invalid_input"),
    ("503", "Exceeds maximum queue size", 429, "queue_full"),
    ("503", "Request timeout expired", 429, "queue_timeout"),
    ("404", "Request for unknown model: 'x' is not found", 503, "triton_unavailable"),
    ("404", "Request for unknown model: 'x' has no available versions", 503, "triton_unavailable"),
    ("500", "inference failed: RuntimeError: model not ready for this input", 502, "inference_failed"),
    ("500", "preprocessing failed: queue full of NaNs, backend unavailable", 502, "inference_failed"),
])
def test_triton_http_errors_map_by_status_code(status: str, message: str, expected: int, code: str) -> None:
    backend = TritonBackend("127.0.0.1:1", retry_after_s=3)
    mapped = backend._map_error("m", InferenceServerException(message, status=status))
    assert (mapped.status, mapped.code) == (expected, code)
    assert mapped.headers.get("Retry-After") == ("3" if expected in (429, 503) else None)


# The gRPC status of a stream's error (Triton ends the call with it under the triton_grpc_error header).
@pytest.mark.parametrize(("status", "message", "expected", "code"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "PROMPT must be UTF-8 text", 400, "invalid_input"),
    (grpc.StatusCode.INTERNAL, "generation failed: RuntimeError: boom", 502, "inference_failed"),
    (grpc.StatusCode.INTERNAL, "the tokenizer is not available", 502, "inference_failed"),
    (grpc.StatusCode.UNKNOWN, "something", 502, "inference_failed"),
    (grpc.StatusCode.UNAVAILABLE, "chat queue is full (72 requests running or waiting); retry later", 503,
     "triton_unavailable"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", 503, "triton_unavailable"),
    (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' has no available versions", 503,
     "triton_unavailable"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max", 413, "request_too_large"),
])
def test_triton_stream_errors_map_by_grpc_status(status: grpc.StatusCode, message: str, expected: int,
                                                 code: str) -> None:
    backend = TritonBackend("127.0.0.1:1", retry_after_s=3)
    mapped = backend._map_rpc_error("m", _aio_error(status, message))
    assert (mapped.status, mapped.code) == (expected, code)
    assert mapped.headers.get("Retry-After") == ("3" if expected in (429, 503) else None)


def test_uncoded_stream_errors_are_502_unless_the_model_is_not_loaded() -> None:
    """Inside a stream only Triton's own refusals (before any model saw the request) still come without a code."""
    backend = TritonBackend("127.0.0.1:1", retry_after_s=3)
    gone = backend._map_stream_error("m", InferenceServerException("Request for unknown model: 'm' is not found"))
    wrong = backend._map_stream_error("m", InferenceServerException("unexpected inference input 'X' for model 'm'"))
    assert (gone.status, gone.code, gone.headers["Retry-After"]) == (503, "triton_unavailable", "3")
    assert (wrong.status, wrong.code) == (502, "inference_failed")


_DEAD = InferenceServerException("Failed to process the request(s) for model instance 'm_0_0', message: "
                                 "Stub process 'm_0_0' is not healthy.", status="500")


def test_dead_stub_answers_503_marks_the_model_a_while_and_never_reloads_it() -> None:
    """Healing is the orchestrator's, next to each Triton (orchestrator/heal.py): the gateway never calls Triton's
    model-control API, which with several replicas would reach whichever replica its connection happens to."""
    calls: list[str] = []

    class Client:
        async def unload_model(self, name: str) -> None:
            calls.append(f"unload {name}")

        async def load_model(self, name: str) -> None:
            calls.append(f"load {name}")

        async def infer(self, *args, **kwargs) -> None:
            calls.append("infer")
            raise InferenceServerException("Stub process 'm_0_0' is not healthy.", status="500")

    now = [100.0]

    async def scenario() -> tuple[list[int], bool, bool]:
        backend = TritonBackend("127.0.0.1:1", retry_after_s=4)
        backend.clock = lambda: now[0]
        backend._client = Client()  # type: ignore[assignment]
        statuses = []
        for mapped in (backend._map_error("m", _DEAD),
                       backend._map_rpc_error("m", _aio_error(grpc.StatusCode.INTERNAL, "Stub process 'm_0_0' is "
                                                              "not healthy."))):
            assert mapped.headers["Retry-After"] == "4"
            statuses.append(mapped.status)
        marked = backend.unhealthy("m")
        try:
            await backend.infer("m", {}, [])  # refused without reaching Triton while marked
        except Exception as exc:  # noqa: BLE001
            statuses.append(getattr(exc, "status", 0))
        now[0] += 5  # past retry_after_s: tried again (the watcher may have reloaded it by now)
        try:
            await backend.infer("m", {}, [])
        except Exception as exc:  # noqa: BLE001
            statuses.append(getattr(exc, "status", 0))
        await asyncio.sleep(0.05)
        return statuses, marked, backend.unhealthy("m")

    statuses, marked, still_marked = asyncio.run(scenario())
    assert statuses == [503, 503, 503, 503] and marked and still_marked
    assert calls == ["infer"]  # one request reached Triton; no unload, no load


def test_a_model_being_reloaded_keeps_its_surface_and_answers_503_not_another_family() -> None:
    """Unloaded by the healer next to its Triton, the model is listed UNAVAILABLE with no config: the default of its
    surface must not move to another family (another embedding space) meanwhile."""
    state = {"siglip_embed_text": "READY", "siglip2_embed_text": "READY"}

    class Client:
        async def get_model_repository_index(self) -> list[dict]:
            return [{"name": n, "state": s} for n, s in state.items()]

        async def get_model_config(self, name: str) -> dict:
            family = name.split("_")[0]
            return {"max_batch_size": 8, "parameters": {"family": {"string_value": family},
                                                        "task": {"string_value": "embed_text"}}}

    async def scenario() -> list[tuple[str, bool]]:
        backend = TritonBackend("127.0.0.1:1", retry_after_s=4)
        backend._client = Client()  # type: ignore[assignment]
        seen = []
        for now in ("READY", "UNAVAILABLE", "READY"):
            state["siglip_embed_text"] = now
            info = (await backend.registry(refresh=True)).find("embed_text", None)
            seen.append((info.name, info.ready))
        return seen

    assert asyncio.run(scenario()) == [("siglip_embed_text", True), ("siglip_embed_text", False),
                                       ("siglip_embed_text", True)]


def test_sigterm_drains_in_flight_requests_and_answers_new_ones_503() -> None:
    """A real uvicorn (vlmserve.gateway.__main__.DrainingServer) on a free port: after the stop signal a request in
    progress
    completes, new requests get 503 + Retry-After + Connection: close, /readyz is 503, /livez 200, and the server
    exits once nothing is in progress (well before the drain timeout)."""
    import signal
    import time

    import uvicorn

    from tests.conftest import free_port
    from tests.fakes import FakeEngine
    from vlmserve.gateway.__main__ import DrainingServer
    from vlmserve.gateway.app import create_app
    from vlmserve.gateway.settings import GatewaySettings

    app = create_app(GatewaySettings(retry_after_s=3), backend=FakeEngine())
    entered, release = threading.Event(), threading.Event()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {"status": "done"}

    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                            app.state.drain, drain_timeout_s=60)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:  # polls a condition (the server listening), bounded
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert httpx.get(f"{base}/readyz").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.get, f"{base}/slow", timeout=30)
        assert entered.wait(30)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        refused = httpx.post(f"{base}/embed_text", json={"text": "x"}, timeout=10)
        ready, live = httpx.get(f"{base}/readyz", timeout=10), httpx.get(f"{base}/livez", timeout=10)
        assert thread.is_alive() and not in_flight.done()  # still draining: the slow request holds it
        release.set()
        answer = in_flight.result(timeout=30)
    started = time.monotonic()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert answer.status_code == 200 and answer.json() == {"status": "done"}
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.headers["connection"] == "close" and refused.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503 and live.status_code == 200


def test_a_task_whose_model_is_still_loading_is_503_not_404() -> None:
    """A gateway that never saw a model READY (it started while Triton loaded, or a replica's watcher reloads the
    model before this gateway's first look) cannot know its task: while Triton lists a model it has no config for,
    a task with no model answers 503 + Retry-After (retry soon), not 404 (the Swarm heal e2e met the 404)."""
    from vlmserve.gateway.engines import EngineUnavailable, ModelInfo, Registry
    from vlmserve.gateway.errors import APIError

    loading = Registry({"siglip_embed_text": ModelInfo.of("siglip_embed_text", False, {}, 0, "cpu")},
                       loading=("siglip_embed_text",), retry_after_s=3)
    with pytest.raises(EngineUnavailable) as info:
        loading.find("embed_text", None)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "3"
    assert "siglip_embed_text" in info.value.message
    with pytest.raises(APIError) as gone:
        Registry({}).find("embed_text", None)
    assert gone.value.status == 404 and gone.value.code == "model_not_found"
