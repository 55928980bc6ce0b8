"""Backpressure: the gateway's in-flight caps per route group, the overload mapping of Triton's errors, the chat
model's bounded admission and the queue policy written into the Triton configs."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tritonclient.utils import InferenceServerException

from export.repository import ExportOptions, dynamic_batching
from gateway.limits import ROUTE_GROUPS, InFlightLimit
from gateway.triton import TritonBackend
from model_repository.chat import Admission


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

    limited = InFlightLimit(app, {"chat": cap, "embeddings": 1}, retry_after_s=7)
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
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    app = create_app(GatewaySettings())
    posts = {path for path, ops in app.openapi()["paths"].items() if "post" in ops}
    assert posts == set(ROUTE_GROUPS)
    assert set(ROUTE_GROUPS.values()) == set(GatewaySettings().inflight_caps())


@pytest.mark.parametrize(("message", "status", "code"), [
    ("Exceeds maximum queue size", 429, "queue_full"),
    ("Request timeout expired", 429, "queue_timeout"),
    ("chat queue is full (72 requests running or waiting: max_batch + max_queue_size); retry later", 429,
     "queue_full"),
    ("Request for unknown model: 'x' is not found", 503, "triton_unavailable"),
])
def test_triton_overload_errors_map_to_429_or_503_with_retry_after(message: str, status: int, code: str) -> None:
    backend = TritonBackend("127.0.0.1:1", retry_after_s=3)
    for mapped in (backend._map_error("m", InferenceServerException(message)),
                   backend._map_stream_error("m", InferenceServerException(message))):
        assert (mapped.status, mapped.code, mapped.headers.get("Retry-After")) == (status, code, "3")


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
    from export.chat import chat_config

    params = chat_config("qwen2vl", ExportOptions(), {"family": "qwen2vl"})["parameters"]
    assert json.loads(params["max_queue_size"]["string_value"]) == 5


def test_dead_stub_answers_503_and_reloads_the_model_once() -> None:
    loads: list[str] = []
    gate = asyncio.Event()

    class Client:
        async def load_model(self, name: str) -> None:
            loads.append(name)
            await gate.wait()

    async def scenario() -> tuple[int, int, bool, bool]:
        backend = TritonBackend("127.0.0.1:1", retry_after_s=4)
        backend._client = Client()  # type: ignore[assignment]
        dead = InferenceServerException("Failed to process the request(s) for model instance 'm_0_0', message: "
                                        "Stub process 'm_0_0' is not healthy.")
        first = backend._map_stream_error("m", dead)
        second = backend._map_error("m", dead)  # while reloading: no second reload
        await asyncio.sleep(0)
        during = backend.reloading("m")
        try:
            await backend.infer("m", {}, [])
            refused_during = False
        except Exception as exc:  # noqa: BLE001
            refused_during = getattr(exc, "status", None) == 503
        gate.set()
        await asyncio.sleep(0.01)
        assert first.headers["Retry-After"] == "4"
        return first.status, second.status, during and refused_during, backend.reloading("m")

    first, second, refused_while_reloading, still_reloading = asyncio.run(scenario())
    assert (first, second) == (503, 503)
    assert refused_while_reloading and not still_reloading
    assert loads == ["m"]


def test_sigterm_drains_in_flight_requests_and_answers_new_ones_503() -> None:
    """A real uvicorn (gateway.__main__.DrainingServer) on a free port: after the stop signal a request in progress
    completes, new requests get 503 + Retry-After + Connection: close, /readyz is 503, /livez 200, and the server
    exits once nothing is in progress (well before the drain timeout)."""
    import signal
    import time

    import uvicorn

    from gateway.__main__ import DrainingServer
    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from tests.conftest import free_port
    from tests.fakes import FakeBackend

    app = create_app(GatewaySettings(retry_after_s=3), backend=FakeBackend())
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
